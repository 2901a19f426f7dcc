# frozen_string_literal: true

require "socket"
require "uri"

# A raw TCP Server-Sent Events client: sends the GET, then keeps every byte
# the server wrote, so specs compare the wire bytes exactly. Every wait is
# bounded (read_until raises on timeout with what arrived so far).
class SSEClient
  class Timeout < StandardError; end

  attr_reader :buffer, :socket

  def initialize(url, headers: {}, rcvbuf: nil)
    uri = URI(url)
    @socket = Socket.new(:INET, :STREAM)
    @socket.setsockopt(Socket::SOL_SOCKET, Socket::SO_RCVBUF, rcvbuf) if rcvbuf
    @socket.connect(Socket.sockaddr_in(uri.port, uri.host))
    head = +"GET #{uri.request_uri} HTTP/1.1\r\nHost: #{uri.host}:#{uri.port}\r\nAccept: text/event-stream\r\n"
    headers.each { |name, value| head << "#{name}: #{value}\r\n" }
    @socket.write("#{head}\r\n")
    @buffer = +"".b
    @taken = 0
  end

  # Reads until the bytes after what `take` consumed include `text`;
  # returns everything up to and including it, and consumes it.
  def take_until(text, timeout: 5)
    text = text.b
    deadline = monotonic + timeout
    until (index = @buffer.index(text, @taken))
      fill(deadline, text)
    end
    taken = @buffer.byteslice(@taken, index + text.bytesize - @taken)
    @taken = index + text.bytesize
    taken
  end

  # The head (through the blank line).
  def head(timeout: 5)
    take_until("\r\n\r\n", timeout:)
  end

  # Waits for exactly `bytes` next (no more, no less, once `bytes.bytesize`
  # bytes are there).
  def take_exactly(size, timeout: 5)
    deadline = monotonic + timeout
    fill(deadline, "#{size} bytes") while @buffer.bytesize - @taken < size
    taken = @buffer.byteslice(@taken, size)
    @taken += size
    taken
  end

  # What arrived but was not taken yet, after reading what is there now.
  def pending
    loop { @buffer << @socket.read_nonblock(65_536) }
  rescue IO::WaitReadable, EOFError, Errno::ECONNRESET
    @buffer.byteslice(@taken..)
  end

  # True once the server closed the stream (EOF or reset) within `timeout`.
  def closed_by_server?(timeout: 5)
    deadline = monotonic + timeout
    loop do
      left = deadline - monotonic
      return false if left <= 0
      next unless @socket.wait_readable(left)

      @buffer << @socket.read_nonblock(65_536)
    end
  rescue EOFError, Errno::ECONNRESET
    true
  rescue IO::WaitReadable
    retry
  end

  def close
    @socket.close unless @socket.closed?
  end

  # Closes with RST instead of FIN (a client that vanished abruptly).
  def reset
    @socket.setsockopt(Socket::SOL_SOCKET, Socket::SO_LINGER, [1, 0].pack("ii"))
    close
  end

  private

  def fill(deadline, wanted)
    left = deadline - monotonic
    raise Timeout, "no #{wanted.inspect} within the timeout; got #{@buffer.byteslice(@taken..).inspect}" if left <= 0

    @buffer << @socket.read_nonblock(65_536) if @socket.wait_readable(left)
  rescue IO::WaitReadable
    nil
  rescue EOFError
    raise Timeout, "EOF before #{wanted.inspect}; got #{@buffer.byteslice(@taken..).inspect}"
  end

  def monotonic
    Process.clock_gettime(Process::CLOCK_MONOTONIC)
  end
end
