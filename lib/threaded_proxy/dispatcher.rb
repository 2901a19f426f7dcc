# frozen_string_literal: true

module ThreadedProxy
  # Runs the user's callbacks on a few gem-owned Ruby threads. Each thread
  # waits for jobs from Rust with the GVL released, so it costs nothing
  # while idle; no thread is created per exchange.
  #
  # Procs are kept here, keyed by exchange id, until Rust reports the
  # exchange finished: Rust only ever holds the id.
  class Dispatcher
    Record = Struct.new(:config, :method, :url, :response, keyword_init: true)

    def self.instance
      @instance ||= new
    end

    # Whether anyone subscribed to the threaded_proxy.fetch event.
    def self.instrumented?
      defined?(::ActiveSupport::Notifications) &&
        ::ActiveSupport::Notifications.notifier.listening?("threaded_proxy.fetch")
    end

    def initialize
      @mutex = Mutex.new
      @records = {}
      @next_id = 0
      @threads = []
      @pid = nil
    end

    # Keeps the exchange's callbacks and returns its id.
    def register(record)
      @mutex.synchronize do
        start_threads unless @pid == Process.pid
        @next_id += 1
        @records[@next_id] = record
        @next_id
      end
    end

    # Starts this process's callback threads if they are not running yet.
    def start
      @mutex.synchronize { start_threads unless @pid == Process.pid }
      self
    end

    def pending
      @mutex.synchronize { @records.size }
    end

    def stop
      @mutex.synchronize do
        Native.close_callbacks
        threads = @threads
        @threads = []
        @pid = nil
        threads
      end.each { |t| t.join(2) }
    end

    private

    # Ruby threads do not survive fork: a child starts its own (and forgets
    # its parent's exchanges, which the parent's runtime still owns).
    def start_threads
      @records = {}
      @pid = Process.pid
      count = ThreadedProxy.configuration.callback_threads
      @threads = Array.new(count) do |i|
        Thread.new do
          Thread.current.name = "threaded-proxy-callbacks-#{i}"
          Thread.current.report_on_exception = true
          run
        end
      end
    end

    def run
      pid = Process.pid
      while @pid == pid
        job = Native.next_job(nil)
        next if job.nil? # interrupted: a pending Thread#raise/kill fires now

        handle(job)
      end
    end

    def handle(job)
      id = job.exchange_id
      record = @mutex.synchronize { job.kind == "finished" ? @records.delete(id) : @records[id] }
      case job.kind
      when "headers" then on_headers(job, record)
      when "response" then on_response(job, record)
      when "error" then on_error(job, record)
      when "finished" then finished(job, record)
      end
    rescue StandardError, ScriptError => e
      log_callback_failure(e, record)
      job.fail("#{e.class}: #{e.message}") unless job.answered?
    end

    def on_headers(job, record)
      response = Response.new(job.status, job.reason, job.headers)
      record.config[:on_headers].call(response)
      record.response = response
      job.continue(response.status, response.reason_if_changed, response.header_pairs)
    end

    def on_response(job, record)
      response = Response.new(job.status, job.reason, job.headers, job: job)
      responder = Responder.new(job)
      record.config[:on_response].call(response, responder)
      record.response = response
      return if responder.closed?
      if response.body_consumed?
        raise ResponseBodyAlreadyConsumedError,
              "on_response read response.body but rendered nothing; call responder.render"
      end

      job.continue(response.status, response.reason_if_changed, response.header_pairs)
    end

    def on_error(job, record)
      responder = Responder.new(job)
      record.config[:on_error].call(job.error, responder)
      job.continue(0, nil, []) unless responder.closed?
    end

    def finished(job, record)
      summary = job.summary
      error = summary[:error]
      if record && error.nil? && (callback = record.config[:on_complete])
        head = job.headers
        response = head ? Response.new(job.status, job.reason, head) : (record.response || Response.new(summary[:status], nil, []))
        callback.call(response)
      end
      log_error(summary) if error
      instrument(summary)
    end

    def instrument(summary)
      return unless defined?(::ActiveSupport::Notifications)

      ::ActiveSupport::Notifications.instrument("threaded_proxy.fetch", summary)
    end

    def log_error(summary)
      logger = ThreadedProxy.configuration.logger_or_default
      return unless logger

      error = summary[:error]
      line = "[threaded-proxy] #{summary[:method]} #{summary[:url]} failed (#{error.kind}): " \
             "#{error.class}: #{error.message} (status #{summary[:status] || "-"}, " \
             "#{format("%.3f", summary[:total_time])}s)"
      # A client that leaves is routine, not an error of ours.
      error.kind == "client" ? logger.info(line) : logger.error(line)
    end

    def log_callback_failure(exception, record)
      logger = ThreadedProxy.configuration.logger_or_default
      where = record ? "#{record.method} #{record.url}" : "unknown exchange"
      message = "[threaded-proxy] callback raised for #{where}: #{exception.class}: #{exception.message}"
      if logger
        logger.error(message)
      else
        warn(message)
      end
    end
  end
end
