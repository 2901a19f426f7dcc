# frozen_string_literal: true

require "fileutils"
require "socket"

# Boots rails_test_app under a real Puma child process for integration specs.
#
#   server = PumaServer.new(env: { "ORIGIN_URL" => origin.url }, threads: "1:1", workers: 2)
#   server.start
#   Net::HTTP.get(URI("#{server.url}/inline"))
#   server.stop
#
# Puma binds tcp://127.0.0.1:0 itself (PORT=0) and keeps the listener, so no
# other process can take the port between choosing and binding it; #port is
# read from Puma's "Listening on http://127.0.0.1:PORT" line (Puma prints the
# bound address, in single and cluster mode, where the master binds).
# Puma's stdout and stderr go to a log file under tmp/; #start waits (30 s at
# most) until that log shows Puma listening and, in cluster mode, every worker
# booted, and raises with the log if Puma dies or is late.
class PumaServer
  ROOT = File.expand_path("../..", __dir__)
  APP_DIR = File.join(ROOT, "rails_test_app")
  LOG_DIR = File.join(ROOT, "tmp")
  BOOT_TIMEOUT = 30
  STOP_TIMEOUT = 15
  WORKER_BOOTED = /- Worker (\d+) \(PID: (\d+)\) booted/.freeze
  SINGLE_READY = /Use Ctrl-C to stop/.freeze
  # Puma 5 prints tcp:// or http:// depending on the minor version, 6+ http://.
  LISTENING = %r{Listening on (?:http|tcp)://127\.0\.0\.1:(\d+)}.freeze

  class BootError < StandardError; end

  @running = []
  @counter = 0
  class << self
    attr_reader :running

    def next_id
      @counter += 1
    end
  end

  OWNER_PID = Process.pid
  # A forked child (an origin server, say) must not stop the parent's servers.
  at_exit { PumaServer.running.dup.each(&:stop) if Process.pid == OWNER_PID }

  attr_reader :port, :pid, :log_path, :workers

  # env: extra variables for Puma (a nil value unsets one), e.g. ORIGIN_URL.
  # threads: "min:max"; workers > 0 selects cluster mode; preload: preload_app!.
  # rackup: another config.ru to serve (a plain Rack app) instead of the
  # Rails app. nofile: the soft and hard RLIMIT_NOFILE Puma runs under.
  def initialize(env: {}, threads: "1:1", workers: 0, preload: false, rails_env: "test",
                 boot_timeout: BOOT_TIMEOUT, rackup: File.join(APP_DIR, "config.ru"), nofile: nil)
    @rackup = rackup
    @nofile = nofile
    @env = env.transform_keys(&:to_s).transform_values { |v| v&.to_s }
    @threads = threads.to_s
    @workers = Integer(workers)
    @preload = preload
    @rails_env = rails_env
    @boot_timeout = boot_timeout
  end

  def self.start(**options)
    new(**options).start
  end

  def start
    raise "already started" if @pid

    FileUtils.mkdir_p(LOG_DIR)
    @log_path = File.join(LOG_DIR, "puma-#{Process.pid}-#{self.class.next_id}.log")
    limits = @nofile ? { rlimit_nofile: @nofile } : {}
    @pid = Process.spawn(child_env, *command, chdir: APP_DIR, in: File::NULL,
                                              %i[out err] => [@log_path, "w"], pgroup: true, **limits)
    self.class.running << self
    wait_until_booted
    self
  rescue StandardError
    stop if @pid
    raise
  end

  def url
    "http://127.0.0.1:#{@port}"
  end

  def log
    @log_path && File.exist?(@log_path) ? File.read(@log_path) : ""
  end

  # The PIDs of the currently booted workers, by worker index (cluster mode).
  def worker_pids
    log.scan(WORKER_BOOTED).each_with_object({}) { |(index, pid), by_index| by_index[Integer(index)] = Integer(pid) }
       .sort.map(&:last)
  end

  # Waits (bounded) until the log contains `text`: lines written by the
  # gem's callback threads arrive after the response did.
  def wait_for_log(text, timeout: 10)
    deadline = monotonic + timeout
    until log.include?(text)
      return false if monotonic > deadline

      sleep 0.05
    end
    true
  end

  def running?
    !@pid.nil? && reap.nil?
  end

  # SIGTERM, then SIGKILL to the whole process group (cluster workers too) if
  # Puma has not exited within `timeout` seconds. Returns the exit status.
  def stop(timeout: STOP_TIMEOUT)
    return @status unless @pid

    signal("TERM", @pid) unless reap
    unless wait_for_exit(timeout)
      signal("KILL", -@pid)
      wait_for_exit(5)
    end
    signal("KILL", -@pid) if group_alive? # workers left behind by a dead master
    @status
  ensure
    self.class.running.delete(self)
  end

  private

  def command
    ["bundle", "exec", "puma", "-C", File.join(APP_DIR, "config", "puma.rb"), @rackup]
  end

  def child_env
    {
      "BUNDLE_GEMFILE" => File.join(ROOT, "Gemfile"),
      "RAILS_ENV" => @rails_env,
      "PORT" => "0",
      "PUMA_THREADS" => @threads,
      "WEB_CONCURRENCY" => @workers.to_s,
      "PUMA_PRELOAD" => @preload ? "1" : "0"
    }.merge(@env)
  end

  def wait_until_booted
    deadline = monotonic + @boot_timeout
    until booted?
      raise BootError, "Puma exited during boot (#{@status.inspect}); log:\n#{log}" unless running?
      raise BootError, "Puma did not boot within #{@boot_timeout}s; log:\n#{log}" if monotonic > deadline

      sleep 0.05
    end
  end

  # The port is set once Puma has logged its listener; "booted" also needs
  # every worker (cluster) or the ready line (single).
  def booted?
    text = log
    @port ||= text[LISTENING, 1]&.then { |port| Integer(port) }
    return false unless @port

    if @workers.positive?
      text.scan(WORKER_BOOTED).map(&:first).uniq.size >= @workers
    else
      text.match?(SINGLE_READY)
    end
  end

  def wait_for_exit(timeout)
    deadline = monotonic + timeout
    until reap
      return nil if monotonic > deadline

      sleep 0.05
    end
    @status
  end

  # Collects Puma's exit status once it has exited; nil while it runs.
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

  def signal(name, target)
    Process.kill(name, target)
  rescue Errno::ESRCH, Errno::EPERM
    nil
  end

  def monotonic
    Process.clock_gettime(Process::CLOCK_MONOTONIC)
  end
end
