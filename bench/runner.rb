# frozen_string_literal: true

require "fileutils"
require "json"
require "time"
require_relative "harness"
require_relative "scenarios"
require_relative "report"

module Bench
  SCENARIO_ALIASES = { "1" => "download", "2" => "threads", "3" => "sse", "4" => "small", "5" => "events", "6" => "machine" }.freeze

  module_function

  # Installs nginx with apt when it is missing (the comparison needs it).
  # Returns nil when nginx is there, else why it is not.
  def ensure_nginx
    return nil if Nginx.binary

    warn "bench: nginx is not installed; installing nginx-light with apt"
    sudo = Process.uid.zero? ? [] : ["sudo"]
    env = { "DEBIAN_FRONTEND" => "noninteractive" }
    pkg = system(env, *sudo, "apt-cache", "show", "nginx-light", out: File::NULL, err: File::NULL) ? "nginx-light" : "nginx"
    system(env, *sudo, "apt-get", "install", "-y", "--no-install-recommends", pkg) ||
      (system(env, *sudo, "apt-get", "update") && system(env, *sudo, "apt-get", "install", "-y", "--no-install-recommends", pkg))
    return "apt-get install #{pkg} failed" unless Nginx.binary

    # Debian's package may start the system service (unless policy-rc.d
    # forbids it); that nginx is not ours to stop, but it should be known.
    system_nginx = Dir.glob("/proc/[0-9]*/comm").count do |path|
      File.read(path).strip == "nginx"
    rescue SystemCallError
      false
    end
    warn "bench: the package started a system nginx (#{system_nginx} processes); it is left alone" if system_nginx.positive?
    nil
  end

  # Installs Debian's haproxy with apt when it is missing (scenario 6
  # compares the machine with it). Returns nil when it is there, else why
  # it is not.
  def ensure_haproxy
    return nil if MachineScenario.haproxy_binary

    warn "bench: haproxy is not installed; installing it with apt"
    sudo = Process.uid.zero? ? [] : ["sudo"]
    env = { "DEBIAN_FRONTEND" => "noninteractive" }
    system(env, *sudo, "apt-get", "install", "-y", "--no-install-recommends", "haproxy") ||
      (system(env, *sudo, "apt-get", "update") && system(env, *sudo, "apt-get", "install", "-y", "--no-install-recommends", "haproxy"))
    return "apt-get install haproxy failed" unless MachineScenario.haproxy_binary

    # The package may start the system service; it is not ours to stop.
    system_haproxy = Dir.glob("/proc/[0-9]*/comm").count do |path|
      File.read(path).strip == "haproxy"
    rescue SystemCallError
      false
    end
    warn "bench: the package started a system haproxy (#{system_haproxy} processes); it is left alone" if system_haproxy.positive?
    nil
  end

  # Run directories of runs that are over (their rake process is gone).
  def remove_stale_run_dirs
    Dir.glob(File.join(WORK, "run-*")).each do |dir|
      pid = Integer(dir[/run-(\d+)\z/, 1] || 0)
      next if pid == Process.pid || (pid.positive? && File.exist?("/proc/#{pid}"))

      FileUtils.rm_rf(dir)
    end
  end

  # Runs the scenarios (all, or one by name or number), prints the report
  # and writes it, with the raw results, under tmp/bench/.
  def run(only: nil, command: "bundle exec rake bench")
    names = only.to_s.empty? ? Scenarios::NAMES : [SCENARIO_ALIASES.fetch(only.to_s, only.to_s)]
    unknown = names - Scenarios::NAMES
    raise ArgumentError, "unknown scenario #{unknown.first}: #{Scenarios::NAMES.join(", ")}" unless unknown.empty?

    FileUtils.mkdir_p(RUN_DIR)
    remove_stale_run_dirs
    [ORIGIN_BIN, LOADGEN_BIN].each { |bin| raise Error, "#{bin} missing: cargo build --release" unless File.executable?(bin) }
    nginx_problem = ensure_nginx
    warn "bench: #{nginx_problem}; nginx rows are skipped" if nginx_problem
    haproxy_problem = ensure_haproxy if names.include?("machine")
    warn "bench: #{haproxy_problem}; the haproxy row is skipped" if haproxy_problem
    started = monotonic
    results = { "command" => command, "started_at" => Time.now.utc.iso8601, "machine" => Machine.describe,
                "settings" => { "repeat" => Scenarios::REPEAT, "sse_streams" => Scenarios::SSE_STREAMS,
                                "sse_hold" => Scenarios::SSE_HOLD, "small_secs" => Scenarios::SMALL_SECS,
                                "small_rounds" => Scenarios::SMALL_ROUNDS, "events" => EventsScenario.settings,
                                "machine" => MachineScenario.settings },
                "competition" => {}, "scenarios" => {} }
    scenarios = Scenarios.new(nginx: nginx_problem.nil?, haproxy: haproxy_problem.nil?)
    names.each do |name|
      results["competition"][name] = Machine.competition
      warn "bench: scenario #{name} (#{results["competition"][name]["loadavg"]} load)"
      results["scenarios"][name] =
        begin
          scenarios.public_send(name)
        rescue *MEASUREMENT_ERRORS => e
          warn "bench: #{name} failed: #{e.class}: #{e.message}"
          { "error" => "#{e.class}: #{e.message.lines.first(3).join.strip}" }
        end
    end
    results["duration_secs"] = (monotonic - started).round
    report = Report.new(results)
    results["targets"] = report.targets.map do |name, measured, met, floor|
      { "target" => name, "measured" => measured, "met" => met, "floor" => floor }
    end
    markdown = report.markdown
    stamp = Time.now.utc.strftime("%Y%m%dT%H%M%SZ")
    File.write(File.join(WORK, "results-#{stamp}.json"), JSON.pretty_generate(results))
    File.write(File.join(WORK, "latest.md"), "#{markdown}\n")
    puts markdown
    puts "", "(written to tmp/bench/latest.md and tmp/bench/results-#{stamp}.json; logs in #{RUN_DIR.delete_prefix("#{ROOT}/")})"
    failed = results["scenarios"].select { |_, r| r.is_a?(Hash) && (r["error"] || r["gem_rows_failed"]) }.keys
    raise Error, "scenarios failed: #{failed.join(", ")}" unless failed.empty?

    results
  ensure
    Child.stop_all
  end
end
