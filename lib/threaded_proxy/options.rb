# frozen_string_literal: true

require "uri"

module ThreadedProxy
  # Checks proxy_fetch's arguments in the action, before the socket is
  # taken, so mistakes surface as ArgumentError with Rails' normal error
  # page instead of a dead connection.
  class Options
    KNOWN = %i[method headers body forward_headers connect_timeout header_timeout idle_timeout
               verify_tls ignore_ssl_errors ca_file max_buffered_body].freeze
    METHODS = %w[GET HEAD POST PUT PATCH DELETE OPTIONS TRACE].freeze
    # Request headers that describe the client's connection, never copied:
    # Rust's list (headers.rs), which drops the same ones from responses.
    HOP_BY_HOP = Native.hop_by_hop_headers.map(&:freeze).freeze
    FORBIDDEN_BYTES = /[\r\n\0]/.freeze
    TOKEN = /\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\z/.freeze

    attr_reader :url, :host, :method, :headers, :body, :forward_headers, :connect_timeout,
                :header_timeout, :idle_timeout, :verify_tls, :ca_file, :max_buffered_body

    def initialize(url, options, configuration = ThreadedProxy.configuration)
      raise ArgumentError, "options must be a Hash, got #{options.class}" unless options.is_a?(Hash)

      options = options.transform_keys(&:to_sym)
      unknown = options.keys - KNOWN
      raise ArgumentError, "unknown option#{"s" if unknown.size > 1} #{unknown.map(&:inspect).join(", ")} (known: #{KNOWN.join(", ")})" if unknown.any?

      @url, @host = check_url(url, configuration.allowed_hosts)
      @method = check_method(options.fetch(:method, :get))
      @headers = check_headers(options.fetch(:headers, {}), "headers")
      @body = check_body(options[:body])
      @forward_headers = check_forward_headers(options.fetch(:forward_headers, false))
      @connect_timeout = seconds(options, :connect_timeout, configuration.connect_timeout)
      @header_timeout = seconds(options, :header_timeout, configuration.header_timeout)
      @idle_timeout = seconds(options, :idle_timeout, configuration.idle_timeout)
      @verify_tls = check_verify(options)
      @ca_file = check_ca_file(options[:ca_file])
      @max_buffered_body = check_size(options.fetch(:max_buffered_body, configuration.max_buffered_body))
    end

    # The canonical URL as a URI (for callers of the former reader).
    def uri
      URI.parse(@url)
    end

    # Raises InvalidHeaderError unless name and value are safe on the wire.
    def self.check_header!(name, value)
      name = name.to_s
      raise InvalidHeaderError, "header name #{name.inspect} is not a valid HTTP token" unless TOKEN.match?(name)
      raise InvalidHeaderError, "header #{name} has CR, LF or NUL in its value" if FORBIDDEN_BYTES.match?(value.to_s)
    end

    private

    # The URL is judged by the Rust parser the request will use (one
    # parser decides: Ruby's URI accepts URLs Rust refuses and reads some
    # differently); it returns the canonical URL and the host it connects
    # to, which allowed_hosts is matched against.
    def check_url(url, allowed_hosts)
      raise ArgumentError, "url must be a String, got #{url.class}" unless url.is_a?(String) || url.is_a?(URI::Generic)

      url = url.to_s
      # Non-ASCII (or invalid) bytes never reach the parser as a String it
      # cannot take.
      raise ArgumentError, "malformed url #{url.inspect}: not ASCII (percent-encode it)" unless url.ascii_only?

      url, host, = Native.check_url(url, false)
      check_allowed_host(host, allowed_hosts) if allowed_hosts
      [url, host]
    end

    def check_allowed_host(host, allowed_hosts)
      Options.check_allowed_host!(host, allowed_hosts)
    end

    def self.check_allowed_host!(host, allowed_hosts)
      host = host.downcase.delete_prefix("[").delete_suffix("]")
      allowed = allowed_hosts.any? do |entry|
        case entry
        when Regexp then entry.match?(host)
        when String then entry.downcase == host
        else raise ArgumentError, "allowed_hosts entries must be Strings or Regexps, got #{entry.class}"
        end
      end
      raise ArgumentError, "host #{host.inspect} is not in ThreadedProxy allowed_hosts" unless allowed
    end

    def check_method(method)
      name = method.to_s.upcase
      raise ArgumentError, "unsupported method #{method.inspect} (use one of #{METHODS.join(", ")})" unless METHODS.include?(name)

      name
    end

    def check_headers(headers, what)
      raise ArgumentError, "#{what} must be a Hash or an Array of pairs, got #{headers.class}" unless headers.respond_to?(:each)

      headers.each_with_object([]) do |pair, list|
        name, value = pair
        Array(value).each do |v|
          begin
            Options.check_header!(name, v)
          rescue InvalidHeaderError => e
            raise ArgumentError, "#{what}: #{e.message}"
          end
          list << [name.to_s, v.to_s]
        end
      end
    end

    def check_body(body)
      case body
      when nil, String, :rack then body
      else
        return body if body.respond_to?(:read)

        raise ArgumentError, "body must be nil, a String, an IO or :rack, got #{body.class}"
      end
    end

    def check_forward_headers(value)
      case value
      when true, false then value
      when Array
        value.each do |n|
          raise ArgumentError, "forward_headers entries must be header names" unless TOKEN.match?(n.to_s)
        end
        value.map { |n| n.to_s.downcase }
      else
        raise ArgumentError, "forward_headers must be true, false or an Array of header names"
      end
    end

    def seconds(options, name, default)
      Options.seconds!(options, name, default)
    end

    # A positive number of seconds from `options[name]` (or the default).
    def self.seconds!(options, name, default)
      value = options.fetch(name, default)
      raise ArgumentError, "#{name} must be a positive number of seconds, got #{value.inspect}" unless value.is_a?(Numeric) && value.positive?

      value.to_f
    end

    def check_verify(options)
      if options.key?(:verify_tls) && options.key?(:ignore_ssl_errors)
        raise ArgumentError, "give verify_tls or ignore_ssl_errors, not both"
      end
      return !options[:ignore_ssl_errors] if options.key?(:ignore_ssl_errors)

      value = options.fetch(:verify_tls, true)
      raise ArgumentError, "verify_tls must be true or false" unless [true, false].include?(value)

      value
    end

    def check_ca_file(path)
      return nil if path.nil?

      path = path.to_s
      raise ArgumentError, "ca_file #{path.inspect} is not a readable file" unless File.file?(path) && File.readable?(path)

      path
    end

    def check_size(value)
      raise ArgumentError, "max_buffered_body must be a positive Integer" unless value.is_a?(Integer) && value.positive?

      value
    end
  end
end
