# frozen_string_literal: true

module BenchEvents
  # Row "gem" of the events scenario: ThreadedProxy's stream_events (issue
  # 17, shared/DESIGN.md "Event streams from Ruby"). The socket goes to Rust
  # under the channel and the Puma thread is free at once; publishes fan out
  # in Rust. Where the gem has no event streams yet, the stream answers 501
  # with why (GemEventsController.missing), so the scenario fails that row at
  # once instead of waiting for events that never come.
  class GemEventsController < ActionController::Base
    include ThreadedProxy::Controller

    CHANNEL = "bench"

    # nil when the gem has what this row needs, else what is missing.
    def self.missing
      gaps = []
      unless ThreadedProxy::Controller.method_defined?(:stream_events) ||
             ThreadedProxy::Controller.private_method_defined?(:stream_events)
        gaps << "ThreadedProxy::Controller#stream_events"
      end
      gaps << "ThreadedProxy.publish" unless ThreadedProxy.respond_to?(:publish)
      if ENV["THREADED_PROXY_EVENTS_URL"] && !ThreadedProxy.configuration.respond_to?(:events_url=)
        gaps << "the events_url setting"
      end
      gaps.empty? ? nil : "this threaded-proxy lacks #{gaps.join(", ")} (issue 17's event streams)"
    end

    def self.publish(data)
      ThreadedProxy.publish(CHANNEL, data)
    end

    def stream
      if (missing = self.class.missing)
        render plain: "#{missing}\n", status: 501
      else
        stream_events CHANNEL, heartbeat: 15, headers: { "x-worker" => Process.pid.to_s }
      end
    end
  end
end
