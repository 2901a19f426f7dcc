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

    # Thread variable: monotonic time the thread's current job started.
    BUSY_SINCE = :threaded_proxy_busy_since
    # Seconds past callback_timeout before a busy thread counts as stuck.
    STUCK_MARGIN = 1.0

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

    # Set by at_exit (below): the VM is about to kill every thread, so a
    # dying callback thread must not start a replacement (that would loop).
    def self.exiting!
      @exiting = true
    end

    def self.exiting?
      @exiting == true
    end

    def initialize
      @mutex = Mutex.new
      @records = {}
      @next_id = 0
      @threads = []
      @stuck = []
      @replaced = 0
      @watch = ConditionVariable.new
      @watcher = nil
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
      @mutex.synchronize do
        ours = @pid == Process.pid
        @stuck.select!(&:alive?)
        { callback_threads_alive: ours ? @threads.count(&:alive?) : 0, callback_threads_replaced: @replaced,
          callback_threads_stuck: ours ? @stuck.size : 0 }
      end
    end

    def stop
      @mutex.synchronize do
        Native.close_callbacks
        threads = @threads + [@watcher].compact
        @threads = []
        @watcher = nil
        @pid = nil
        @watch.broadcast
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
      @stuck = []
      @threads = Array.new(count) { |i| spawn_thread(i) }
      pid = @pid
      @watcher = Thread.new do
        Thread.current.name = "threaded-proxy-callback-watcher"
        watch(pid)
      end
    end

    # Called with @mutex held, and the caller stores the thread in
    # @threads[index] before it lets go: the thread waits for the lock
    # first, so it always finds itself in its slot.
    def spawn_thread(index)
      pid = @pid
      Thread.new do
        Thread.current.name = "threaded-proxy-callbacks-#{index}"
        Thread.current.report_on_exception = true
        @mutex.synchronize { nil }
        run(index, pid)
      end
    end

    # Runs jobs until the dispatcher stops or the watcher gave this
    # thread's slot to another (it was stuck in a callback).
    def run(index, pid)
      job = nil
      me = Thread.current
      while @pid == pid && @threads[index].equal?(me)
        job = Native.next_job(nil)
        next if job.nil? # interrupted: a pending Thread#raise/kill fires now

        me.thread_variable_set(BUSY_SINCE, Process.clock_gettime(Process::CLOCK_MONOTONIC))
        handle(job)
        me.thread_variable_set(BUSY_SINCE, nil)
        job = nil
      end
    rescue Exception => e # rubocop:disable Lint/RescueException
      # Outside any callback (a Thread#raise while waiting, a logger that
      # raised): never let it end the process (a thread's SystemExit would).
      warn("[threaded-proxy] callback thread #{index} failed: #{e.class}: #{e.message}")
    ensure
      retire(index, pid, job)
    end

    # The thread is ending: unless the dispatcher stops, a replacement takes
    # its place first (so the client's 500 never arrives before it), then
    # the job it was running, if any and unanswered, fails now.
    def retire(index, pid, job)
      record = @mutex.synchronize do
        if @pid == pid && !self.class.exiting? && @threads[index].equal?(Thread.current)
          @threads[index] = spawn_thread(index)
          @replaced += 1
        end
        job && @records[job.exchange_id]
      end
      return unless job # set while a job runs: the thread ended inside a callback

      message = "#{CALLBACKS[job.kind]} ended its callback thread (Thread#kill or similar)"
      log_line("[threaded-proxy] #{message} for #{where(record, job)}; the thread was replaced")
      job.fail(message) unless job.answered?
    end

    # Every quarter of callback_timeout: a thread whose callback has run
    # longer than callback_timeout and one more second (Rust has failed that
    # exchange by then, and dropped what was queued behind it) leaves its
    # slot to a new thread and finishes its callback on its own; the log
    # shows where it is stuck.
    def watch(pid)
      limit = Float(ThreadedProxy.configuration.callback_timeout)
      loop do
        stuck = @mutex.synchronize do
          @watch.wait(@mutex, limit / 4)
          replace_stuck(limit) if @pid == pid && !self.class.exiting?
        end
        break unless stuck

        stuck.each { |thread, seconds| log_stuck(thread, seconds, limit) }
      end
    rescue Exception => e # rubocop:disable Lint/RescueException
      warn("[threaded-proxy] callback watcher failed: #{e.class}: #{e.message}") if @pid == pid
    end

    def log_stuck(thread, seconds, limit)
      where = (thread.backtrace || []).reject { |l| l.include?(__FILE__) }.first(5).join("\n  ")
      log_line("[threaded-proxy] a callback has run #{format("%.1f", seconds)}s, past callback_timeout " \
               "(#{limit}s), on #{thread.name}; its exchange failed, the thread was replaced; it is at:\n  #{where}")
    end

    # Called with @mutex held; returns [[thread, seconds busy], …].
    def replace_stuck(limit)
      now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      @threads.each_with_index.filter_map do |thread, index|
        since = thread.thread_variable_get(BUSY_SINCE)
        next unless since && now - since > limit + STUCK_MARGIN

        @stuck << thread
        @threads[index] = spawn_thread(index)
        @replaced += 1
        [thread, now - since]
      end
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

# Runs before the VM kills the remaining threads at exit.
at_exit { ThreadedProxy::Dispatcher.exiting! }
