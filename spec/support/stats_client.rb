# frozen_string_literal: true

require "json"

# Reads rails_test_app's /stats (ThreadedProxy.stats plus open fds and RSS
# of the process that answered).
module StatsClient
  module_function

  def fetch(puma)
    JSON.parse(RawHTTP.request("#{puma.url}/stats").body)
  end

  # Polls /stats until the block accepts it (a state with no event to wait
  # on); bounded by `timeout`.
  def wait_for(puma, timeout: 10)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    loop do
      stats = fetch(puma)
      return stats if yield(stats)
      return nil if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

      sleep 0.05
    end
  end
end
