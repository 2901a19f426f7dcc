# frozen_string_literal: true

module ThreadedProxy
  # Reads the HTTP/1.1 response Rust wrote into a socket pair and turns it
  # into a streaming Rack response (used where hijack is unavailable).
  class ResponseReader
    MAX_HEAD = 1024 * 1024
    CHUNK = 64 * 1024
    # Framing headers belong to the server that writes the Rack response.
    SERVER_OWNED = %w[connection transfer-encoding].freeze

    def initialize(socket, head_only: false)
      @socket = socket
      @head_only = head_only
      @buffer = +"".b
    end

    def rack_response
      status, headers = read_head
      rack_headers = {}
      headers.each do |name, value|
        next if SERVER_OWNED.include?(name.downcase)

        key = name.downcase
        rack_headers[key] = rack_headers.key?(key) ? "#{rack_headers[key]}\n#{value}" : value
      end
      response = [status, rack_headers, Body.new(self, body_framing(status, headers))]
      handed = true
      response
    ensure
      # Any way out without a body to hand over closes the socket: an
      # error, but also Timeout's throw (Ruby 3.1) or Thread#raise/kill,
      # which `rescue StandardError` never sees. Rust sees the close and
      # cancels the origin request.
      close unless handed
    end

    def each_body_chunk(framing)
      kind, length = framing
      case kind
      when :none then nil
      when :length
        left = length
        while left.positive?
          data = read_some([left, CHUNK].min) or raise UpstreamError, "response body cut short"
          left -= data.bytesize
          yield data
        end
      when :chunked then each_chunk { |data| yield data }
      when :close
        while (data = read_some(CHUNK))
          yield data
        end
      end
    end

    def close
      @socket.close unless @socket.closed?
    end

    private

    def read_head
      until (split = @buffer.index("\r\n\r\n"))
        raise UpstreamError, "response head too large" if @buffer.bytesize > MAX_HEAD

        data = read_more
        raise UpstreamError, "the proxy closed before sending a response head" unless data

        @buffer << data
      end
      head = @buffer.slice!(0, split + 4)
      lines = head.split("\r\n")
      status = Integer(lines.shift.split(" ", 3)[1])
      headers = lines.map do |line|
        name, value = line.split(":", 2)
        [name, value.to_s.strip]
      end
      [status, headers]
    end

    def body_framing(status, headers)
      return [:none] if @head_only || (100..199).cover?(status) || status == 204 || status == 304

      find = ->(n) { headers.find { |name, _| name.casecmp?(n) }&.last }
      return [:chunked] if find.call("transfer-encoding")&.downcase&.include?("chunked")

      length = find.call("content-length")
      length ? [:length, Integer(length)] : [:close]
    end

    def each_chunk
      loop do
        size_line = read_line
        size = Integer(size_line.split(";").first, 16)
        if size.zero?
          read_line
          return
        end
        left = size
        while left.positive?
          data = read_some([left, CHUNK].min) or raise UpstreamError, "response body cut short"
          left -= data.bytesize
          yield data
        end
        read_line
      end
    end

    def read_line
      until (i = @buffer.index("\r\n"))
        data = read_more
        raise UpstreamError, "response body cut short" unless data

        @buffer << data
      end
      line = @buffer.slice!(0, i + 2)
      line.chomp("\r\n")
    end

    # More bytes from the socket, nil at its end. Only the socket's own end
    # is rescued: the caller's exceptions (a Timeout class of its own,
    # Thread#raise) go through unchanged.
    def read_more
      @socket.readpartial(CHUNK)
    rescue EOFError, Errno::ECONNRESET
      nil
    end

    def read_some(max)
      unless @buffer.empty?
        return @buffer.slice!(0, max)
      end

      @socket.readpartial(max)
    rescue EOFError, Errno::ECONNRESET
      nil
    end
  end
end
