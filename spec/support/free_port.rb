# frozen_string_literal: true

require "socket"

# A port on 127.0.0.1 nobody listens on right now (bound, read, released):
# for servers that take their port on the command line.
module FreePort
  module_function

  def take
    server = TCPServer.new("127.0.0.1", 0)
    server.addr[1]
  ensure
    server&.close
  end
end
