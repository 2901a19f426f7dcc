# frozen_string_literal: true

require "socket"
require "digest"
require "uri"

# A deliberately small HTTP/1.1 client that shows exactly what went over
# the wire: header lines in order (repeats kept), the framing used, and
# whether the body ended cleanly or was cut (short read, RST).
module RawHTTP
  Response = Struct.new(:status, :reason, :headers, :body_bytes, :sha256, :body, :complete, :framing, :reset,
                        keyword_init: true) do
    def [](name)
      values = get_all(name)
      values.empty? ? nil : values.join(", ")
    end

    def get_all(name)
      headers.filter_map { |n, v| v if n.casecmp?(name) }
    end
  end

  module_function

  # keep_body: false streams the body into a digest only (for huge bodies).
  def request(url, method: "GET", headers: {}, body: nil, keep_body: true, read_timeout: 30, http10: false)
    uri = URI(url)
    socket = TCPSocket.new(uri.host, uri.port)
    head = +"#{method} #{uri.request_uri} HTTP/#{http10 ? "1.0" : "1.1"}\r\nHost: #{uri.host}:#{uri.port}\r\n"
    headers.each { |n, v| head << "#{n}: #{v}\r\n" }
    head << "Content-Length: #{body.bytesize}\r\n" if body
    head << "\r\n"
    socket.write(head)
    socket.write(body) if body
    read_response(socket, head_only: method == "HEAD", keep_body: keep_body, read_timeout: read_timeout)
  ensure
    socket&.close
  end

  def read_response(socket, head_only:, keep_body:, read_timeout:)
    reader = Reader.new(socket, read_timeout)
    status_line = reader.line
    _, status, reason = status_line.split(" ", 3)
    headers = []
    while (line = reader.line) && !line.empty?
      name, value = line.split(":", 2)
      headers << [name, value.strip]
    end
    response = Response.new(status: Integer(status), reason: reason, headers: headers)
    digest = Digest::SHA256.new
    kept = keep_body ? +"".b : nil
    sink = lambda do |data|
      digest << data
      kept << data if kept
    end
    te = response["transfer-encoding"]
    cl = response["content-length"]
    bodiless = head_only || response.status == 204 || response.status == 304 || response.status < 200
    response.framing, count, complete =
      if bodiless then [:none, 0, true]
      elsif te&.include?("chunked") then [:chunked, *reader.chunked(sink)]
      elsif cl then [:length, *reader.exactly(Integer(cl), sink)]
      else [:close, *reader.until_close(sink)]
      end
    response.body_bytes = count
    response.sha256 = digest.hexdigest
    response.body = kept
    response.complete = complete
    response.reset = reader.reset
    response
  end

  # Buffered reads with a deadline per read; remembers whether the peer
  # reset the connection.
  class Reader
    attr_reader :reset

    def initialize(socket, timeout)
      @socket = socket
      @timeout = timeout
      @buffer = +"".b
      @reset = false
      @eof = false
    end

    def fill
      return false if @eof
      raise "read timed out after #{@timeout}s" unless @socket.wait_readable(@timeout)

      @buffer << @socket.readpartial(65_536)
      true
    rescue EOFError
      @eof = true
      false
    rescue Errno::ECONNRESET
      @reset = true
      @eof = true
      false
    end

    def line
      until (i = @buffer.index("\r\n"))
        return nil unless fill
      end
      @buffer.slice!(0, i + 2).chomp("\r\n")
    end

    def take(max)
      fill if @buffer.empty?
      @buffer.slice!(0, max)
    end

    def exactly(length, sink)
      got = 0
      while got < length
        data = take([length - got, 65_536].min)
        break if data.empty?

        got += data.bytesize
        sink.call(data)
      end
      [got, got == length && !@reset]
    end

    def chunked(sink)
      got = 0
      loop do
        size_line = line or return [got, false]
        size = Integer(size_line.split(";").first, 16)
        if size.zero?
          line
          return [got, !@reset]
        end
        n, ok = exactly(size, sink)
        got += n
        return [got, false] unless ok
        line or return [got, false]
      end
    end

    def until_close(sink)
      got = 0
      loop do
        data = take(65_536)
        break if data.empty?

        got += data.bytesize
        sink.call(data)
      end
      [got, !@reset]
    end
  end
end
