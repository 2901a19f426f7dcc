# frozen_string_literal: true

require "optparse"
require "socket"
require_relative "machine_config"
require_relative "machine_metrics_server"

module ThreadedProxy
  # `threaded-proxy-machine -c CONFIG [-h HOST] [-p PORT] [-w WORKERS]
  # [--metrics HOST:PORT]`: ProxyMachine's command line, plus the
  # Prometheus exposition (ThreadedProxy::Metrics, machine_* series) on a
  # port of its own. One process serves unless `-w N` asks for
  # N, which then share the port (SO_REUSEPORT) under a master that passes
  # signals on: the routing block holds the GVL, so processes are how it
  # uses more cores.
  #
  # Signals: QUIT stops accepting and waits for every connection to end;
  # TERM and INT stop accepting, wait up to FAST_SHUTDOWN_SECONDS, then
  # close the rest.
  class MachineCLI
    FAST_SHUTDOWN_SECONDS = 10
    SIGNALS = %w[QUIT TERM INT].freeze
    # A worker that dies sooner than this after its fork is not restarted.
    BOOT_GRACE_SECONDS = 2

    def initialize(argv)
      @options = { host: "0.0.0.0", port: 5432, workers: 1 }
      parser.parse!(argv.dup)
      raise OptionParser::MissingArgument, "-c CONFIG" unless @options[:config]
      raise OptionParser::InvalidArgument, "-w must be at least 1" unless @options[:workers].positive?
    end

    # The process's exit status.
    def run
      @config = MachineConfig.load(@options[:config])
      @options[:workers] > 1 ? run_master : serve(reuse_port: false)
    end

    private

    def parser
      OptionParser.new do |o|
        o.banner = "Usage: threaded-proxy-machine -c CONFIG [-h HOST] [-p PORT] [-w WORKERS]"
        o.on("-c", "--config CONFIG", "ProxyMachine configuration file") { |v| @options[:config] = v }
        o.on("-h", "--host HOST", "address to listen on (0.0.0.0)") { |v| @options[:host] = v }
        o.on("-p", "--port PORT", Integer, "port to listen on (5432)") { |v| @options[:port] = v }
        o.on("-w", "--workers N", Integer, "processes sharing the port (1)") { |v| @options[:workers] = v }
        o.on("--metrics HOST:PORT", "serve Prometheus metrics there (GET any path)") do |v|
          host, port = v.include?(":") ? v.split(/:(?=\d+\z)/) : ["127.0.0.1", v]
          @options[:metrics] = [host, Integer(port)]
        end
        o.on("--help", "this text") do
          puts o
          exit 0
        end
      end
    end

    def logger
      @config.logger
    end

    # One machine in this process until a signal ends it.
    def serve(reuse_port:)
      signals = Queue.new
      SIGNALS.each { |sig| trap(sig) { signals << sig } }
      machine = Machine.new(host: @options[:host], port: @options[:port], reuse_port: reuse_port,
                            logger: -> { @config.logger }, on_connect_error: @config.connect_error,
                            on_inactivity_error: @config.inactivity_error, &@config.router).start
      metrics = MachineMetricsServer.new(*@options[:metrics]).start if @options[:metrics]
      where = "#{@options[:host]}:#{machine.port}"
      $0 = "threaded-proxy-machine #{where}"
      logger.info("threaded-proxy-machine listening on #{where} (pid #{Process.pid})" \
                  "#{", metrics on port #{metrics.port}" if metrics}")
      signal = signals.pop
      machine.stop_accepting
      logger.info("Received #{signal} signal. No longer accepting new connections.")
      logger.info("Waiting for #{machine.stats[:open]} connections to finish.")
      drained = machine.stop(signal == "QUIT" ? nil : FAST_SHUTDOWN_SECONDS)
      metrics&.stop
      logger.info(drained ? "All connections finished; exiting." : "Closed the connections left; exiting.")
      0
    end

    # Forks the workers, passes signals on, and replaces a worker that dies
    # until a signal asks everyone to stop.
    def run_master
      @options[:port] = pick_port if @options[:port].zero?
      signals = Queue.new
      SIGNALS.each { |sig| trap(sig) { signals << sig } }
      workers = {}
      stopping = nil
      failed = false
      @options[:workers].times { |i| workers[fork_worker(i, signals)] = [i, monotonic] }
      logger.info("threaded-proxy-machine master #{Process.pid}: #{workers.size} workers on " \
                  "#{@options[:host]}:#{@options[:port]}")
      until workers.empty?
        event = signals.pop # a signal's name, or [:exited, pid, status]
        if event.is_a?(String)
          stopping = event
          workers.each_key { |pid| kill(event, pid) }
        else
          _, pid, status = event
          index, started = workers.delete(pid)
          next if stopping || index.nil?

          if monotonic - started < BOOT_GRACE_SECONDS
            # Died while booting (port taken, config raising): another would
            # do the same, so stop everyone instead of looping.
            logger.error("worker #{pid} exited (#{status}) #{BOOT_GRACE_SECONDS}s or less after it started; stopping")
            stopping = "TERM"
            workers.each_key { |other| kill("TERM", other) }
            failed = true
            next
          end
          logger.error("worker #{pid} exited (#{status}); starting another")
          workers[fork_worker(index, signals)] = [index, monotonic]
        end
      end
      failed ? 1 : 0
    end

    def monotonic
      Process.clock_gettime(Process::CLOCK_MONOTONIC)
    end

    # Forks worker `index`; a thread of the master waits for its exit and
    # reports it on `events`.
    def fork_worker(index, events)
      pid = fork do
        SIGNALS.each { |sig| trap(sig, "DEFAULT") }
        $0 = "threaded-proxy-machine worker #{index}"
        exit(serve(reuse_port: true))
      end
      Thread.new { events << [:exited, pid, Process.wait2(pid).last] }
      pid
    end

    def kill(signal, pid)
      Process.kill(signal, pid)
    rescue Errno::ESRCH
      nil
    end

    # For -p 0 with several workers: one free port, chosen here, that every
    # worker then binds.
    def pick_port
      server = TCPServer.new(@options[:host], 0)
      server.addr[1]
    ensure
      server&.close
    end
  end
end
