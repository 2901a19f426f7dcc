# frozen_string_literal: true

module ThreadedProxy
  # Runs the user's callbacks on a few gem-owned Ruby threads. Each thread
  # waits for jobs from Rust with the GVL released, so it costs nothing
  # while idle; no thread is created per exchange.
  #
  # Procs are kept here, keyed by exchange id, until Rust reports the
  # exchange finished: Rust only ever holds the id.
  #
  # A callback's fault stays inside its own exchange. Whatever it raises
  # (`exit`, SystemStackError, Interrupt, NoMemoryError, not only
  # StandardError) is rescued on the callback thread: the exchange answers
  # 500 or runs its on_error, the log names the callback and carries the
  # backtrace. Nothing else can arrive as an exception on these threads: a
  # real signal (SIGINT, SIGTERM) is handled by Ruby on the main thread, so
  # it still stops the process, and the VM ends these threads at exit with a
  # kill, which no rescue sees. A thread that dies anyway (Thread#kill from a
  # callback) is replaced from its own `ensure`, and its unanswered job fails
  # at once instead of waiting for callback_timeout. A callback still
  # running past callback_timeout (its exchange has already failed) keeps
  # its thread, but a watcher gives its slot to a new thread, so a hung
  # callback cannot starve the others either.
  class Dispatcher
    Record = Struct.new(:callbacks, :method, :url, :response, :failure, :failure_message, keyword_init: true)

    # Job kind (:headers, :response, :error, :finished) => the callback it
    # runs ("on_headers", …): listed once, by Rust (callbacks::KINDS). Each
    # job is handled by the private method of that callback's name.
    CALLBACKS = Native::Job::CALLBACKS

    # Lines of a callback's backtrace written to the log (a SystemStackError
    # has thousands).
    BACKTRACE_LINES = 30

    INSTANCE_LOCK = Mutex.new
    private_constant :INSTANCE_LOCK

    # The process's one dispatcher. Created under a lock: two threads racing
    # here must not get two dispatchers handing out the same exchange ids.
    # Once it exists the lock is skipped (the common case, on every exchange).
    def self.instance
      @instance || INSTANCE_LOCK.synchronize { @instance ||= new }
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
      # This process's callback threads (JobThreads), started on first use.
      @threads = nil
      # The process that started @threads: a forked child starts its own.
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

    # For ThreadedProxy.stats: callback threads of this process that are
    # alive, how many were replaced (died, or stuck in a callback past
    # callback_timeout) and how many stuck ones still run their callback.
    def thread_stats
      threads, ours = @mutex.synchronize { [@threads, @pid == Process.pid] }
      stats = threads&.stats || { alive: 0, replaced: 0, stuck: 0 }
      { callback_threads_alive: ours ? stats[:alive] : 0, callback_threads_replaced: stats[:replaced],
        callback_threads_stuck: ours ? stats[:stuck] : 0 }
    end

    def stop
      threads = @mutex.synchronize do
        @pid = nil
        @threads
      end
      return Native.close_callbacks unless threads

      threads.stop { Native.close_callbacks }
    end

    private

    # Ruby threads do not survive fork: a child starts its own (and forgets
    # its parent's exchanges, which the parent's runtime still owns).
    def start_threads
      @records = {}
      @pid = Process.pid
      @threads = JobThreads.new(
        name: "threaded-proxy-callbacks", count: ThreadedProxy.configuration.callback_threads,
        timeout: ThreadedProxy.configuration.callback_timeout,
        take: -> { Native.next_job(nil) }, run: method(:handle), lost: method(:lost),
        stuck: method(:log_stuck), log: method(:warn)
      ).start
    end

    # The job's thread ended inside its callback (a replacement already
    # took its place): the job fails now unless it was answered.
    def lost(job)
      record = @mutex.synchronize { @records[job.exchange_id] }
      message = "#{CALLBACKS[job.kind]} ended its callback thread (Thread#kill or similar)"
      log_line("[threaded-proxy] #{message} for #{where(record, job)}; the thread was replaced")
      job.fail(message) unless job.answered?
    end

    # A callback ran past callback_timeout (Rust has failed that exchange
    # and dropped what was queued behind it): its thread left its slot to a
    # new one and finishes the callback on its own; the log shows where.
    def log_stuck(thread, seconds)
      limit = Float(ThreadedProxy.configuration.callback_timeout)
      log_line("[threaded-proxy] a callback has run #{format("%.1f", seconds)}s, past callback_timeout " \
               "(#{limit}s), on #{thread.name}; its exchange failed, the thread was replaced; it is at:\n  " \
               "#{JobThreads.where(thread)}")
    end

    def handle(job)
      id = job.exchange_id
      record = @mutex.synchronize { job.kind == :finished ? @records.delete(id) : @records[id] }
      send(CALLBACKS.fetch(job.kind), job, record)
    rescue Exception => e # rubocop:disable Lint/RescueException -- see the class comment
      failed(job, record, e)
    end

    # A callback raised: log it (before the client hears of it), keep what
    # on_error of this exchange will be handed, and answer the exchange
    # (500, or its on_error).
    def failed(job, record, exception)
      callback = CALLBACKS[job.kind]
      log_callback_failure(callback, exception, record)
      return if job.answered?

      message = "#{callback} raised #{exception.class}: #{exception.message}"
      if record
        record.failure = callback_error(callback, exception, record)
        record.failure_message = message
      end
      job.fail(message)
    end

    # What on_error gets for a callback's exception: the gem's own errors
    # (BodyTooLargeError, InvalidHeaderError, …) unchanged; anything else as
    # a CallbackError whose `cause` is the very object raised (class,
    # message, backtrace and its own cause intact).
    def callback_error(callback, exception, record)
      return exception if exception.is_a?(Error)

      begin
        raise CallbackError.new("#{callback} raised #{exception.class}: #{exception.message}",
                                url: record&.url, kind: "callback", callback: callback),
              cause: exception
      rescue CallbackError => e
        e
      end
    end

    def on_headers(job, record)
      response = Response.new(job.status, job.reason, job.headers)
      record.callbacks[:on_headers].call(response)
      record.response = response
      job.amend(response.status, response.reason_if_changed, response.header_pairs)
    end

    def on_response(job, record)
      response = Response.new(job.status, job.reason, job.headers, job: job)
      responder = Responder.new(job)
      record.callbacks[:on_response].call(response, responder)
      record.response = response
      return if responder.closed?
      if response.body_consumed?
        raise ResponseBodyAlreadyConsumedError.new(
          "on_response read response.body but rendered nothing; call responder.render", url: record.url
        )
      end

      job.amend(response.status, response.reason_if_changed, response.header_pairs)
    end

    # An error caused by an earlier callback of this exchange reaches
    # on_error as what that callback raised (see #callback_error); Rust only
    # knows its message, which identifies it.
    def on_error(job, record)
      responder = Responder.new(job)
      error = job.error
      if record&.failure && error.kind == "callback" && error.message == record.failure_message
        error = record.failure
        record.failure = nil
      end
      record.callbacks[:on_error].call(error, responder)
      job.pass unless responder.closed? # the default answer (502, 504, …)
    end

    # The exchange finished: on_complete, then the log line and the event,
    # even when on_complete raised.
    def on_complete(job, record)
      summary = job.summary
      error = summary[:error]
      if record && error.nil? && (callback = record.callbacks[:on_complete])
        head = job.headers
        response = head ? Response.new(job.status, job.reason, head) : (record.response || Response.new(summary[:status], nil, []))
        callback.call(response)
      end
    ensure
      if summary
        log_error(summary) if summary[:error]
        instrument(summary)
      end
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

    # "GET http://…" for log lines; on_complete's record is already gone,
    # its job's summary still names the exchange.
    def where(record, job = nil)
      return "#{record.method.to_s.upcase} #{record.url}" if record

      summary = job&.kind == :finished ? job.summary : nil
      summary ? "#{summary[:method]} #{summary[:url]}" : "unknown exchange"
    end

    # One log entry: which callback, what it raised, for which exchange,
    # then the backtrace (and the causes' first lines).
    def log_callback_failure(callback, exception, record)
      lines = ["[threaded-proxy] callback raised in #{callback} for #{where(record)}: " \
               "#{exception.class}: #{exception.message}"]
      backtrace = exception.backtrace || []
      lines.concat(backtrace.first(BACKTRACE_LINES).map { |l| "  #{l}" })
      lines << "  … #{backtrace.size - BACKTRACE_LINES} more lines" if backtrace.size > BACKTRACE_LINES
      cause = exception.cause
      while cause
        lines << "  caused by #{cause.class}: #{cause.message}"
        lines << "    #{cause.backtrace.first}" if cause.backtrace&.first
        cause = cause.cause
      end
      log_line(lines.join("\n"))
    end

    # A logger that raises must not keep an exchange from its answer.
    def log_line(text)
      logger = ThreadedProxy.configuration.logger_or_default
      logger ? logger.error(text) : warn(text)
    rescue StandardError => e
      warn("[threaded-proxy] the logger raised #{e.class}: #{e.message}; the line was: #{text}")
    end
  end
end

