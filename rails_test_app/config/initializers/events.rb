# frozen_string_literal: true

# Event stream settings the specs vary per Puma (spec/integration/events_spec.rb).
if ENV["EVENTS_QUEUE_BYTES"] || ENV["EVENTS_REPLAY"]
  ThreadedProxy.configure do |c|
    c.event_queue_bytes = Integer(ENV["EVENTS_QUEUE_BYTES"]) if ENV["EVENTS_QUEUE_BYTES"]
    c.event_replay = Integer(ENV["EVENTS_REPLAY"]) if ENV["EVENTS_REPLAY"]
  end
end

# EVENTS_URL: a PostgreSQL database; publish then reaches the streams of
# every worker (and of every other process listening there).
ThreadedProxy.configure { |c| c.events_url = ENV["EVENTS_URL"] } if ENV["EVENTS_URL"]
