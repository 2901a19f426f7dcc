# frozen_string_literal: true

module ThreadedProxy
  module Async
    # ThreadedProxy.shutdown (at exit) also stops deferred delivery: no new
    # claims, running attempts finish within the same shutdown_timeout, the
    # rest go back to the queue for the next process.
    module Shutdown
      def shutdown(timeout = configuration.shutdown_timeout)
        deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout.to_f
        Native.async_stop_claiming
        drained = super
        Async.shutdown(deadline) && drained
      end
    end
  end
end
