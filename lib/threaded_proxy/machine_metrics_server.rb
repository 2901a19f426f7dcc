# frozen_string_literal: true

require "socket"

module ThreadedProxy
  # `threaded-proxy-machine --metrics HOST:PORT`: ThreadedProxy::Metrics
  # over plain HTTP, for a process that has no Rack server. One thread
  # answers the scrapes one after another (a scrape is rare and small); a
  # client that sends no request head within READ_TIMEOUT is dropped. The
  # port is bound with SO_REUSEPORT so every `-w` worker can bind it: a
  # scrape reaches one worker and is labelled with its pid, as under Puma
  # cluster mode.
  class MachineMetricsServer
    READ_TIMEOUT = 5

    attr_reader :port

    def initialize(host, port)
      addr = Addrinfo.tcp(host, port)
      @socket = Socket.new(addr.afamily, :STREAM)
      @socket.setsockopt(:SOCKET, :REUSEADDR, true)
      @socket.setsockopt(:SOCKET, :REUSEPORT, true)
      @socket.bind(addr)
      @socket.listen(16)
      @port = @socket.local_address.ip_port
    end

    def start
      @thread = Thread.new do
        Thread.current.name = "threaded-proxy-machine-metrics"
        serve
      end
      self
    end

    def stop
      @socket.close
      @thread&.join(2)
    end

    private

    def serve
      loop do
        client, = @socket.accept
        answer(client)
      rescue IOError, SystemCallError => e
        break if @socket.closed?

        warn("[threaded-proxy] metrics scrape failed: #{e.class}: #{e.message}")
      ensure
        client&.close
      end
    end

    def answer(client)
      head = +""
      until head.include?("\r\n\r\n")
        return unless client.wait_readable(READ_TIMEOUT)

        head << client.readpartial(4096)
      end
      body = Metrics.text
      client.write("HTTP/1.1 200 OK\r\ncontent-type: #{Metrics::CONTENT_TYPE}\r\n" \
                   "content-length: #{body.bytesize}\r\nconnection: close\r\n\r\n#{body}")
    end
  end
end
