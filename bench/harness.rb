# frozen_string_literal: true

require "etc"
require "fileutils"
require "json"
require "shellwords"
require "socket"

# The pieces `rake bench` starts and stops: the Rust origin, nginx, Puma
# (rails_test_app) and the Rust load driver. Every child runs in its own
# process group and is stopped with TERM, then KILL, to the whole group, from
# ensure blocks and from an at_exit hook, so a failed or interrupted run
# leaves nothing behind.
module Bench
  ROOT = File.expand_path("..", __dir__)
  WORK = File.join(ROOT, "tmp", "bench")
  # Logs, nginx's prefix and the driver's output of this run: two runs at
  # once (two engineers) must not read each other's files.
  RUN_DIR = File.join(WORK, "run-#{Process.pid}")
  RELEASE = File.join(ROOT, "target", "release")
  ORIGIN_BIN = File.join(RELEASE, "bench-origin")
  LOADGEN_BIN = File.join(RELEASE, "bench-loadgen")
  APP_DIR = File.join(ROOT, "rails_test_app")
  CLK_TCK = Etc.sysconf(Etc::SC_CLK_TCK)

  class Error < StandardError; end

  def self.monotonic
    Process.clock_gettime(Process::CLOCK_MONOTONIC)
  end

  # The errors a measurement can end with (a child that failed, a socket,
  # a loadgen whose JSON is cut short): the run reports them and goes on.
  MEASUREMENT_ERRORS = [Error, SystemCallError, JSON::ParserError].freeze

  # Runs one measurement; if it fails, says so (`say` with `scope`) and
  # returns {"error" => its class and first and last lines (a failed
  # loadgen's own message ends its log)} in place of the result.
  def self.guarded(scope, say)
    yield
  rescue *MEASUREMENT_ERRORS => e
    lines = e.message.lines.map(&:strip).reject(&:empty?)
    summary = [lines.first, lines.last].uniq.join(" … ")
    say.call("#{scope}: failed: #{summary}")
    { "error" => "#{e.class}: #{summary}" }
  end

  # Polls the block until it returns a truthy value or `timeout` passes.
  def self.wait_for(what, timeout:, interval: 0.05)
    deadline = monotonic + timeout
    loop do
      value = yield
      return value if value
      raise Error, "timed out after #{timeout}s waiting for #{what}" if monotonic > deadline

      sleep interval
    end
  end

  # For nginx, which cannot say which port it got for port 0 (Puma and
  # bench-origin bind 0 and report theirs).
  def self.free_port
    server = TCPServer.new("127.0.0.1", 0)
    server.addr[1]
  ensure
    server&.close
  end

  def self.port_open?(port)
    Socket.tcp("127.0.0.1", port, connect_timeout: 0.5, &:close)
    true
  rescue SystemCallError, SocketError
    false
  end

  # /proc readings.
  module Proc
    module_function

    # utime + stime of a whole process (all its threads), in seconds.
    def cpu_seconds(pid)
      fields = File.read("/proc/#{pid}/stat").split(") ", 2).last.split
      (Integer(fields[11]) + Integer(fields[12])).fdiv(CLK_TCK)
    rescue Errno::ENOENT, Errno::ESRCH
      nil
    end

    def rss_kb(pid)
      File.read("/proc/#{pid}/status")[/^VmRSS:\s+(\d+)/, 1]&.to_i
    rescue Errno::ENOENT, Errno::ESRCH
      nil
    end

    def children(pid)
      Dir.glob("/proc/[0-9]*/stat").filter_map do |path|
        fields = File.read(path).split(") ", 2).last.split
        Integer(path[%r{/proc/(\d+)/}, 1]) if Integer(fields[1]) == pid
      rescue Errno::ENOENT, Errno::ESRCH, ArgumentError
        nil
      end
    end

    # "name state wchan" of every thread: what a process that stopped
    # answering is blocked on (kept in the results when a path fails).
    def thread_states(pid)
      Dir.glob("/proc/#{pid}/task/*").map do |task|
        comm = File.read("#{task}/comm").strip
        state = File.read("#{task}/stat").split(") ", 2).last.split.first
        wchan = File.exist?("#{task}/wchan") ? File.read("#{task}/wchan").strip : "?"
        "#{comm} #{state} #{wchan}"
      rescue SystemCallError
        next
      end.compact
    end

    def cmdline(pid)
      File.read("/proc/#{pid}/cmdline").tr("\0", " ").strip
    rescue Errno::ENOENT, Errno::ESRCH
      ""
    end
  end

  # A child process in its own process group.
  class Child
    @running = []
    class << self
      attr_reader :running

      def stop_all
        running.dup.reverse_each(&:stop)
      end
    end

    OWNER = Process.pid
    at_exit { Child.stop_all if Process.pid == OWNER }

    attr_reader :name, :pid, :log_path

    def initialize(name, argv, env: {}, chdir: ROOT, log_path: File.join(RUN_DIR, "#{name}.log"))
      @name = name
      @argv = argv
      @env = env
      @chdir = chdir
      @log_path = log_path
    end

    def start
      FileUtils.mkdir_p(File.dirname(@log_path))
      @pid = Process.spawn(@env, *@argv, chdir: @chdir, in: File::NULL,
                                         %i[out err] => [@log_path, "w"], pgroup: true)
      self.class.running << self
      self
    end

    def log
      File.exist?(@log_path) ? File.read(@log_path) : ""
    end

    def alive?
      !@pid.nil? && reap.nil?
    end

    # TERM to the group, KILL to the group after `timeout` seconds.
    def stop(timeout: 10)
      return @status unless @pid

      signal("TERM") unless reap
      unless wait(timeout)
        signal("KILL")
        wait(5)
      end
      signal("KILL") if group_alive? # leftovers of a dead leader
      @status
    ensure
      self.class.running.delete(self)
    end

    # Waits for the exit; nil when it did not exit in time.
    def wait(timeout)
      deadline = Bench.monotonic + timeout
      until reap
        return nil if Bench.monotonic > deadline

        sleep 0.02
      end
      @status
    end

    private

    def reap
      @status ||= Process.waitpid2(@pid, Process::WNOHANG)&.last
    rescue Errno::ECHILD
      @status ||= :unknown
    end

    def group_alive?
      Process.kill(0, -@pid)
      true
    rescue Errno::ESRCH, Errno::EPERM
      false
    end

    def signal(name)
      Process.kill(name, -@pid)
    rescue Errno::ESRCH, Errno::EPERM
      nil
    end
  end

  # bench-origin (bench/origin); with `relay_to:` (an origin's port) the
  # same binary as a bare splice relay to it, the yardstick of one proxy hop;
  # with `fanout: true` a bare SSE fan-out (bench/origin/src/fanout.rs), the
  # yardstick of one publish to many streams.
  class Origin
    attr_reader :port

    def initialize(relay_to: nil, fanout: false)
      @relay_to = relay_to
      @fanout = fanout
    end

    def start
      name, mode =
        if @relay_to then ["relay", ["--relay-to", "127.0.0.1:#{@relay_to}"]]
        elsif @fanout then ["fanout", ["--mode", "fanout", "--threads", "2"]]
        else ["origin", ["--threads", "2"]]
        end
      @child = Child.new(name, [ORIGIN_BIN, "--port", "0", *mode, "--lifetime-secs", "1800"]).start
      @port = Bench.wait_for("the #{name} to listen", timeout: 10) do
        raise Error, "#{name} exited: #{@child.log}" unless @child.alive?

        @child.log[/LISTENING 127\.0\.0\.1:(\d+)/, 1]&.to_i
      end
      self
    end

    def url
      "http://127.0.0.1:#{@port}"
    end

    def pid
      @child.pid
    end

    def stop
      @child&.stop
    end
  end

  # nginx as a plain reverse proxy in front of the origin: proxy_pass with
  # `proxy_buffering off` and a keep-alive upstream pool, two workers (one per
  # core) that raise their own fd limit, no access log. `large_downloads:`
  # adds the buffer settings users give a location that serves large files
  # (DOWNLOAD_TUNING), for the 1 GiB scenario.
  class Nginx
    attr_reader :port

    # One 1 MiB buffer between origin and client instead of one page:
    # far fewer reads and writes per GiB (measured the faster of this and
    # `proxy_buffering on` with `proxy_buffers 16 1m`, see bench/RESULTS.md).
    # BENCH_NGINX_DOWNLOAD_TUNING replaces it, to compare settings.
    DOWNLOAD_TUNING = "proxy_buffering off; proxy_buffer_size 1m; proxy_buffers 4 1m; proxy_busy_buffers_size 2m;"

    def self.binary
      ENV.fetch("PATH", "").split(":").map { |dir| File.join(dir, "nginx") }
         .push("/usr/sbin/nginx").find { |path| File.executable?(path) }
    end

    def initialize(origin_port, workers: 2, large_downloads: false)
      @origin_port = origin_port
      @workers = workers
      @large_downloads = large_downloads
      @prefix = File.join(RUN_DIR, "nginx")
    end

    def start
      binary = self.class.binary or raise Error, "nginx not installed"
      @port = Bench.free_port
      %w[logs tmp].each { |dir| FileUtils.mkdir_p(File.join(@prefix, dir)) }
      conf = File.join(@prefix, "nginx.conf")
      File.write(conf, config)
      @child = Child.new("nginx", [binary, "-p", "#{@prefix}/", "-c", conf, "-g", "daemon off;"]).start
      Bench.wait_for("nginx to listen and start its workers", timeout: 10) do
        raise Error, "nginx exited: #{@child.log}\n#{error_log}" unless @child.alive?

        Bench.port_open?(@port) && worker_pids.size == @workers
      end
      self
    end

    def url
      "http://127.0.0.1:#{@port}"
    end

    def worker_pids
      Bench::Proc.children(@child.pid)
    end

    def stop
      @child&.stop
    end

    private

    def error_log
      path = File.join(@prefix, "logs", "error.log")
      File.exist?(path) ? File.read(path) : ""
    end

    def config
      tmp = File.join(@prefix, "tmp")
      <<~NGINX
        # Written by bench/harness.rb for `rake bench`.
        worker_processes #{@workers};
        worker_rlimit_nofile #{Process.getrlimit(:NOFILE).last};
        pid #{@prefix}/nginx.pid;
        error_log #{@prefix}/logs/error.log warn;
        #{Process.uid.zero? ? "user root;" : ""}
        events {
          worker_connections 20000;
        }
        http {
          access_log off;
          client_body_temp_path #{tmp}/client;
          proxy_temp_path #{tmp}/proxy;
          fastcgi_temp_path #{tmp}/fastcgi;
          uwsgi_temp_path #{tmp}/uwsgi;
          scgi_temp_path #{tmp}/scgi;
          keepalive_timeout 65;
          upstream origin {
            server 127.0.0.1:#{@origin_port};
            keepalive 256;
          }
          server {
            # reuseport: the kernel spreads connections over both workers, so
            # neither runs out of descriptors with ten thousand streams.
            listen 127.0.0.1:#{@port} reuseport backlog=4096;
            location / {
              proxy_pass http://origin;
              proxy_http_version 1.1;
              proxy_set_header Connection "";
              #{@large_downloads ? ENV.fetch("BENCH_NGINX_DOWNLOAD_TUNING", DOWNLOAD_TUNING) : "proxy_buffering off;"}
              proxy_read_timeout 120s;
            }
          }
        }
      NGINX
    end
  end

  # rails_test_app under Puma, single mode, production, log level warn,
  # `-t 2:2` by default. The shell that spawns Puma raises the soft fd limit
  # to the hard one (`ulimit -n`), so one Puma can hold ~9,900 streams.
  # Puma binds port 0 itself (no other process can take the port between
  # choosing and binding it) and #port is read from its "Listening on" line.
  class Puma
    LISTENING = %r{Listening on (?:http|tcp)://127\.0\.0\.1:(\d+)}.freeze
    WORKER_BOOTED = /- Worker \d+ \(PID: \d+\) booted/.freeze

    attr_reader :port

    # rackup: the Rails app's config.ru, or bench/rack_app.ru (plain Rack).
    # workers > 0: cluster mode. boot_timeout: Puma -t 19000:19000 starts
    # its threads before it listens.
    def initialize(origin_url, threads: "2:2", env: {}, rackup: File.join(APP_DIR, "config.ru"), name: "puma",
                   workers: 0, boot_timeout: 60)
      @origin_url = origin_url
      @threads = threads
      @env = env
      @rackup = rackup
      @name = name
      @workers = workers
      @boot_timeout = boot_timeout
    end

    def start
      hard = Process.getrlimit(:NOFILE).last
      command = ["sh", "-c", "ulimit -n #{hard} && exec \"$@\"", "sh",
                 "bundle", "exec", "puma", "-C", File.join(APP_DIR, "config", "puma.rb"),
                 "-t", @threads, @rackup]
      @child = Child.new(@name, command, env: child_env, chdir: APP_DIR).start
      Bench.wait_for("Puma to boot", timeout: @boot_timeout, interval: 0.1) do
        raise Error, "Puma exited during boot:\n#{@child.log}" unless @child.alive?

        booted?(@child.log)
      end
      # `sh -c exec` and `bundle exec` keep the pid: this is Puma itself.
      cmd = Bench::Proc.cmdline(pid)
      raise Error, "pid #{pid} is not Puma: #{cmd}" unless cmd.include?("puma")

      self
    end

    def url
      "http://127.0.0.1:#{@port}"
    end

    def pid
      @child.pid
    end

    def stop
      @child&.stop(timeout: 15)
    end

    def log
      @child&.log.to_s
    end

    def alive?
      @child&.alive? || false
    end

    private

    def booted?(log)
      @port ||= log[LISTENING, 1]&.to_i
      return false unless @port && log.include?("Use Ctrl-C to stop")

      @workers.zero? || log.scan(WORKER_BOOTED).size >= @workers
    end

    def child_env
      {
        "BUNDLE_GEMFILE" => File.join(ROOT, "Gemfile"),
        "RAILS_ENV" => "production",
        "RAILS_LOG_LEVEL" => "warn",
        "PORT" => "0",
        "PUMA_THREADS" => @threads,
        "WEB_CONCURRENCY" => @workers.to_s,
        "PUMA_PRELOAD" => "0",
        "ORIGIN_URL" => @origin_url,
        # Exits must not wait out the default 25 s drain.
        "THREADED_PROXY_SHUTDOWN_TIMEOUT" => "2"
      }.merge(@env)
    end
  end

  # Runs bench-loadgen once and returns its JSON result.
  module Loadgen
    module_function

    def run(mode, timeout:, **options)
      argv = [LOADGEN_BIN, mode, "--max-secs", timeout.to_s]
      options.each do |name, value|
        flag = "--#{name.to_s.tr("_", "-")}"
        Array(value).each do |item|
          argv << flag
          argv << item.to_s unless item == true
        end
      end
      out_path = File.join(RUN_DIR, "loadgen.out")
      log_path = File.join(RUN_DIR, "loadgen-#{mode}.log")
      child = Child.new("loadgen", ["sh", "-c", "exec \"$@\" >#{Shellwords.escape(out_path)}", "sh", *argv],
                        log_path: log_path).start
      begin
        status = child.wait(timeout + 15)
        raise Error, "loadgen #{mode} did not finish in #{timeout + 15}s" unless status
        raise Error, "loadgen #{mode} failed (#{status.inspect}):\n#{child.log}" unless status.respond_to?(:success?) && status.success?

        JSON.parse(File.read(out_path))
      ensure
        child.stop(timeout: 2)
      end
    end
  end
end
