# frozen_string_literal: true

module ThreadedProxy
  # A fixed set of Ruby threads that take jobs from Rust and run the user's
  # code, kept whole whatever that code does. A job that ends its thread
  # (Thread#kill, exit slipping past a rescue) gets a replacement thread
  # first, then `lost` answers the job. A job that runs past `timeout` (and
  # STUCK_MARGIN) leaves its slot to a new thread and finishes on its own;
  # `stuck` hears of it. The Dispatcher (exchange callbacks) and every
  # Machine (routing blocks) own one: this is the one copy of that rule.
  #
  # Threads exist only in the process that started them: after fork the
  # owner starts a new set (the Dispatcher does, by pid).
  class JobThreads
    # Thread variable: monotonic time the thread's current job started.
    BUSY_SINCE = :threaded_proxy_busy_since
    # Seconds past the timeout before a busy thread counts as stuck: Rust
    # has failed the job at the timeout; this leaves it time to say so.
    STUCK_MARGIN = 1.0
    # The gem's own frames, left out of a stuck thread's "it is at".
    LIB_DIR = File.expand_path("..", __dir__)

    # Set by at_exit (below): the VM is about to kill every thread, so a
    # dying thread must not start a replacement (that would loop).
    def self.exiting!
      @exiting = true
    end

    def self.exiting?
      @exiting == true
    end

    # Where a thread is, in the user's code: its first five frames outside
    # the gem.
    def self.where(thread)
      (thread.backtrace || []).reject { |line| line.start_with?(LIB_DIR) }.first(5).join("\n  ")
    end

    # name: thread names ("#{name}-0", …, "#{name}-watcher"); count: how
    # many; timeout: seconds a job may run before its thread is replaced.
    # take: blocks (GVL released) for the next job, nil when interrupted or
    # closed; run: runs one job (rescuing what the user's code raises);
    # lost: answers a job whose thread ended inside it; stuck: hears of a
    # thread replaced by the watcher (thread, seconds busy); log: the set's
    # own failures (a String).
    def initialize(name:, count:, timeout:, take:, run:, lost:, stuck:, log:)
      @name = name
      @count = count
      @timeout = Float(timeout)
      @take = take
      @run = run
      @lost = lost
      @stuck_hook = stuck
      @log = log
      @mutex = Mutex.new
      @watch = ConditionVariable.new
      @threads = []
      @stuck = []
      @replaced = 0
      @watcher = nil
      @open = false
    end

    def start
      @mutex.synchronize do
        @open = true
        @threads = Array.new(@count) { |index| spawn(index) }
        @watcher = Thread.new do
          Thread.current.name = "#{@name}-watcher"
          watch
        end
      end
      self
    end

    # Stops every thread: the block (run under the set's lock) closes the
    # job source so a thread waiting for a job wakes; each thread gets two
    # seconds to finish.
    def stop
      threads = @mutex.synchronize do
        @open = false
        yield if block_given?
        @watch.broadcast
        @threads + [@watcher].compact
      end
      threads.each { |thread| thread.join(2) unless thread.equal?(Thread.current) }
    end

    # alive: threads of the set alive now; replaced: threads replaced since
    # the start (died, or stuck past the timeout); stuck: replaced threads
    # still running their job.
    def stats
      @mutex.synchronize do
        @stuck.select!(&:alive?)
        { alive: @open ? @threads.count(&:alive?) : 0, replaced: @replaced, stuck: @stuck.size }
      end
    end

    private

    # Called with @mutex held, and the caller stores the thread in
    # @threads[index] before it lets go: the thread waits for the lock
    # first, so it always finds itself in its slot.
    def spawn(index)
      Thread.new do
        Thread.current.name = "#{@name}-#{index}"
        @mutex.synchronize { nil }
        loop_jobs(index)
      end
    end

    # Runs jobs until the set stops or the watcher gave this thread's slot
    # to another (it was stuck in a job).
    def loop_jobs(index)
      me = Thread.current
      job = nil
      while @open && @threads[index].equal?(me)
        job = @take.call
        next if job.nil? # interrupted (a pending Thread#raise/kill fires now) or closed

        me.thread_variable_set(BUSY_SINCE, Process.clock_gettime(Process::CLOCK_MONOTONIC))
        @run.call(job)
        me.thread_variable_set(BUSY_SINCE, nil)
        job = nil
      end
    rescue Exception => e # rubocop:disable Lint/RescueException -- never end the process from here
      # Outside any job (a Thread#raise while waiting, a logger that
      # raised): a thread's SystemExit would end the process.
      @log.call("[threaded-proxy] #{@name}-#{index} failed: #{e.class}: #{e.message}")
    ensure
      retire(index, job)
    end

    # The thread is ending: unless the set stops, a replacement takes its
    # slot first (so the client's answer never arrives before it), then the
    # job it was running, if any, is answered by `lost`.
    def retire(index, job)
      @mutex.synchronize do
        if @open && !self.class.exiting? && @threads[index].equal?(Thread.current)
          @threads[index] = spawn(index)
          @replaced += 1
        end
      end
      @lost.call(job) if job
    end

    # Every quarter of the timeout: a thread whose job has run past the
    # timeout (and STUCK_MARGIN) leaves its slot to a new thread.
    def watch
      loop do
        stuck = @mutex.synchronize do
          @watch.wait(@mutex, @timeout / 4)
          replace_stuck if @open && !self.class.exiting?
        end
        break unless stuck

        stuck.each { |thread, seconds| @stuck_hook.call(thread, seconds) }
      end
    rescue Exception => e # rubocop:disable Lint/RescueException
      @log.call("[threaded-proxy] #{@name}-watcher failed: #{e.class}: #{e.message}")
    end

    # Called with @mutex held; returns [[thread, seconds busy], …].
    def replace_stuck
      now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      @threads.each_with_index.filter_map do |thread, index|
        since = thread.thread_variable_get(BUSY_SINCE)
        next unless since && now - since > @timeout + STUCK_MARGIN

        @stuck << thread
        @threads[index] = spawn(index)
        @replaced += 1
        [thread, now - since]
      end
    end
  end
end

# Runs before the VM kills the remaining threads at exit.
at_exit { ThreadedProxy::JobThreads.exiting! }
