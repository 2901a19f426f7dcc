# frozen_string_literal: true

module BenchEvents
  # Row "hijack" of the events scenario: the seed article's fix, a full
  # rack.hijack and a Ruby Thread.new per subscriber that pops its queue and
  # writes to the socket. Puma's thread is free at once; each stream still
  # costs a Ruby thread.
  class HijackEvents
    HEAD = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n" \
           "x-worker: %d\r\nconnection: close\r\n\r\n: open\n\n"

    def initialize(hub)
      @hub = hub
    end

    def call(env)
      io = env["rack.hijack"].call
      queue = @hub.subscribe(Thread::Queue.new)
      Thread.new { serve(io, queue) }
      [200, {}, []] # ignored by Puma after a full hijack
    end

    private

    # Subscribed before the head leaves, as in the other rows.
    def serve(io, queue)
      io.write(format(HEAD, Process.pid))
      while (frame = queue.pop)
        io.write(frame)
      end
    rescue IOError, SystemCallError
      nil
    ensure
      @hub.unsubscribe(queue)
      begin
        io.close
      rescue IOError
        nil
      end
    end
  end
end
