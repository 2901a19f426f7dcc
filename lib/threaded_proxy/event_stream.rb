# frozen_string_literal: true

require "socket"

module ThreadedProxy
  # One stream_events call on the Ruby side: checks the arguments, takes the
  # client socket (a full hijack, as proxy_fetch does) and hands it to Rust,
  # which registers it under its channels and writes every event published
  # to them. Nothing in Ruby runs for the stream afterwards.
  class EventStream
    # Headers the stream's own head sets; a caller's would contradict it.
    RESERVED_HEADERS = %w[content-type content-length transfer-encoding connection].freeze

    def initialize(env, channels, retry: nil, heartbeat: 15, headers: {}, replay: true)
      @env = env
      @channels = Events.check_channels(channels)
      # `retry` is a keyword: its value is only reachable through the binding.
      @retry = check_retry(binding.local_variable_get(:retry))
      @heartbeat = check_heartbeat(heartbeat)
      @headers = check_headers(headers)
      raise ArgumentError, "replay must be true or false" unless [true, false].include?(replay)

      @replay = replay
    end

    # Starts the stream; returns the Rack response for the app to return.
    def start
      ThreadedProxy.ensure_configured
      Events.listen
      io = Hijack.take(@env)
      return start_on_socket(io) if io

      start_in_request_thread
    end

    private

    def spec(end_when_idle: false)
      last_id = @env["HTTP_LAST_EVENT_ID"] if @replay
      {
        channels: @channels, retry: @retry, heartbeat: @heartbeat.to_f, headers: @headers,
        last_event_id: last_id.nil? || last_id.empty? ? nil : last_id,
        queue_bytes: Integer(ThreadedProxy.configuration.event_queue_bytes),
        end_when_idle:
      }
    end

    def start_on_socket(io)
      begin
        Native.stream_events(io.fileno, spec)
      rescue OverloadError
        io.write(Exchange::OVERLOADED) rescue nil # rubocop:disable Style/RescueModifier
      ensure
        io.close
      end
      Exchange.hijacked_response
    end

    # Without hijack (rack-test): Rust writes the stream into a socket pair
    # and ends it after `heartbeat` seconds without an event; the request
    # thread reads it as a streaming body.
    def start_in_request_thread
      ours, theirs = UNIXSocket.pair(:STREAM)
      begin
        Native.stream_events(theirs.fileno, spec(end_when_idle: true))
      rescue OverloadError
        ours.close
        return [503, Exchange::OVERLOAD_HEADERS.dup, [Exchange::OVERLOAD_BODY]]
      ensure
        theirs.close # Rust has its own duplicate; the reader needs the EOF
      end
      ResponseReader.new(ours).rack_response
    end

    def check_retry(value)
      return nil if value.nil?
      raise ArgumentError, "retry must be nil or a non-negative Integer (milliseconds)" unless value.is_a?(Integer) && !value.negative?

      value
    end

    def check_heartbeat(value)
      raise ArgumentError, "heartbeat must be a positive number of seconds" unless value.is_a?(Numeric) && value.positive?

      value
    end

    def check_headers(headers)
      raise ArgumentError, "headers must be a Hash" unless headers.is_a?(Hash)

      headers.map do |name, value|
        name = name.to_s
        raise ArgumentError, "header name #{name.inspect} is not a token" unless Options::TOKEN.match?(name)
        raise ArgumentError, "header #{name} is set by stream_events" if RESERVED_HEADERS.include?(name.downcase)

        value = value.to_s
        raise ArgumentError, "header #{name} has CR, LF or NUL in its value" if Options::FORBIDDEN_BYTES.match?(value)

        [name, value]
      end
    end
  end
end
