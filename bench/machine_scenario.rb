# frozen_string_literal: true

require "json"
require_relative "harness"

module Bench
  # Scenario 6 (issue 18): the machine (ThreadedProxy::Machine, a Ruby
  # block routing each connection by its first bytes) beside HAProxy
  # (Debian's, `mode tcp`, `tcp-request inspect-delay` + content switching
  # on `req.payload`) and direct, in one run. The sink and the clients are
  # bench-loadgen (`tcp-sink`, `tcp`); every connection starts with "GO",
  # which both proxies route to the sink.
  #   push  - one PUSH_BYTES transfer through a routed connection: MB/s,
  #           proxy CPU s per GiB (utime + stime of its process, /proc)
  #   short - connect, "GO", half-close, read to EOF, at concurrency
  #           SHORT_CONNECTIONS for SHORT_SECS: connections/s, proxy CPU
  #           per exchange, and the block's cost per call (Machine#stats
  #           route_seconds / route_calls)
  #   idle  - IDLE routed connections held (each saw the sink's greeting),
  #           RSS delta of the proxy process / count (not for direct)
  class MachineScenario
    ROWS = %w[machine haproxy direct].freeze
    GIB = 1 << 30

    # Tunables (BENCH_MACHINE_*), for quick runs.
    PUSH_BYTES = Integer(ENV.fetch("BENCH_MACHINE_BYTES", GIB.to_s))
    SHORT_CONNECTIONS = Integer(ENV.fetch("BENCH_MACHINE_CONNECTIONS", "50"))
    SHORT_SECS = Float(ENV.fetch("BENCH_MACHINE_SECS", "10"))
    IDLE = Integer(ENV.fetch("BENCH_MACHINE_IDLE", "2000"))
    IDLE_HOLD = Float(ENV.fetch("BENCH_MACHINE_HOLD", "2"))
    SELECTED_ROWS = ENV.fetch("BENCH_MACHINE_ROWS", ROWS.join(",")).split(",")

    def self.settings
      { "bytes" => PUSH_BYTES, "connections" => SHORT_CONNECTIONS, "secs" => SHORT_SECS, "idle" => IDLE,
        "hold_secs" => IDLE_HOLD, "rows" => SELECTED_ROWS }
    end

    def self.haproxy_binary
      ENV.fetch("PATH", "").split(":").push("/usr/sbin").map { |dir| File.join(dir, "haproxy") }
         .find { |path| File.executable?(path) }
    end

    def initialize(say:, haproxy: true)
      @say = say
      @with_haproxy = haproxy
    end

    def run
      unknown = SELECTED_ROWS - ROWS
      raise Error, "unknown BENCH_MACHINE_ROWS entries: #{unknown.join(", ")}" unless unknown.empty?

      results = { "settings" => self.class.settings, "rows" => {} }
      sink_port = start_sink
      targets = SELECTED_ROWS.filter_map do |row|
        case row
        when "direct" then [row, sink_port, nil]
        when "machine" then [row, *start_machine(sink_port)]
        when "haproxy"
          next results["rows"][row] = { "error" => "haproxy is not installed" } unless @with_haproxy

          [row, *start_haproxy(sink_port)]
        end
      end
      # Measurement by measurement, the rows taking turns: a burst of outside
      # load then hits each alike.
      %w[push short idle].each do |measurement|
        targets.each do |row, port, pid|
          next if measurement == "idle" && pid.nil?

          @say.call("machine: #{measurement}, #{row}")
          (results["rows"][row] ||= {})[measurement] = guarded { public_send(measurement, port, pid) }
        end
      end
      results["route"] = guarded { route_cost } if @machine
      failed = results.dig("rows", "machine")&.select { |_, r| r.is_a?(Hash) && r["error"] }&.keys
      results["gem_rows_failed"] = failed if failed && !failed.empty?
      results
    ensure
      [@haproxy, @machine, @sink].compact.each(&:stop)
    end

    def push(port, pid)
      cpu_before = pid && Proc.cpu_seconds(pid)
      result = tcp("push", port, bytes: PUSH_BYTES, timeout: 600)
      cpu = pid && (Proc.cpu_seconds(pid) - cpu_before)
      result.merge("proxy_cpu_s" => cpu, "cpu_s_per_gib" => cpu && cpu * GIB / PUSH_BYTES)
    end

    def short(port, pid)
      cpu_before = pid && Proc.cpu_seconds(pid)
      result = tcp("short", port, connections: SHORT_CONNECTIONS, duration_secs: SHORT_SECS, timeout: SHORT_SECS.ceil + 60)
      cpu = pid && (Proc.cpu_seconds(pid) - cpu_before)
      result.merge("proxy_cpu_s" => cpu,
                   "proxy_cpu_us_per_exchange" => cpu && result["exchanges"].positive? ? cpu / result["exchanges"] * 1e6 : nil)
    end

    def idle(port, pid)
      tcp("idle", port, idle: IDLE, hold_secs: IDLE_HOLD, watch_pid: pid, timeout: IDLE_HOLD.ceil + 120)
    end

    # The block's cost per call over the whole run, from Machine#stats.
    def route_cost
      path = File.join(RUN_DIR, "machine-stats.json")
      File.delete(path) if File.exist?(path)
      Process.kill("USR1", @machine.pid)
      stats = JSON.parse(Bench.wait_for("the machine's stats", timeout: 10) { File.exist?(path) && File.read(path) })
      calls = stats["route_calls"]
      { "route_calls" => calls, "route_seconds" => stats["route_seconds"],
        "us_per_call" => calls.positive? ? stats["route_seconds"] / calls * 1e6 : nil, "stats" => stats }
    end

    private

    def tcp(what, port, timeout:, **options)
      Loadgen.run("tcp", what: what, addr: "127.0.0.1:#{port}", prefix: "GO", timeout: timeout, **options)
    end

    def guarded(&measurement)
      Bench.guarded("machine", @say, &measurement)
    end

    def start_sink
      port = Bench.free_port
      @sink = Child.new("tcp-sink", [LOADGEN_BIN, "tcp-sink", "--port", port.to_s, "--max-secs", "86400"]).start
      Bench.wait_for("the tcp sink", timeout: 10) { Bench.port_open?(port) }
      port
    end

    # The soft descriptor limit raised to the hard one: IDLE connections
    # take two sockets and two pipes each.
    def unlimited(argv)
      ["sh", "-c", 'ulimit -n "$(ulimit -Hn)"; exec "$@"', "sh", *argv]
    end

    def start_machine(sink_port)
      port = Bench.free_port
      env = { "BENCH_MACHINE_LISTEN" => port.to_s, "BENCH_MACHINE_SINK" => "127.0.0.1:#{sink_port}",
              "BENCH_MACHINE_STATS" => File.join(RUN_DIR, "machine-stats.json") }
      @machine = Child.new("machine", unlimited([RbConfig.ruby, File.join(__dir__, "machine_server.rb")]), env: env).start
      Bench.wait_for("the machine (#{@machine.log_path})", timeout: 30) do
        raise Error, "the machine exited: #{@machine.log}" unless @machine.alive?

        @machine.log.include?("machine listening")
      end
      [port, @machine.pid]
    end

    def start_haproxy(sink_port)
      port = Bench.free_port
      config = File.join(RUN_DIR, "haproxy.cfg")
      File.write(config, <<~CONF)
        global
          maxconn #{IDLE * 2 + 1000}
          nbthread 2
        defaults
          mode tcp
          timeout connect 5s
          timeout client 120s
          timeout server 120s
        frontend fe
          bind 127.0.0.1:#{port}
          tcp-request inspect-delay 5s
          tcp-request content accept if { req.payload(0,2) -m str GO }
          use_backend sink if { req.payload(0,2) -m str GO }
        backend sink
          server s1 127.0.0.1:#{sink_port}
      CONF
      @haproxy = Child.new("haproxy", unlimited([self.class.haproxy_binary, "-db", "-f", config])).start
      Bench.wait_for("haproxy (#{@haproxy.log_path})", timeout: 10) do
        raise Error, "haproxy exited: #{@haproxy.log}" unless @haproxy.alive?

        Bench.port_open?(port)
      end
      # The sh wrapper exec'd haproxy: same pid.
      [port, @haproxy.pid]
    end
  end
end
