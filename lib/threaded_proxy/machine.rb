# frozen_string_literal: true

require "logger"

module ThreadedProxy
  # A content-aware TCP router, ProxyMachine's model with Rust moving the
  # bytes:
  #
  #   machine = ThreadedProxy::Machine.new(host: "0.0.0.0", port: 9418) do |data|
  #     data.start_with?("PING") ? { remote: "127.0.0.1:7000" } : { noop: true }
  #   end
  #   machine.start   # returns once listening; machine.port says where
  #   machine.stop(10)
  #
  # Rust accepts and reads each client; the block is called with the bytes
  # so far (a binary String), again each time more arrive, until it
  # answers `{ remote: "host:port" }` (with `data:`, `reply:`,
  # `connect_timeout:`, `inactivity_timeout:`), `{ close: true }`,
  # `{ close: "bytes" }` or `{ noop: true }`. Anything else closes the
  # connection. After routing no byte enters Ruby.
  #
  # The block runs on a few Ruby threads the machine owns (`threads:`),
  # which wait for work with the GVL released: no thread per connection.
  # Whatever the block does (raise, `exit`, hang, answer garbage) costs its
  # own connection only: an exception is rescued and logged and the
  # connection closed; a block past `route_timeout` has its connection
  # closed by Rust, and the watcher gives its thread's slot to a new thread.
  class Machine
    # ProxyMachine's answer keys that come with `remote:`.
    REMOTE_KEYS = %i[remote data reply connect_timeout inactivity_timeout].freeze
    BACKTRACE_LINES = 20

    attr_reader :host

    REGISTRY_LOCK = Mutex.new
    private_constant :REGISTRY_LOCK
    @running = []

    # The machines started in this process and not stopped (one inherited
    # through fork is not: its runtime stayed in the parent).
    def self.running
      REGISTRY_LOCK.synchronize { @running.filter_map { |pid, machine| machine if pid == Process.pid } }
    end

    def self.register(machine, add)
      REGISTRY_LOCK.synchronize do
        @running.reject! { |_pid, m| m.equal?(machine) }
        @running << [Process.pid, machine] if add
      end
    end

    # For ThreadedProxy::Metrics: `[["machine_<stat>", number], …]`, each
    # stat summed over this process's running machines (nothing when none
    # runs).
    def self.metric_values
      totals = Hash.new(0)
      running.each { |machine| machine.stats.each { |name, value| totals[name] += value if value.is_a?(Numeric) } }
      totals.map { |name, value| ["machine_#{name}", value] }
    end

    def initialize(host: "127.0.0.1", port: 0, max_route_bytes: 64 * 1024, route_timeout: 5.0, connect_timeout: 10.0,
                   threads: 2, reuse_port: false, logger: nil, on_connect_error: nil, on_inactivity_error: nil,
                   &router)
      raise ArgumentError, "Machine.new needs a routing block" unless router
      raise ArgumentError, "port must be an Integer in 0..65535" unless port.is_a?(Integer) && port.between?(0, 65_535)
      { max_route_bytes:, threads: }.each do |name, value|
        raise ArgumentError, "#{name} must be a positive Integer" unless value.is_a?(Integer) && value.positive?
      end
      { route_timeout:, connect_timeout: }.each do |name, value|
        raise ArgumentError, "#{name} must be a positive number" unless value.is_a?(Numeric) && value.positive?
      end

      @host = host.to_s
      @port = port
      @options = { host: @host, port:, max_route_bytes:, route_timeout: Float(route_timeout),
                   connect_timeout: Float(connect_timeout), reuse_port: reuse_port ? true : false }
      @router = router
      @thread_count = threads
      @logger = logger
      @on_connect_error = on_connect_error
      @on_inactivity_error = on_inactivity_error
      @mutex = Mutex.new
      # The routing threads (JobThreads), from start to stop.
      @threads = nil
      @native = nil
      @closed = false
    end

    # Binds and starts accepting; returns once the port listens. Raises
    # IOError when it cannot (port taken, unknown host).
    def start
      @mutex.synchronize do
        raise Error, "this machine was already started" if @native

        ThreadedProxy.ensure_configured
        @native = Native::Machine.start(@options)
        native = @native
        @threads = JobThreads.new(
          name: "threaded-proxy-machine", count: @thread_count, timeout: @options[:route_timeout],
          take: -> { native.next_job(nil) }, run: method(:handle), lost: method(:lost),
          stuck: method(:log_stuck), log: ->(text) { log(:error, text) }
        ).start
      end
      self.class.register(self, true)
      self
    end

    # The port listened on (the one picked when `port: 0` was asked).
    def port
      @native ? @native.port : @port
    end

    # Waits up to `timeout` seconds until no connection is open; true when
    # none is.
    def wait_idle(timeout)
      @native ? @native.wait_idle(Float(timeout)) : true
    end

    def running?
      !@native.nil? && !@closed
    end

    # Closes the port (a connect after this returns is refused); open
    # connections go on. `stop` does this first; the exe calls it before
    # it logs that it no longer accepts.
    def stop_accepting
      @native&.stop_accepting
      self
    end

    # Stops accepting, waits up to `timeout` seconds (nil: as long as it
    # takes) for the open connections to end, then closes the rest. True
    # when every connection ended by itself.
    def stop(timeout = 10)
      native = @native
      return true if native.nil? || @closed

      native.stop_accepting
      drained = if timeout.nil?
                  nil until native.wait_idle(60)
                  true
                else
                  native.wait_idle(Float(timeout))
                end
      unless drained
        native.cut
        native.wait_idle(2)
      end
      close_threads(native)
      self.class.register(self, false)
      drained
    end

    # Counters: accepted, open, routed, closed_by_block, connect_errors,
    # inactivity_cuts, route_failures, route_overflows, bytes_to_remote,
    # bytes_to_client, bytes_spliced, route_calls, route_seconds (the
    # block's time, summed), jobs_queued, threads_alive, threads_replaced.
    def stats
      native = @native
      return {} unless native

      stats = native.stats
      stats[:route_seconds] = stats.delete(:route_nanos) / 1e9
      threads = @threads.stats
      stats[:threads_alive] = @closed ? 0 : threads[:alive]
      stats[:threads_replaced] = threads[:replaced]
      stats
    end

    private

    def close_threads(native)
      @mutex.synchronize { @closed = true }
      @threads.stop { native.close_jobs }
    end

    # The routing block ended its thread (a replacement took its place): a
    # job it left unanswered closes its connection now.
    def lost(job)
      return if job.answered?

      log(:error, "[threaded-proxy] the routing block ended its thread (Thread#kill or similar); " \
                  "connection closed, thread replaced")
      job.fail
    end

    # A block ran past route_timeout (Rust closed that connection already):
    # its thread left its slot to a new one, so a hung block cannot starve
    # the others.
    def log_stuck(thread, seconds)
      log(:error, "[threaded-proxy] a routing block has run #{format("%.1f", seconds)}s, past route_timeout " \
                  "(#{@options[:route_timeout]}s), on #{thread.name}; its connection was closed, the thread " \
                  "replaced; it is at:\n  #{JobThreads.where(thread)}")
    end

    def handle(job)
      case job.kind
      when "route" then answer(job, @router.call(job.data))
      when "connect_error" then @on_connect_error&.call(job.remote)
      when "inactivity" then @on_inactivity_error&.call(job.remote)
      when "log" then log(:warn, "[threaded-proxy] machine: #{job.data}")
      end
    rescue Exception => e # rubocop:disable Lint/RescueException -- `exit` in a block must not stop the server
      log_exception(job, e)
      job.fail unless job.answered?
    end

    # ProxyMachine's answers; anything else closes the connection.
    def answer(job, commands)
      return garbage(job, commands) unless commands.is_a?(Hash)

      if commands[:noop] == true
        job.noop
      elsif commands.key?(:close)
        close = commands[:close]
        return job.close(nil) if close == true
        return job.close(close) if close.is_a?(String)

        garbage(job, commands, "close: must be true or a String")
      elsif commands[:remote].is_a?(String)
        route(job, commands)
      else
        garbage(job, commands)
      end
    end

    def route(job, commands)
      extra = commands.keys - REMOTE_KEYS
      return garbage(job, commands, "unknown keys #{extra.inspect}") unless extra.empty?

      %i[data reply].each do |key|
        value = commands[key]
        return garbage(job, commands, "#{key}: must be a String") unless value.nil? || value.is_a?(String)
      end
      options = commands.slice(*REMOTE_KEYS)
      %i[connect_timeout inactivity_timeout].each do |key|
        value = options[key]
        next if value.nil?
        return garbage(job, commands, "#{key}: must be a positive number") unless value.is_a?(Numeric) && value.positive?

        options[key] = Float(value)
      end
      job.route(options)
    rescue ArgumentError => e # the remote's form, checked in Rust
      garbage(job, commands, e.message)
    end

    def garbage(job, commands, why = "not a routing answer")
      shown = commands.inspect
      shown = "#{shown[0, 200]}…" if shown.size > 200
      log(:error, "[threaded-proxy] the routing block answered #{shown} (#{why}); connection closed")
      job.fail
    end

    def log_exception(job, exception)
      what = { "route" => "the routing block", "connect_error" => "proxy_connect_error",
               "inactivity" => "proxy_inactivity_error" }.fetch(job.kind, "the machine's logger")
      lines = ["[threaded-proxy] #{what} raised #{exception.class}: #{exception.message}" \
               "#{"; connection closed" if job.kind == "route"}"]
      lines.concat((exception.backtrace || []).first(BACKTRACE_LINES).map { |l| "  #{l}" })
      log(:error, lines.join("\n"))
    end

    # A logger that raises must not take a thread down.
    def log(level, text)
      logger = @logger.respond_to?(:call) ? @logger.call : @logger
      logger ||= ThreadedProxy.configuration.logger_or_default
      logger ? logger.public_send(level, text) : warn(text)
    rescue StandardError => e
      warn("[threaded-proxy] the logger raised #{e.class}: #{e.message}; the line was: #{text}")
    end
  end
end

