# frozen_string_literal: true

module ThreadedProxy
  # What Rust is told about one exchange: the one writer of the Hash that
  # Native.start_exchange (and, for its request part, Native.async_enqueue)
  # reads; the one reader is ext/threaded_proxy/src/ruby/exchange_spec.rs.
  # Every caller (proxy_fetch, proxy_tunnel, the request-thread fallback,
  # proxy_async) builds one of these; none writes the keys itself.
  # Immutable: #with returns a changed copy.
  class ExchangeSpec
    # Each key with its default; a nil value is left out of the Hash (Rust
    # reads it as absent).
    FIELDS = {
      # Dispatcher id of the exchange's callbacks (0: Ruby hears of it only
      # when it fails, to log it).
      id: 0,
      method: "GET",
      # The canonical URL Native.check_url returned (required).
      url: nil,
      # [[name, value], …]: repeated names stay separate lines.
      headers: [].freeze,
      # The request body: a binary String, or a file descriptor and the
      # offset to read it from (RequestBody.fields).
      body: nil,
      body_fd: nil,
      body_offset: nil,
      # The client's request was HEAD / HTTP/1.0 (framing of the answer).
      client_head: false,
      client_http10: false,
      # Which callbacks to ask Ruby for; finished: report the end even on
      # success (on_complete, instrumentation).
      on_headers: false,
      on_response: false,
      on_error: false,
      finished: false,
      # Seconds (Floats); required by start_exchange, unused by async_enqueue.
      connect_timeout: nil,
      header_timeout: nil,
      idle_timeout: nil,
      verify_tls: true,
      ca_file: nil,
      # Bytes response.body may buffer (1 where nothing is ever buffered).
      max_buffered_body: 1,
      # The protocol the client asked to switch to (WebSocket).
      upgrade: nil,
      # proxy_tunnel: the tcp:// address, and the protocol to name in the
      # 101 (nil answers a CONNECT with 200).
      tunnel_address: nil,
      tunnel_upgrade: nil
    }.freeze
    REQUIRED = %i[url].freeze
    # Fields Rust reads as true/false: any truthy value is true, so a nil
    # (`defined?(…) && …`) is false rather than left out of the Hash.
    FLAGS = FIELDS.select { |_, default| [true, false].include?(default) }.keys.freeze

    FIELDS.each_key { |name| attr_reader name }

    def initialize(**fields)
      unknown = fields.keys - FIELDS.keys
      raise ArgumentError, "unknown exchange spec field#{"s" if unknown.size > 1} #{unknown.join(", ")}" if unknown.any?

      missing = REQUIRED.select { |name| fields[name].nil? }
      raise ArgumentError, "exchange spec needs #{missing.join(", ")}" if missing.any?

      @fields = FIELDS.merge(fields) { |name, _, value| FLAGS.include?(name) ? (value ? true : false) : value }.freeze
      @fields.each { |name, value| instance_variable_set(:"@#{name}", value) }
      freeze
    end

    # A copy with `changes` applied (checked like new fields).
    def with(**changes)
      self.class.new(**@fields, **changes)
    end

    # The Hash the Native functions read: symbol keys, nil values left out.
    def to_native
      @fields.compact
    end

    def ==(other)
      other.is_a?(ExchangeSpec) && other.to_native == to_native
    end
    alias eql? ==

    def hash
      to_native.hash
    end
  end
end
