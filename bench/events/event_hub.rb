# frozen_string_literal: true

module BenchEvents
  # The in-process fan-out the Ruby rows of the events scenario publish
  # through (what an app without the gem writes, as the seed's article does):
  # each subscriber is a Thread::Queue that its own thread pops; a publish
  # encodes the event once and pushes it onto every queue, in the publishing
  # thread, under the GVL.
  class EventHub
    def initialize
      @mutex = Mutex.new
      # queue => true; identity, so two queues never compare equal.
      @queues = {}.compare_by_identity
    end

    def subscribe(queue)
      @mutex.synchronize { @queues[queue] = true }
      queue
    end

    def unsubscribe(queue)
      @mutex.synchronize { @queues.delete(queue) }
    end

    # One `data:` line per line of `data`; the number of subscribers it was
    # queued for.
    def publish(data)
      frame = "#{data.to_s.split(/\r\n|\r|\n/, -1).map { |line| "data: #{line}\n" }.join}\n".freeze
      queues = @mutex.synchronize { @queues.keys }
      queues.each { |queue| queue << frame }
      queues.size
    end

    def size
      @mutex.synchronize { @queues.size }
    end
  end
end
