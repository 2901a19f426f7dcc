# frozen_string_literal: true

require "socket"

# Connecting again and again to a listener that is changing state, until the
# outcome wanted or a deadline (each attempt bounded by what is left of it).
# Only for what gives no signal to wait on: Machine#stop closes its listener
# inside a call that returns once the open connections are done, so the spec
# can only watch for the refusal itself.
module ConnectRetry
  module_function

  # Connects to host:port (closing each accepted connection at once) until a
  # connect is refused: true then, false when `timeout` seconds passed first.
  def until_refused(port, host: "127.0.0.1", timeout: 5)
    deadline = monotonic + timeout
    loop do
      left = deadline - monotonic
      return false unless left.positive?

      begin
        TCPSocket.new(host, port, connect_timeout: left).close
      rescue Errno::ECONNREFUSED
        return true
      rescue Errno::ETIMEDOUT
        nil # the deadline decides
      end
    end
  end

  def monotonic = Process.clock_gettime(Process::CLOCK_MONOTONIC)
end
