# frozen_string_literal: true

require_relative "free_port"
require_relative "origin_server"

# An OriginServer for the proxy_async specs that can listen on a port chosen
# beforehand (to bring an origin up where deliveries have been failing) and
# notes the monotonic time each request arrived (for the rate spec).
class AsyncOrigin < OriginServer
  # A free port on 127.0.0.1, closed again: nothing listens there until an
  # AsyncOrigin is started on it.
  def self.reserve_port
    FreePort.take
  end

  def initialize(port: 0)
    super(port: port)
    @arrivals = []
  end

  # Monotonic arrival times (request fully read), oldest first.
  def arrivals
    @mon.synchronize { @arrivals.dup }
  end

  # The X-Tag header of every recorded request, repeats kept.
  def tags
    requests.filter_map { |r| r[:headers]["x-tag"]&.first }
  end

  private

  def read_request(conn)
    request = super
    changed { @arrivals << monotonic } if request
    request
  end
end
