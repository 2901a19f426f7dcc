# frozen_string_literal: true

module BenchEvents
  # Row "live" of the events scenario: ActionController::Live, the way Rails
  # streams SSE out of the box. The action runs in a thread Live starts and
  # Puma's thread stays on the response body until the stream ends: one Puma
  # thread (plus Live's) per subscriber, so Puma runs with -t N:N.
  class LiveEventsController < ActionController::Base
    include ActionController::Live

    class << self
      # The EventHub this row's publish endpoint publishes through.
      attr_accessor :hub
    end

    def stream
      # Rails 6.1 keys its header Hash as "Content-Type" (Rack 3 stacks
      # lowercase): set through the accessors so there is one of each.
      response.content_type = "text/event-stream"
      response.headers["Cache-Control"] = "no-cache"
      response.headers["X-Worker"] = Process.pid.to_s
      queue = self.class.hub.subscribe(Thread::Queue.new)
      # Subscribed before the head leaves: a client that has the head gets
      # every later publish.
      response.stream.write(": open\n\n")
      while (frame = queue.pop)
        response.stream.write(frame)
      end
    rescue ActionController::Live::ClientDisconnected, IOError, SystemCallError
      nil
    ensure
      self.class.hub.unsubscribe(queue) if queue
      response.stream.close
    end
  end
end
