# frozen_string_literal: true

module ThreadedProxy
  # Process-wide settings. Timeouts are defaults for each proxy_fetch call;
  # limits and thread counts apply to the whole process.
  class Configuration
    # fd_budget: the file descriptors running exchanges may hold together
    # (a spliced body counts five, a copied one two); past it new exchanges
    # answer 503 and bodies are copied instead of spliced.
    attr_accessor :max_connections, :max_connections_per_origin, :fd_budget,
                  :connect_timeout, :header_timeout, :idle_timeout,
                  :callback_threads, :runtime_threads, :callback_timeout,
                  :shutdown_timeout, :max_buffered_body, :allowed_hosts,
                  :pool_idle_timeout, :pool_max_idle_per_host, :logger

    # ThreadedProxy::Metrics: the origin hosts ("host" or "host:port") whose
    # latency histograms get their own host label; any other origin is
    # "other", so URLs built from user input cannot multiply the series.
    attr_accessor :metrics_hosts
    # true: plain-HTTP bodies of known length go socket to socket with
    # splice(2) (Linux); false: always copied (the path other systems take);
    # nil (default): true unless THREADED_PROXY_ZERO_COPY=0.
    attr_accessor :zero_copy

    # proxy_async (deferred delivery): the queue, either an SQLite file
    # (async_queue_path, shared by the processes of a machine) or, when
    # async_queue_url is set, a PostgreSQL database ("postgres://…", shared
    # by processes on any number of machines); attempts at once per process,
    # attempts started per second by all processes of the queue together
    # (rate nil = no limit), seconds per attempt, attempts before a request
    # is dead, first retry delay (doubling, with jitter) and its cap, the
    # statuses that count as delivered and those worth another attempt
    # (each a Range, an Integer or an Array of them; any other status makes
    # the request dead at once).
    attr_accessor :async_queue_path, :async_queue_url, :async_concurrency, :async_rate, :async_timeout,
                  :async_max_attempts, :async_backoff, :async_backoff_max, :async_success,
                  :async_retry_on

    # Event streams: events kept per channel for Last-Event-ID replay (those
    # published with an id), and the bytes a stream may have queued unwritten
    # before it is disconnected as too slow.
    attr_accessor :event_replay, :event_queue_bytes
    # Event streams across processes and machines: a PostgreSQL URL
    # ("postgres://…"). publish stores the event and NOTIFYs; each process
    # serving streams LISTENs and fans out to its own. nil (default): events
    # reach the subscribers of the publishing process only.
    attr_accessor :events_url

    # The defaults Rust owns (runtime.rs Settings, delivery's
    # DeliverySettings): limits, pool, callback timeout, deferred delivery.
    # fd_budget is the soft descriptor limit less room for the app server
    # and the app, max_connections as many copied exchanges as it holds.
    def initialize
      native = Native.default_settings
      @fd_budget = native.fetch(:fd_budget)
      @max_connections = native.fetch(:max_connections)
      @max_connections_per_origin = native.fetch(:max_connections_per_origin)
      @runtime_threads = native.fetch(:runtime_threads) # 0: one per core, at most 4
      @callback_timeout = native.fetch(:callback_timeout)
      @pool_idle_timeout = native.fetch(:pool_idle_timeout)
      @pool_max_idle_per_host = native.fetch(:pool_max_idle_per_host)
      @async_queue_path = native.fetch(:async_queue_path)
      @async_concurrency = native.fetch(:async_concurrency)
      @async_rate = native.fetch(:async_rate).zero? ? nil : native.fetch(:async_rate)
      @async_timeout = native.fetch(:async_timeout)
      @async_max_attempts = native.fetch(:async_max_attempts)
      @async_backoff = native.fetch(:async_backoff)
      @async_backoff_max = native.fetch(:async_backoff_max)
      @async_success = status_setting(native.fetch(:async_success))
      @async_retry_on = status_setting(native.fetch(:async_retry_on))
      # Ruby's own: per-call defaults and what only Ruby uses.
      @connect_timeout = 5.0
      @header_timeout = 60.0
      @idle_timeout = 60.0
      @callback_threads = 2
      @shutdown_timeout = 25.0
      @max_buffered_body = 10 * 1024 * 1024
      @allowed_hosts = nil
      @logger = nil
      @metrics_hosts = []
      @zero_copy = nil
      @async_queue_url = nil
      @event_replay = 100
      @event_queue_bytes = 1024 * 1024
      @events_url = nil
    end

    # Pushes the settings to the Rust side (limits take effect at once).
    def apply!
      validate!
      Native.configure(
        max_connections: Integer(max_connections),
        max_connections_per_origin: Integer(max_connections_per_origin),
        fd_budget: Integer(fd_budget),
        metrics_hosts: Array(metrics_hosts).map(&:to_s),
        runtime_threads: Integer(runtime_threads),
        callback_timeout: Float(callback_timeout),
        pool_idle_timeout: Float(pool_idle_timeout),
        pool_max_idle_per_host: Integer(pool_max_idle_per_host),
        **(zero_copy.nil? ? {} : { zero_copy: })
      )
    end

    def logger_or_default
      logger || (defined?(::Rails) && ::Rails.respond_to?(:logger) ? ::Rails.logger : nil)
    end

    private

    # [[low, high], …] from Rust as the forms users write: a lone Range
    # (200..299), or an Array of statuses and Ranges ([429, 500..599]).
    def status_setting(pairs)
      entries = pairs.map { |low, high| low == high ? low : low..high }
      entries.size == 1 && entries.first.is_a?(Range) ? entries.first : entries
    end

    def validate!
      { max_connections:, max_connections_per_origin:, fd_budget:, callback_threads:, event_queue_bytes: }.each do |name, value|
        raise ArgumentError, "#{name} must be a positive Integer" unless value.is_a?(Integer) && value.positive?
      end
      { connect_timeout:, header_timeout:, idle_timeout:, callback_timeout:, shutdown_timeout: }.each do |name, value|
        raise ArgumentError, "#{name} must be a positive number" unless value.is_a?(Numeric) && value.positive?
      end
      unless metrics_hosts.nil? || metrics_hosts.is_a?(String) ||
             (metrics_hosts.is_a?(Array) && metrics_hosts.all? { |h| h.is_a?(String) || h.is_a?(Symbol) })
        raise ArgumentError, "metrics_hosts must be an Array of host names"
      end
      raise ArgumentError, "event_replay must be an Integer >= 0" unless event_replay.is_a?(Integer) && event_replay >= 0
      unless events_url.nil? || events_url.to_s.match?(%r{\Apostgres(ql)?://})
        raise ArgumentError, "events_url must be nil or a postgres:// URL"
      end
      raise ArgumentError, "zero_copy must be true, false or nil" unless [true, false, nil].include?(zero_copy)
      return if allowed_hosts.nil? || allowed_hosts.is_a?(Array)

      raise ArgumentError, "allowed_hosts must be nil or an Array of Strings and Regexps"
    end
  end
end
