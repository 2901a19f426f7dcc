# frozen_string_literal: true

require "socket"
require "websocket/driver"

# A real WebSocket origin and client (websocket-driver) for the tunnel specs.
module WebSocketPeers
  # Whether a received message was a binary frame: websocket-driver 0.6
  # gives those as Arrays of bytes, 0.8 as BINARY-encoded Strings (text
  # frames are UTF-8 Strings on both). The client reports them as byte
  # Arrays on both.
  def self.binary?(data)
    data.is_a?(Array) || data.encoding == Encoding::BINARY
  end

  # A binary message as an Array of bytes (on either version); text as is.
  def self.as_bytes(data)
    data.is_a?(String) && binary?(data) ? data.bytes : data
  end

  # A queue whose pop can time out (Ruby 3.1's Queue#pop cannot).
  class TimedQueue
    def initialize
      @items = []
      @mutex = Mutex.new
      @added = ConditionVariable.new
    end

    def <<(item)
      @mutex.synchronize do
        @items << item
        @added.broadcast
      end
      self
    end

    def pop(timeout:)
      deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
      @mutex.synchronize do
        while @items.empty?
          left = deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC)
          return nil if left <= 0

          @added.wait(@mutex, left)
        end
        @items.shift
      end
    end
  end

  # What websocket-driver writes to: a socket plus the URL it asked for.
  class Connection
    attr_reader :url

    def initialize(socket, url = nil)
      @socket = socket
      @url = url
      @mutex = Mutex.new
    end

    def write(data)
      @mutex.synchronize { @socket.write(data) }
    rescue IOError, SystemCallError
      nil
    end
  end

  # Echoes text and binary messages. "close-me" makes it close the
  # connection itself; a request path containing "refuse" gets a 403 and no
  # upgrade. Records how each connection ended.
  class Origin
    attr_reader :events

    def initialize
      @server = TCPServer.new("127.0.0.1", 0)
      @events = TimedQueue.new
      @threads = []
      @sockets = []
    end

    def url
      "http://127.0.0.1:#{@server.addr[1]}"
    end

    def start
      @acceptor = Thread.new do
        loop do
          socket = @server.accept
          @sockets << socket
          @threads << Thread.new { serve(socket) }
        end
      rescue IOError, SystemCallError
        nil
      end
      self
    end

    def stop
      @server.close
      @sockets.each { |s| s.close rescue nil } # rubocop:disable Style/RescueModifier
      (@threads + [@acceptor]).compact.each { |t| t.join(2) }
    end

    private

    def serve(socket)
      head = +"".b
      head << socket.readpartial(65_536) until head.include?("\r\n\r\n")
      if head.lines.first.include?("refuse")
        socket.write("HTTP/1.1 403 Forbidden\r\nContent-Length: 10\r\nConnection: close\r\n\r\nforbidden\n")
        return
      end
      driver = WebSocket::Driver.server(Connection.new(socket))
      driver.on(:connect) { driver.start }
      driver.on(:message) do |event|
        if event.data == "close-me"
          driver.close("origin says bye", 1000)
        elsif WebSocketPeers.binary?(event.data)
          driver.binary(event.data)
        else
          driver.text(event.data)
        end
      end
      driver.on(:close) do |event|
        @events << [:closed, event.code]
        socket.close rescue nil # rubocop:disable Style/RescueModifier
      end
      driver.parse(head)
      loop { driver.parse(socket.readpartial(65_536)) }
    rescue EOFError, IOError, SystemCallError
      nil
    ensure
      socket.close unless socket.closed?
    end
  end

  # A client that connects through the proxy; events arrive on a queue.
  class Client
    attr_reader :driver

    def initialize(url)
      uri = URI(url)
      @socket = TCPSocket.new(uri.host, uri.port)
      @events = TimedQueue.new
      @driver = WebSocket::Driver.client(Connection.new(@socket, url.sub(/\Ahttp/, "ws")))
      @driver.on(:open) { @events << [:open] }
      @driver.on(:message) { |e| @events << [:message, WebSocketPeers.as_bytes(e.data)] }
      @driver.on(:close) { |e| @events << [:close, e.code, e.reason] }
      @driver.start
      @reader = Thread.new do
        loop { @driver.parse(@socket.readpartial(1 << 20)) }
      rescue EOFError, IOError, SystemCallError
        @events << [:eof]
      end
    end

    # The next event, or [:timeout] after `timeout` seconds.
    def next_event(timeout = 15)
      @events.pop(timeout: timeout) || [:timeout]
    end

    def text(message) = @driver.text(message)
    def binary(bytes) = @driver.binary(bytes)
    def close = @driver.close

    def ping(payload)
      pong = TimedQueue.new
      @driver.ping(payload) { pong << true }
      pong.pop(timeout: 10)
    end

    def disconnect
      @socket.close unless @socket.closed?
      @reader.join(5)
    end
  end
end
