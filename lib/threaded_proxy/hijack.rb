# frozen_string_literal: true

module ThreadedProxy
  # Taking the client socket from the server: one rule for every handover
  # to Rust (proxy_fetch, reverse_proxy, proxy_tunnel, stream_events).
  module Hijack
    module_function

    # The client IO (a full hijack), or nil when this server cannot hand it
    # over safely: no rack.hijack (rack-test, WEBrick), or Puma over TLS,
    # whose MiniSSL socket would have raw bytes on its fd break the TLS
    # stream. The caller owns the IO and must close it.
    def take(env)
      return nil unless env["rack.hijack?"] && env["rack.hijack"].respond_to?(:call)

      socket = env["puma.socket"]
      return nil if socket && !socket.is_a?(BasicSocket)

      io = env["rack.hijack"].call
      io = env["rack.hijack_io"] unless io.respond_to?(:fileno)
      io
    end
  end
end
