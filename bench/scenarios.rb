# frozen_string_literal: true

require "net/http"
require_relative "harness"
require_relative "events_scenario"
require_relative "machine_scenario"

module Bench
  # The five scenarios of `rake bench`. Each starts its own origin, nginx and
  # Puma (fresh processes: no pooled connections, heap growth or TIME_WAIT
  # from a previous scenario), measures the three paths in the same run, and
  # stops everything in an ensure block. Each returns a Hash of results.
  class Scenarios
    NAMES = %w[download threads sse small events machine].freeze
    GIB = 1 << 30

    # Tunables, for quick runs while developing the benchmark itself.
    REPEAT = Integer(ENV.fetch("BENCH_REPEAT", "5"))
    SSE_STREAMS = Integer(ENV.fetch("BENCH_SSE_STREAMS", "9900"))
    SSE_HOLD = Float(ENV.fetch("BENCH_SSE_HOLD", "8"))
    SMALL_SECS = Float(ENV.fetch("BENCH_SMALL_SECS", "4"))
    SMALL_ROUNDS = Integer(ENV.fetch("BENCH_SMALL_ROUNDS", "3"))
    SSE_AGAIN = ENV.fetch("BENCH_SSE_AGAIN", "1") == "1"
    KEEPALIVE_ROWS = ENV.fetch("BENCH_KEEPALIVE", "1") == "1"

    def initialize(nginx: true, haproxy: true, say: ->(line) { warn(line) })
      @with_nginx = nginx
      @with_haproxy = haproxy
      @say = say
    end

    # 1. One 1 GiB download per path (median of REPEAT), with the CPU the
    # proxy process spent on it. The paths take turns, run by run, so a
    # burst of outside load hits all of them alike rather than one.
    def download
      with_stack(nginx_large_downloads: true, relay: true) do |stack|
        relay = { "relay" => ["#{stack[:relay].url}/bytes?n=#{GIB}", -> { [stack[:relay].pid] }] }
        list = paths(stack, "/bytes?n=#{GIB}", proxy: "/bench/proxy/bytes?n=#{GIB}", extra: relay)
        origin_pid = stack[:origin].pid
        list.each_value { |url, _| download_once(url.sub("n=#{GIB}", "n=#{64 << 20}"), [], origin_pid, size: 64 << 20) } # warm-up
        runs = Hash.new { |hash, key| hash[key] = [] }
        REPEAT.times do |round|
          list.each do |name, (url, pids)|
            say "download: #{name} (#{round + 1}/#{REPEAT})"
            runs[name] << download_once(url, pids.call, origin_pid, size: GIB)
          end
        end
        runs.to_h do |name, list_of_runs|
          [name, {
            "mb_per_s" => median(list_of_runs.map { |r| r["mb_per_s"] }),
            "best_mb_per_s" => list_of_runs.map { |r| r["mb_per_s"] }.max,
            "secs" => median(list_of_runs.map { |r| r["secs"] }),
            "cpu_s_per_gib" => list_of_runs.all? { |r| r["cpu_s"] } ? median(list_of_runs.map { |r| r["cpu_s"] * GIB / r["bytes"] }) : nil,
            "total_cpu_s_per_gib" => median(list_of_runs.map { |r| r["total_cpu_s"] && r["total_cpu_s"] * GIB / r["bytes"] }),
            "runs" => list_of_runs
          }]
        end
      end
    end

    # 2. Thread freedom: 1,000 concurrent requests that the origin answers
    # after 1 s, through a Puma with 2 threads; an inline action is probed
    # while they run. Diagnostic rows: the same through a plain Rack app, and
    # last, with no proxy at all, the 1,000 sent to the inline action itself
    # (Rails', plain Rack's): how long that Puma takes to answer 1,000
    # connections at once, the floor under any route through it.
    def threads
      with_stack(rack: true) do |stack|
        inline_row = { "inline" => ["#{stack[:puma].url}/bench/inline_1k", -> { [stack[:puma].pid] }] }
        list = paths(stack, "/delay?ms=1000&n=1024", proxy: "/bench/proxy/delay?ms=1000&n=1024", extra: inline_row,
                                                     edge: true, rack: true)
        floors = list.slice("inline", "rack_inline")
        list = list.except(*floors.keys).merge(floors)
        list.to_h do |name, (url, pids)|
          say "threads: #{name}"
          puma = { "proxy_fetch" => stack[:puma], "proxy_fetch_edge" => stack[:puma], "inline" => stack[:puma],
                   "rack_proxy_fetch" => stack[:rack], "rack_inline" => stack[:rack] }[name]
          inline = puma && "#{puma.url}/bench/inline_1k"
          # Warm-up: boot-time laziness (pools, Rails caches) out of the way.
          Loadgen.run("burst", url: url.sub("ms=1000", "ms=1"), requests: 50, timeout: 30)
          Loadgen.run("burst", url: inline, requests: 20, timeout: 30) if inline
          pid_list = pids.call
          cpu_before = cpu(pid_list)
          options = { url: url, requests: 1000, timeout_secs: 30, timeout: 90 }
          options.merge!(probe_url: inline, probe_interval_ms: 10) if inline
          result = with_stuck_threads(Loadgen.run("burst", **options), nil, pid_list)
          cpu_after = cpu(pid_list)
          [name, result.merge("cpu_s" => cpu_before && cpu_after && (cpu_after - cpu_before))]
        end
      end
    end

    # 3. As many concurrent SSE streams as one Puma's fd limit allows, an
    # event every 5 s: health, RSS, and origin streams left after the
    # clients leave. Diagnostic row: the same again on the same Puma, whose
    # heap has grown by then, to tell memory held per stream from heap growth.
    def sse
      limit = SSE_STREAMS + 100
      # A stream holds two descriptors (client, origin): the default
      # fd_budget keeps an eighth of the limit for Puma (8,622 streams at
      # 20,000 fds), so the scenario raises it with max_connections, as a
      # deployment built for this many streams would.
      env = { "THREADED_PROXY_MAX_CONNECTIONS" => limit.to_s,
              "THREADED_PROXY_MAX_CONNECTIONS_PER_ORIGIN" => limit.to_s,
              "THREADED_PROXY_FD_BUDGET" => (2 * limit).to_s }
      with_stack(puma_env: env) do |stack|
        origin = stack[:origin]
        list = paths(stack, "/sse?interval_ms=5000", proxy: "/bench/proxy/sse?interval_ms=5000", edge: true)
        list["proxy_fetch_again"] = list["proxy_fetch"] if SSE_AGAIN
        list.to_h do |name, (url, pids)|
          say "sse: #{name}, #{SSE_STREAMS} streams"
          wait_origin_idle(origin)
          result = Loadgen.run("sse", url: url, streams: SSE_STREAMS, window: 256, hold_secs: SSE_HOLD,
                                      watch_pid: pids.call, origin_stats: "#{origin.url}/stats", timeout: 400)
          say "sse: #{name}: #{result["healthy"]} healthy, origin open 2 s after close: #{result["origin_open_sse_after_2s"].inspect}"
          [name, result]
        end.merge("streams_asked" => SSE_STREAMS, "hold_secs" => SSE_HOLD)
      end
    end

    # 4. 1 KiB answers at 32 connections, a new connection per request;
    # proxy_fetch against the same Puma rendering 1 KiB inline. The paths
    # take turns for SMALL_ROUNDS rounds (Puma's rate drifts by ±20 % from
    # one run to the next even on a quiet machine; taking turns keeps that
    # drift from favouring one path) and each metric is the median of the
    # rounds. Diagnostic rows: both endpoints in a plain Rack app.
    def small
      with_stack(rack: true) do |stack|
        inline = { "inline" => ["#{stack[:puma].url}/bench/inline_1k", -> { [stack[:puma].pid] }] }
        list = paths(stack, "/bytes?n=1024", proxy: "/bench/proxy/bytes?n=1024", extra: inline, edge: true, rack: true)
        rounds = Hash.new { |hash, key| hash[key] = [] }
        SMALL_ROUNDS.times do |round|
          list.each do |name, (url, pids)|
            say "small: #{name} (#{round + 1}/#{SMALL_ROUNDS})"
            rounds[name] << rate(url, pids, secs: SMALL_SECS, keep_alive: false)
          end
        end
        rows = rounds.to_h { |name, results| [name, combine_rounds(results)] }
        if KEEPALIVE_ROWS
          ka = paths(stack, "/bytes?n=1024", proxy: nil, extra: inline)
          rows["keep_alive"] = ka.to_h do |name, (url, pids)|
            say "small: #{name} (keep-alive)"
            [name, combine_rounds([rate(url, pids, secs: SMALL_SECS, keep_alive: true)])]
          end
        end
        rows
      end
    end

    # 5. Event streams from Ruby (issue 17): the gem's stream_events beside
    # ActionController::Live and hijack + Thread.new (bench/events_scenario.rb).
    def events
      EventsScenario.new(say: @say).run
    end

    # 6. The machine beside HAProxy and direct (bench/machine_scenario.rb).
    def machine
      MachineScenario.new(say: @say, haproxy: @with_haproxy).run
    end

    private

    def say(line)
      @say.call(line)
    end

    def rate(url, pids, secs:, keep_alive:)
      pid_list = pids.call
      cpu_before = cpu(pid_list)
      result = Loadgen.run("rate", url: url, connections: 32, duration_secs: secs, warmup_secs: 1,
                                   keep_alive: keep_alive || nil, timeout: (secs + 30).ceil)
      cpu_after = cpu(pid_list)
      cpu_s = cpu_before && cpu_after && (cpu_after - cpu_before)
      # Per request, warm-up included (the CPU counter cannot tell them apart).
      exchanges = result["exchanges_total"]
      result = with_stuck_threads(result, result["ok"], pid_list)
      result.merge("cpu_s" => cpu_s,
                   "cpu_us_per_request" => cpu_s && exchanges.positive? ? cpu_s * 1e6 / exchanges : nil)
    end

    # One row from several rounds: medians, the worst max, summed errors.
    def combine_rounds(results)
      row = %w[rps p50_ms p99_ms cpu_us_per_request].to_h { |key| [key, median(results.map { |r| r[key] })] }
      row["max_ms"] = results.filter_map { |r| r["max_ms"] }.max
      row["rounds_rps"] = results.map { |r| r["rps"] }
      %w[failures statuses].each do |key|
        row[key] = results.each_with_object(Hash.new(0)) { |r, sum| r[key].to_h.each { |k, n| sum[k] += n } }
      end
      stuck = results.find { |r| r["threads_when_failed"] }
      row["threads_when_failed"] = stuck["threads_when_failed"] if stuck
      row.merge("rounds" => results)
    end

    def download_once(url, pids, origin_pid, size:)
      cpu_before = cpu(pids)
      origin_before = cpu([origin_pid])
      # One loadgen thread: a single stream gains nothing from a second one
      # and loses to cross-thread wake-ups on two cores.
      run = Loadgen.run("download", url: url, threads: 1, timeout: 180)
      cpu_after = cpu(pids)
      origin_after = cpu([origin_pid])
      raise Error, "download of #{url} got #{run["status"]}, #{run["bytes"]} bytes" unless run["status"] == 200 && run["bytes"] == size

      proxy_cpu = cpu_before && cpu_after && (cpu_after - cpu_before)
      origin_cpu = origin_before && origin_after && (origin_after - origin_before)
      total = origin_cpu && run["driver_cpu_s"] && (origin_cpu + run["driver_cpu_s"] + (proxy_cpu || 0))
      run.merge("cpu_s" => proxy_cpu, "origin_cpu_s" => origin_cpu, "total_cpu_s" => total)
    end

    # name => [url, -> { pids whose CPU/RSS is the proxy's }] for each path;
    # `edge: true` adds the Rails app's middleware route, `rack: true` the
    # plain-Rack diagnostic rows.
    def paths(stack, origin_path, proxy:, extra: {}, edge: false, rack: false)
      list = { "direct" => ["#{stack[:origin].url}#{origin_path}", -> { [] }] }
      list["nginx"] = ["#{stack[:nginx].url}#{origin_path}", -> { stack[:nginx].worker_pids }] if stack[:nginx]
      list.merge!(extra)
      list["proxy_fetch"] = ["#{stack[:puma].url}#{proxy}", -> { [stack[:puma].pid] }] if proxy
      # The same Rails app, the request answered by ThreadedProxy::Middleware
      # at the head of its stack (rails_test_app/lib/edge_routes.rb).
      if proxy && edge
        list["proxy_fetch_edge"] = ["#{stack[:puma].url}#{proxy.sub("/bench/proxy/", "/bench/edge/")}", -> { [stack[:puma].pid] }]
      end
      if rack && stack[:rack]
        list["rack_inline"] = ["#{stack[:rack].url}/bench/inline_1k", -> { [stack[:rack].pid] }] if extra.key?("inline")
        list["rack_proxy_fetch"] = ["#{stack[:rack].url}#{proxy}", -> { [stack[:rack].pid] }] if proxy
      end
      list
    end

    # Starts origin, nginx and Puma (and the plain-Rack Puma with
    # `rack: true`, the bare relay with `relay: true`); always stops them.
    def with_stack(puma_env: {}, rack: false, nginx_large_downloads: false, relay: false)
      stack = {}
      stack[:origin] = Origin.new.start
      stack[:relay] = Origin.new(relay_to: stack[:origin].port).start if relay
      stack[:nginx] = Nginx.new(stack[:origin].port, large_downloads: nginx_large_downloads).start if @with_nginx
      stack[:puma] = Puma.new(stack[:origin].url, env: puma_env).start
      if rack
        stack[:rack] = Puma.new(stack[:origin].url, env: puma_env, name: "puma-rack",
                                                    rackup: File.join(__dir__, "rack_app.ru")).start
      end
      yield stack
    ensure
      %i[rack puma nginx relay origin].each { |key| stack[key]&.stop }
    end

    # A path that answered nothing (or `ok` short of its requests): keep
    # what the proxy's threads were blocked on, for the report and the log.
    def with_stuck_threads(result, ok, pids)
      ok ||= result["ok"] == result["requests"] ? 1 : 0
      return result if ok.positive? || pids.empty?

      states = pids.to_h { |pid| [pid.to_s, Bench::Proc.thread_states(pid)] }
      say "  answered nothing; thread states: #{states.inspect}"
      result.merge("threads_when_failed" => states)
    end

    def cpu(pids)
      return nil if pids.empty?

      values = pids.map { |pid| Bench::Proc.cpu_seconds(pid) }
      values.all? ? values.sum : nil
    end

    def median(values)
      sorted = values.compact.sort
      return nil if sorted.empty?

      mid = sorted.size / 2
      sorted.size.odd? ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2.0
    end

    def origin_stats(origin)
      JSON.parse(Net::HTTP.get(URI("#{origin.url}/stats")))
    end

    # The previous path's streams must be gone before the next path starts.
    def wait_origin_idle(origin)
      Bench.wait_for("the origin's SSE streams to close", timeout: 30, interval: 0.2) do
        origin_stats(origin)["open_sse"].zero?
      end
    end
  end
end
