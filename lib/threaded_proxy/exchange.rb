# frozen_string_literal: true

require "socket"

module ThreadedProxy
  # One proxy_fetch call on the Ruby side: checks the arguments, gathers the
  # request, takes the client socket and hands everything to Rust.
  class Exchange
    # The body of the answer returned once the socket was hijacked; how the
    # controller recognises that answer (Exchange.hijacked?).
    HIJACKED_BODY = [].freeze

    # What the app returns once the socket was hijacked (the server ignores
    # it): a fresh array and headers Hash each time, since Rack 3's Lint
    # rejects a frozen response and middleware may write into the headers.
    def self.hijacked_response = [200, {}, HIJACKED_BODY]

    def self.hijacked?(rack_response) = rack_response[2].equal?(HIJACKED_BODY)

    # Puma before 6 reports SERVER_PROTOCOL as "HTTP/1.1" whatever the client
    # sent; its parser puts the request line's version in HTTP_VERSION, ahead
    # of any client `Version:` header (appended after ", ").
    SERVER_PROTOCOL_UNTRUE = /\Apuma [0-5]\./i.freeze

    # Client headers that are not the client's to forward.
    NOT_FORWARDED = %w[host version content-length].freeze

    # Request headers a protocol switch needs at the origin (the WebSocket
    # handshake), forwarded whenever the client asks to upgrade.
    UPGRADE_HEADERS = /\AHTTP_SEC_WEBSOCKET_/.freeze

    def initialize(env, url, options, tunnel: nil, &block)
      @env = env
      @tunnel = tunnel
      @options = tunnel ? TunnelOptions.new(url, options) : Options.new(url, options)
      @callbacks = Callbacks.new
      block&.call(@callbacks)
    end

    # Starts the exchange; returns the Rack response for the app to return.
    def start
      ThreadedProxy.ensure_configured
      spec = native_spec
      io = Hijack.take(@env)
      return start_on_socket(io, spec) if io
      raise Error, "proxy_tunnel needs a server with rack.hijack (Puma over plain TCP)" if @tunnel

      # Without the socket there is nothing to switch protocols on: the
      # origin gets a plain request.
      start_in_request_thread(spec.with(upgrade: nil))
    end

    private

    # Refused before Rust took the socket (a limit, or no descriptor left to
    # duplicate it): the client still gets a complete answer, 503 with
    # Retry-After, and the socket is closed at once. Rust counted and logged it.
    OVERLOAD_BODY = "503 Service Unavailable\n"
    OVERLOAD_HEADERS = {
      "content-type" => "text/plain; charset=utf-8", "x-threaded-proxy-error" => "overload",
      "retry-after" => "1", "content-length" => OVERLOAD_BODY.bytesize.to_s
    }.freeze
    OVERLOADED = "HTTP/1.1 503 Service Unavailable\r\n#{OVERLOAD_HEADERS.map { |k, v| "#{k}: #{v}\r\n" }.join}" \
                 "connection: close\r\n\r\n#{OVERLOAD_BODY}"

    def start_on_socket(io, spec)
      begin
        Native.start_exchange(io.fileno, spec.with(id: register(spec)).to_native)
      rescue OverloadError
        io.write(OVERLOADED) rescue nil # rubocop:disable Style/RescueModifier
      rescue StandardError
        io.write("HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n") rescue nil # rubocop:disable Style/RescueModifier
        raise
      ensure
        io.close
      end
      Exchange.hijacked_response
    end

    # Servers without hijack (rack-test, WEBrick, Puma over TLS): Rust writes
    # the response into a socket pair and the request thread streams it out.
    def start_in_request_thread(spec)
      begin
        ours, theirs = UNIXSocket.pair(:STREAM)
      rescue Errno::EMFILE, Errno::ENFILE
        return overloaded(spec)
      end
      begin
        begin
          Native.start_exchange(theirs.fileno, spec.with(id: register(spec), client_http10: false).to_native)
        rescue OverloadError
          return overloaded(spec)
        ensure
          theirs.close # Rust has its own duplicate; the reader needs the EOF
        end
        response = ResponseReader.new(ours, head_only: spec.client_head).rack_response
        handed = true
        response
      ensure
        # In `ensure`: Timeout's throw (Ruby 3.1) and Thread#raise/kill pass
        # `rescue StandardError`. Closing our end makes Rust cancel the
        # origin request at once.
        ours.close unless handed || ours.closed?
      end
    end

    # The Rack form of OVERLOADED (an exchange refused before it started).
    def overloaded(spec)
      [503, OVERLOAD_HEADERS.dup, RefusedBody.new(spec.client_head ? [] : [OVERLOAD_BODY])]
    end

    # An id under which the dispatcher keeps this exchange's callbacks; 0
    # when Ruby needs to hear of it only if it fails (to log it).
    def register(spec)
      dispatcher = Dispatcher.instance
      unless reported?
        dispatcher.start # failures still come back, to be logged
        return 0
      end

      dispatcher.register(Dispatcher::Record.new(callbacks: @callbacks, method: spec.method, url: spec.url))
    end

    # Whether Ruby must hear of the end of a successful exchange: for its
    # callbacks or for a threaded_proxy.fetch subscriber.
    def reported?
      return @reported if defined?(@reported)

      @reported = @callbacks.any? || Dispatcher.instrumented?
    end

    # The exchange as Rust is told it (ExchangeSpec, the one builder).
    def native_spec
      client = {
        client_head: @env["REQUEST_METHOD"] == "HEAD",
        client_http10: request_line_version == "HTTP/1.0",
        on_headers: !@callbacks[:on_headers].nil?,
        on_response: !@callbacks[:on_response].nil?,
        on_error: !@callbacks[:on_error].nil?,
        finished: reported?
      }
      @tunnel ? tunnel_spec(client) : fetch_spec(client)
    end

    def fetch_spec(client)
      ExchangeSpec.new(
        method: @options.method,
        url: @options.url,
        headers: request_headers,
        connect_timeout: @options.connect_timeout,
        header_timeout: @options.header_timeout,
        idle_timeout: @options.idle_timeout,
        verify_tls: @options.verify_tls,
        ca_file: @options.ca_file,
        max_buffered_body: @options.max_buffered_body,
        upgrade: requested_upgrade,
        **client,
        **RequestBody.fields(@env, @options.body)
      )
    end

    # A tunnel sends no request of its own to the target: no headers, no
    # body, and it waits for nothing but the connect (header_timeout too).
    def tunnel_spec(client)
      protocol = requested_upgrade
      connect = @env["REQUEST_METHOD"] == "CONNECT"
      raise ArgumentError, "proxy_tunnel needs a request with Upgrade (or CONNECT)" unless protocol || connect

      ExchangeSpec.new(
        url: @options.url,
        connect_timeout: @options.connect_timeout,
        header_timeout: @options.connect_timeout,
        idle_timeout: @options.idle_timeout,
        tunnel_address: @options.address,
        tunnel_upgrade: connect ? nil : protocol,
        **client
      )
    end

    # The HTTP version of the request line, from a source the client cannot
    # forge: SERVER_PROTOCOL (Rack's SPEC; Puma 6+ sets it from the request
    # line), but on Puma 5 the first value of HTTP_VERSION. Never HTTP_VERSION
    # alone: Puma 7+ under Rack >= 3.1 no longer sets it, so a client's
    # `Version: HTTP/1.0` header would fill it.
    def request_line_version
      return @env["SERVER_PROTOCOL"] unless SERVER_PROTOCOL_UNTRUE.match?(@env["SERVER_SOFTWARE"].to_s)

      @env["HTTP_VERSION"].to_s.split(",", 2).first.to_s.strip
    end

    # The protocol the client asked to switch to, if it did (Upgrade plus
    # "upgrade" among its Connection tokens).
    def requested_upgrade
      protocol = @env["HTTP_UPGRADE"]
      return nil if protocol.nil? || protocol.empty? || Options::FORBIDDEN_BYTES.match?(protocol)
      return nil unless @env["HTTP_CONNECTION"].to_s.split(",").any? { |t| t.strip.casecmp?("upgrade") }

      protocol
    end

    # Forwarded client headers first, then the caller's, which win.
    def request_headers
      headers = forwarded_headers
      if @options.body == :rack && @env["CONTENT_TYPE"] && !@env["CONTENT_TYPE"].empty?
        headers << ["Content-Type", @env["CONTENT_TYPE"]]
      end
      own = @options.headers
      return headers if own.empty?

      names = own.map { |name, _| name.downcase }
      headers.reject { |name, _| names.include?(name.downcase) } + own
    end

    def forwarded_headers
      wanted = @options.forward_headers
      return upgrade_headers unless wanted

      connection_named = @env["HTTP_CONNECTION"]&.split(",")&.map { |t| t.strip.downcase }
      pairs = []
      @env.each do |key, value|
        next unless key.start_with?("HTTP_") && value.is_a?(String)
        next unless (name, lower = Exchange.forwardable_name(key))
        next if wanted.is_a?(Array) && !wanted.include?(lower)
        next if connection_named&.include?(lower) || Options::FORBIDDEN_BYTES.match?(value)

        pairs << [name, value]
      end
      upgrade = upgrade_headers
      return pairs if upgrade.empty?

      names = pairs.map { |name, _| name.downcase }
      pairs + upgrade.reject { |name, _| names.include?(name.downcase) }
    end

    # Rack env key => [header name, its lower case] ("HTTP_X_REQUEST_ID" =>
    # ["X-Request-Id", "x-request-id"]), or nil for a header never forwarded.
    # Learnt once per key, since clients send the same few, so forwarding
    # allocates no strings per header; bounded, since clients pick the names.
    FORWARDABLE_NAMES = {} # rubocop:disable Style/MutableConstant
    FORWARDABLE_NAMES_MAX = 512

    def self.forwardable_name(key)
      FORWARDABLE_NAMES.fetch(key) do
        name = key.delete_prefix("HTTP_").split("_").map(&:capitalize).join("-").freeze
        lower = name.downcase.freeze
        pair = [name, lower].freeze unless NOT_FORWARDED.include?(lower) || Options::HOP_BY_HOP.include?(lower)
        FORWARDABLE_NAMES[key] = pair if FORWARDABLE_NAMES.size < FORWARDABLE_NAMES_MAX
        pair
      end
    end

    def upgrade_headers
      return [] unless requested_upgrade && !@tunnel

      @env.filter_map do |key, value|
        next unless UPGRADE_HEADERS.match?(key) && value.is_a?(String) && !Options::FORBIDDEN_BYTES.match?(value)

        [key.delete_prefix("HTTP_").split("_").map(&:capitalize).join("-"), value]
      end
    end
  end
end
