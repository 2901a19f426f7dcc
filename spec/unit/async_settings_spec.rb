# frozen_string_literal: true

require "threaded_proxy"
require "stringio"

# What ThreadedProxy::Async hands to Rust when deferred delivery starts:
# the queue's location and checked numbers (nothing here starts delivery).
RSpec.describe "ThreadedProxy::Async.settings" do
  around do |example|
    saved = %i[async_queue_path async_queue_url async_rate async_success async_retry_on].to_h do |name|
      [name, ThreadedProxy.configuration.public_send(name)]
    end
    example.run
  ensure
    saved.each { |name, value| ThreadedProxy.configuration.public_send("#{name}=", value) }
  end

  let(:config) { ThreadedProxy.configuration }

  it "uses the SQLite file, expanded, unless a PostgreSQL URL is set" do
    config.async_queue_path = "tmp/q.sqlite3"
    config.async_queue_url = nil
    expect(ThreadedProxy::Async.settings).to include(path: File.expand_path("tmp/q.sqlite3"))
    expect(ThreadedProxy::Async.settings).not_to have_key(:url)

    config.async_queue_url = "postgresql://app@db.internal/app"
    settings = ThreadedProxy::Async.settings
    expect(settings).to include(url: "postgresql://app@db.internal/app")
    expect(settings).not_to have_key(:path)
  end

  it "refuses a queue URL that is not PostgreSQL" do
    config.async_queue_url = "mysql://app@db/app"
    expect { ThreadedProxy::Async.settings }.to raise_error(ArgumentError, /async_queue_url must be a postgres:/)
  end

  it "turns rate and success into what Rust reads" do
    config.async_rate = 2
    config.async_success = [200..201, 204, 300...302]
    expect(ThreadedProxy::Async.settings).to include(rate: 2.0, success: [[200, 201], [204, 204], [300, 301]])
    expect(ThreadedProxy::Async.settings).to include(retry: [[429, 429], [500, 599]])
    config.async_retry_on = [409, 502..504]
    expect(ThreadedProxy::Async.settings).to include(retry: [[409, 409], [502, 504]])
    config.async_success = "2xx"
    expect { ThreadedProxy::Async.settings }.to raise_error(ArgumentError, /async_success/)
    config.async_success = 200..299
    config.async_retry_on = 500..700
    expect { ThreadedProxy::Async.settings }.to raise_error(ArgumentError, /async_retry_on: 500\.\.700 is not within/)
  end
end

# Issue 15 item 11: proxy_async's URL is judged like proxy_fetch's (the Rust
# parser), in the action, before the queue is opened.
RSpec.describe "ThreadedProxy::Async.enqueue URL checks" do
  it "refuses what the request's parser refuses before the queue is opened" do
    running = ThreadedProxy::Native.async_running?
    env = { "REQUEST_METHOD" => "POST", "rack.input" => StringIO.new("") }
    ["http://127.0.0.1:74326/hook", "http://127%2e0%2e0%2e1/hook", "http://h/x?a=1 2", "http://a..b/hook"].each do |url|
      expect { ThreadedProxy::Async.enqueue(env, url, {}) }.to raise_error(ArgumentError), url
    end
    expect(ThreadedProxy::Native.async_running?).to eq(running)
  end
end
