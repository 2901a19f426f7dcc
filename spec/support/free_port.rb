# frozen_string_literal: true

require "socket"

# A port on 127.0.0.1 nobody listens on right now (bound, read, released).
# Another process can take it before it is used, so only for what cannot bind
# port 0 itself: PostgreSQL (PostgresServer retries on "could not bind") and
# AsyncOrigin.reserve_port (a port where nothing may listen yet). Puma and the
# Ruby origins bind port 0 and report the port they got.
module FreePort
  module_function

  def take
    server = TCPServer.new("127.0.0.1", 0)
    server.addr[1]
  ensure
    server&.close
  end
end
