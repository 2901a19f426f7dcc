# frozen_string_literal: true

# ASYNC_QUEUE_PATH=/path/queue.sqlite3 (or ASYNC_QUEUE_URL=postgres://…)
# turns on deferred delivery
# (proxy_async, app/controllers/async_controller.rb) and starts its worker
# once the app is loaded: in each Puma worker without preload_app!, in the
# only process in single mode. Numeric async_* settings come from
# THREADED_PROXY_ASYNC_* variables (config/application.rb).
if ENV["ASYNC_QUEUE_PATH"] || ENV["ASYNC_QUEUE_URL"]
  ThreadedProxy.configure do |c|
    c.async_queue_path = ENV["ASYNC_QUEUE_PATH"] if ENV["ASYNC_QUEUE_PATH"]
    c.async_queue_url = ENV["ASYNC_QUEUE_URL"]
  end
  Rails.application.config.after_initialize { ThreadedProxy.async_start }
end
