# frozen_string_literal: true

module ThreadedProxy
  # Deferred delivery: `proxy_async` stores the request durably (an SQLite
  # file shared by the processes of a machine, or PostgreSQL for several
  # machines), the action answers its client, and the Rust runtime delivers
  # in the background with the async_* settings (concurrency, rate,
  # timeout, retries with backoff).
  module Async
    KNOWN = %i[method headers body respond_with].freeze
    # Request headers never stored: they describe the client's connection
    # or are computed again for the delivery.
    NOT_STORED = (Options::HOP_BY_HOP + %w[host content-length expect]).freeze

    class << self
      # [id, status to answer] for a request taken from `env`.
      def enqueue(env, url, options)
        options = options.transform_keys(&:to_sym)
        unknown = options.keys - KNOWN
        raise ArgumentError, "unknown option#{"s" if unknown.size > 1} #{unknown.map(&:inspect).join(", ")} (known: #{KNOWN.join(", ")})" if unknown.any?

        status = options.fetch(:respond_with, 202)
        raise ArgumentError, "respond_with must be an Integer status (100..599)" unless status.is_a?(Integer) && (100..599).cover?(status)

        checked = Options.new(url, { method: options.fetch(:method, :post), headers: options.fetch(:headers, {}),
                                     body: options.fetch(:body, :rack) })
        spec = ExchangeSpec.new(method: checked.method, url: checked.url, headers: headers(env, checked),
                                **RequestBody.fields(env, checked.body))
        start
        [Native.async_enqueue(spec.to_native), status]
      end

      # Starts delivering in this process (idempotent; again after fork).
      # With preload_app!, call it in Puma's on_worker_boot so workers, not
      # the master, deliver.
      def start
        Native.async_start(settings) unless Native.async_running?
        true
      end

      def settings
        c = ThreadedProxy.configuration
        rate = c.async_rate.nil? ? 0.0 : Float(c.async_rate)
        queue_location(c).merge(
          concurrency: positive_integer(:async_concurrency, c.async_concurrency),
          rate: rate.negative? ? 0.0 : rate,
          timeout: positive(:async_timeout, c.async_timeout),
          connect_timeout: [positive(:connect_timeout, c.connect_timeout), positive(:async_timeout, c.async_timeout)].min,
          max_attempts: positive_integer(:async_max_attempts, c.async_max_attempts),
          backoff: positive(:async_backoff, c.async_backoff),
          backoff_max: positive(:async_backoff_max, c.async_backoff_max),
          success: status_ranges(:async_success, c.async_success),
          retry: status_ranges(:async_retry_on, c.async_retry_on)
        )
      end

      # Stops claiming, lets running attempts end until `deadline`, then
      # gives what is left back to the queue. True when nothing was cut.
      def shutdown(deadline)
        return true unless Native.async_running?

        Native.async_stop_claiming
        drained = wait_idle(deadline)
        returned = Native.async_abandon
        if returned.positive?
          message = "threaded-proxy: deferred delivery stopped; #{returned} unfinished request(s) returned to the queue"
          (logger = ThreadedProxy.configuration.logger_or_default) ? logger.warn(message) : warn(message)
        end
        drained
      end

      private

      POSTGRES_URL = %r{\Apostgres(ql)?://}.freeze

      def queue_location(config)
        url = config.async_queue_url
        return { path: File.expand_path(config.async_queue_path.to_s) } if url.nil? || url.to_s.empty?
        raise ArgumentError, "async_queue_url must be a postgres:// or postgresql:// URL (got #{url.to_s[/\A[^:]*/].inspect} scheme)" unless url.to_s.match?(POSTGRES_URL)

        { url: url.to_s }
      end

      def headers(env, checked)
        pairs = []
        if checked.body == :rack && env["CONTENT_TYPE"] && !env["CONTENT_TYPE"].empty?
          pairs << ["Content-Type", env["CONTENT_TYPE"]]
        end
        own = checked.headers.reject { |name, _| NOT_STORED.include?(name.to_s.downcase) }
        names = own.map { |name, _| name.to_s.downcase }
        pairs.reject { |name, _| names.include?(name.downcase) } + own
      end

      def wait_idle(deadline)
        ThreadedProxy.wait_interruptibly(deadline) { |left| Native.async_wait_idle(left) }
      end

      def positive(name, value)
        raise ArgumentError, "#{name} must be a positive number" unless value.is_a?(Numeric) && value.positive?

        Float(value)
      end

      def positive_integer(name, value)
        raise ArgumentError, "#{name} must be a positive Integer" unless value.is_a?(Integer) && value.positive?

        value
      end

      # [[low, high], …] from an Integer, a Range or an Array of them.
      def status_ranges(name, value)
        Array(value.is_a?(Range) ? [value] : value).map do |entry|
          low, high = case entry
                      when Integer then [entry, entry]
                      when Range
                        raise ArgumentError, "#{name} ranges must be of Integers" unless entry.begin.is_a?(Integer) && entry.end.is_a?(Integer)

                        [entry.begin, entry.exclude_end? ? entry.end - 1 : entry.end]
                      else raise ArgumentError, "#{name} must be an Integer, a Range or an Array of them"
                      end
          raise ArgumentError, "#{name}: #{entry.inspect} is not within 100..599" unless low <= high && (100..599).cover?(low) && (100..599).cover?(high)

          [low, high]
        end
      end
    end
  end
end
