# frozen_string_literal: true

require "etc"
require_relative "harness"
require_relative "events_report"
require_relative "machine_report"

module Bench
  # What the run ran on, and whether something else was competing for the
  # two cores (other engineers' test suites make the numbers noisy).
  module Machine
    module_function

    def describe
      {
        "cpu" => File.read("/proc/cpuinfo")[/^model name\s*:\s*(.+)$/, 1],
        "cores" => Etc.nprocessors,
        "memory_gib" => (File.read("/proc/meminfo")[/^MemTotal:\s+(\d+)/, 1].to_i / 1024.0 / 1024).round(1),
        "kernel" => `uname -sr`.strip,
        "os" => File.exist?("/etc/debian_version") ? "Debian #{File.read("/etc/debian_version").strip}" : "unknown",
        "ruby" => RUBY_DESCRIPTION,
        "puma" => gem_version("puma"),
        "rails" => gem_version("railties"),
        "nginx" => nginx_version,
        "rustc" => `rustc --version 2>/dev/null`.strip,
        "fd_limit" => Process.getrlimit(:NOFILE).join("/")
      }
    end

    def gem_version(name)
      Gem::Specification.find_by_name(name).version.to_s
    rescue Gem::MissingSpecError
      "?"
    end

    def nginx_version
      binary = Nginx.binary
      binary ? `#{binary} -v 2>&1`.strip.sub("nginx version: ", "") : "not installed"
    end

    # Other processes (not ours) that used more than 5% of a core over
    # `window` seconds, busiest first, plus the load average.
    def competition(window: 1.0)
      mine = Process.pid
      before = cpu_by_pid
      sleep window
      after = cpu_by_pid
      busy = after.filter_map do |pid, (ticks, cmd)|
        next if pid == mine || cmd.empty? || !before[pid]

        share = (ticks - before[pid][0]).fdiv(CLK_TCK) / window
        [share, pid, cmd] if share > 0.05
      end
      {
        "loadavg" => File.read("/proc/loadavg").split.first(3).join(" "),
        "busy" => busy.sort.reverse.first(5).map { |share, pid, cmd| "#{(share * 100).round}% #{pid} #{cmd[0, 80]}" }
      }
    end

    def cpu_by_pid
      Dir.glob("/proc/[0-9]*/stat").each_with_object({}) do |path, by_pid|
        pid = Integer(path[%r{/proc/(\d+)/}, 1])
        fields = File.read(path).split(") ", 2).last.split
        by_pid[pid] = [Integer(fields[11]) + Integer(fields[12]), Bench::Proc.cmdline(pid)]
      rescue Errno::ENOENT, Errno::ESRCH, ArgumentError
        next
      end
    end
  end

  # Markdown tables and the target checks, from the results Hash.
  class Report
    PATH_LABELS = {
      "direct" => "direct to origin",
      "nginx" => "nginx proxy_pass",
      "inline" => "Puma inline 1 KiB action",
      "proxy_fetch" => "proxy_fetch under Puma",
      "proxy_fetch_edge" => "proxy_fetch from ThreadedProxy::Middleware at the head of the same Rails app",
      "proxy_fetch_again" => "diagnostic: proxy_fetch again, same Puma (heap already grown)",
      "rack_inline" => "diagnostic: plain Rack inline 1 KiB, same Puma settings",
      "rack_proxy_fetch" => "diagnostic: ThreadedProxy.call in plain Rack, same Puma settings",
      "relay" => "diagnostic: bare splice relay (bench-origin --relay-to): one hop with no HTTP, no Ruby"
    }.freeze
    # Scenario 2 sends the 1,000 themselves to the inline rows.
    THREADS_LABELS = PATH_LABELS.merge(
      "inline" => "no proxy: the 1,000 to the Rails app's inline 1 KiB action (same Puma)",
      "rack_inline" => "no proxy: the 1,000 to plain Rack's inline 1 KiB (same Puma settings)"
    ).freeze

    # The rows the targets are checked on: the controller action, and the
    # same Rails app's ThreadedProxy::Middleware route.
    ROUTES = { "proxy_fetch" => "", "proxy_fetch_edge" => " (middleware route)" }.freeze
    # The no-proxy row under a route: the controller action is behind the
    # whole Rails app; the middleware route is not, so its floor is plain
    # Rack under the same Puma settings.
    FLOOR_ROW = { "proxy_fetch" => ["inline", "the Rails app"], "proxy_fetch_edge" => ["rack_inline", "plain Rack"] }.freeze
    # "nginx opens 10,000 in ~5 s here" (issue 5).
    SSE_RAMP_SECS = 5

    def initialize(results)
      @results = results
      @scenarios = results.fetch("scenarios")
    end

    def markdown
      out = []
      out << "Run #{@results["started_at"]} (#{@results["duration_secs"]} s): `#{@results["command"]}`"
      out << ""
      out << machine_line
      out << ""
      out.concat(download_table) if @scenarios["download"]
      out.concat(threads_table) if @scenarios["threads"]
      out.concat(sse_table) if @scenarios["sse"]
      out.concat(small_table) if @scenarios["small"]
      out.concat(error_rows("events") || EventsReport.new(@scenarios["events"]).table) if @scenarios["events"]
      out.concat(error_rows("machine") || MachineReport.new(@scenarios["machine"]).table) if @scenarios["machine"]
      out.concat(targets_table)
      out.concat(noise_lines)
      out.join("\n")
    end

    def targets
      @targets ||= compute_targets
    end

    private

    def machine_line
      m = @results["machine"]
      "Machine: #{m["cpu"]}, #{m["cores"]} cores, #{m["memory_gib"]} GiB, #{m["os"]}, #{m["kernel"]}; " \
        "#{m["ruby"].split(" [").first}, Puma #{m["puma"]}, Rails #{m["rails"]}, nginx #{m["nginx"]}, " \
        "#{m["rustc"]}; fd limit (soft/hard) #{m["fd_limit"]}."
    end

    def f(value, digits = 1)
      return "n/a" if value.nil?

      format("%.#{digits}f", value)
    end

    def error_rows(name)
      result = @scenarios[name]
      result.is_a?(Hash) && result["error"] ? ["", "**#{name} failed:** #{result["error"]}", ""] : nil
    end

    def rows_for(name, keys = PATH_LABELS.keys)
      result = @scenarios[name]
      keys.select { |key| result[key].is_a?(Hash) }.map { |key| [key, result[key]] }
    end

    def failures_text(result)
      bad = result["failures"].to_h.map { |kind, n| "#{n} #{kind}" }
      non_ok = result["statuses"].to_h.reject { |status, _| status.start_with?("2") }.map { |s, n| "#{n}×#{s}" }
      (bad + non_ok).empty? ? "0" : (bad + non_ok).join(", ")
    end

    def download_table
      return error_rows("download") if error_rows("download")

      out = ["", "### 1. One 1 GiB download (median of #{rows_for("download").first&.last&.dig("runs")&.size} runs)", "",
             "| path | MB/s (median) | best MB/s | seconds | proxy CPU s per GiB | all CPU s per GiB | each run MB/s |",
             "|---|---:|---:|---:|---:|---:|---|"]
      rows_for("download").each do |key, r|
        runs = r["runs"].map { |run| f(run["mb_per_s"], 0) }.join(" / ")
        out << "| #{PATH_LABELS[key]} | #{f(r["mb_per_s"], 0)} | #{f(r["best_mb_per_s"], 0)} | #{f(r["secs"], 2)} | " \
               "#{f(r["cpu_s_per_gib"], 2)} | #{f(r["total_cpu_s_per_gib"], 2)} | #{runs} |"
      end
      out << "" << "MB = 10^6 bytes; the paths take turns run by run. proxy CPU = utime+stime from /proc of the Puma process / " \
                   "the nginx workers, before and after each download (median); all CPU = proxy + origin + load driver, " \
                   "out of the 2 cores' budget of 2 CPU-seconds per second."
    end

    def threads_table
      return error_rows("threads") if error_rows("threads")

      out = ["", "### 2. Thread freedom: 1,000 concurrent requests, origin answers after 1 s, Puma -t 2:2", "",
             "| path | ok | wall s (all 1,000 done) | request p50 ms | request p99 ms | inline p50 ms | inline p99 ms | inline max ms | inline samples | proxy CPU s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
      rows_for("threads").each do |key, r|
        probe = r["probe"] || {}
        out << "| #{THREADS_LABELS[key]} | #{r["ok"]}/#{r["requests"]}#{" (#{failures_text(r)})" unless failures_text(r) == "0"} | " \
               "#{f(r["wall_secs"], 2)} | #{f(r["p50_ms"], 0)} | #{f(r["p99_ms"], 0)} | #{f(probe["p50_ms"], 1)} | " \
               "#{f(probe["p99_ms"], 1)} | #{f(probe["max_ms"], 1)} | #{probe["count"] || "n/a"} | #{f(r["cpu_s"], 2)} |"
      end
      out << "" << "Every request on a new connection. \"inline\": GET /bench/inline_1k on the same Puma, one at a time every 10 ms " \
                   "while the burst runs. proxy CPU = the Puma process (nginx: its workers) over the burst. " \
                   "The \"no proxy\" rows (run last) send the 1,000 to the inline action itself, no origin involved: " \
                   "how long that Puma takes to answer 1,000 connections arriving at once, the floor under any route through it."
      out.concat(stuck_notes("threads"))
    end

    def sse_table
      return error_rows("sse") if error_rows("sse")

      s = @scenarios["sse"]
      out = ["", "### 3. Concurrent SSE streams (event every 5 s), #{s["streams_asked"]} asked, held #{f(s["hold_secs"], 0)} s", "",
             "| path | opened | healthy | ramp s | proxy RSS before → plateau → after close MiB | RSS per stream KiB | proxy fds at plateau | origin streams at plateau | origin streams open 2 s after clients left | all closed after s | failures |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
      rows_for("sse").each do |key, r|
        rss = if r["rss_baseline_kb"]
                %w[rss_baseline_kb rss_plateau_kb rss_after_close_kb].map { |k| f(r[k] && r[k] / 1024.0) }.join(" → ")
              else
                "n/a"
              end
        out << "| #{PATH_LABELS[key]} | #{r["opened"]} | #{r["healthy"]} | #{f(r["ramp_secs"])} | #{rss} | " \
               "#{f(r["rss_per_stream_kb"])} | #{r["fds_plateau"]&.to_i || "n/a"} | #{r["origin_open_sse_plateau"]&.to_i} | " \
               "#{r["origin_open_sse_after_2s"]&.to_i} | #{f(r["origin_zero_after_secs"], 2)} | #{failures_text(r)} |"
      end
      out << "" << "healthy = open at the end of the hold and received at least one event during it. " \
                   "RSS per stream = (plateau − before) / healthy; nginx = its two workers. " \
                   "\"all closed after\" = time from the last client close until the origin counted 0 open streams (polled every 100 ms, n/a = not within 10 s). " \
                   "The middleware route runs on the same Puma after proxy_fetch, on a heap already grown (as the diagnostic row)."
    end

    def small_table
      return error_rows("small") if error_rows("small")

      rounds = rows_for("small").first&.last&.dig("rounds")&.size
      out = ["", "### 4. Small 1 KiB responses, 32 connections, new connection per request (median of #{rounds} rounds)", "",
             "| path | req/s | p50 ms | p99 ms | max ms | errors | proxy CPU µs per request | each round req/s |",
             "|---|---:|---:|---:|---:|---|---:|---|"]
      rows_for("small").each do |key, r|
        out << small_row(PATH_LABELS[key], r)
      end
      if (ka = @scenarios["small"]["keep_alive"])
        PATH_LABELS.each_key do |key|
          out << small_row("#{PATH_LABELS[key]} (keep-alive, for reference)", ka[key]) if ka[key]
        end
      end
      out << "" << "Closed loop: each connection sends its next request when the previous answer is complete; " \
                   "the paths take turns, round by round (1 s warm-up + #{f(@results.dig("settings", "small_secs"), 0)} s each); " \
                   "p50/p99 are medians of the rounds' percentiles. proxy_fetch always answers `Connection: close`, " \
                   "so it has no keep-alive row (keep-alive rows: one round)."
      out.concat(stuck_notes("small"))
    end

    # Thread states kept for paths that answered nothing.
    def stuck_notes(name)
      result = @scenarios[name]
      rows = rows_for(name).to_h
      rows.merge!(result["keep_alive"].transform_keys { |k| "#{k} (keep-alive)" }) if result["keep_alive"].is_a?(Hash)
      rows.filter_map do |key, r|
        next unless r.is_a?(Hash) && r["threads_when_failed"]

        r["threads_when_failed"].map do |pid, states|
          counts = states.tally.map { |state, n| n > 1 ? "#{n}× #{state}" : state }.join("; ")
          "- #{key} answered nothing; its process #{pid} had threads (name state wchan): #{counts}"
        end
      end.flatten.then { |notes| notes.empty? ? [] : [""] + notes }
    end

    def small_row(label, r)
      "| #{label} | #{f(r["rps"], 0)} | #{f(r["p50_ms"], 2)} | #{f(r["p99_ms"], 2)} | #{f(r["max_ms"], 1)} | " \
        "#{failures_text(r)} | #{f(r["cpu_us_per_request"], 0)} | #{r["rounds_rps"].to_a.map { |v| f(v, 0) }.join(" / ")} |"
    end

    def ratio(a, b)
      a && b && b.positive? ? a / b : nil
    end

    # [target, measured, met (true/false/nil = not measured), what a
    # no-proxy row of the same run reaches (nil where none applies)]
    def compute_targets
      list = []
      d = @scenarios["download"]
      if d.is_a?(Hash) && d["proxy_fetch"]
        p, dir, ng, relay = d["proxy_fetch"], d["direct"], d["nginx"], d["relay"]
        r = ratio(p["mb_per_s"], dir["mb_per_s"])
        hop = relay && "bare splice relay: #{f(relay["mb_per_s"], 0)} MB/s = #{f(ratio(relay["mb_per_s"], dir["mb_per_s"]), 2)}× direct"
        list << ["1 GiB: proxy_fetch ≥ 0.9× direct MB/s", "#{f(p["mb_per_s"], 0)} vs #{f(dir["mb_per_s"], 0)} MB/s = #{f(r, 2)}×", r && r >= 0.9, hop]
        r = ng && ratio(p["mb_per_s"], ng["mb_per_s"])
        list << ["1 GiB: proxy_fetch ≥ 1.0× nginx MB/s", "#{f(p["mb_per_s"], 0)} vs #{f(ng&.dig("mb_per_s"), 0)} MB/s = #{f(r, 2)}×", r && r >= 1.0, nil]
        pc, nc = p["cpu_s_per_gib"], ng&.dig("cpu_s_per_gib")
        list << ["1 GiB: proxy CPU s/GiB ≤ nginx's", "#{f(pc, 2)} vs #{f(nc, 2)} s/GiB", pc && nc && pc <= nc, nil]
      end
      t = @scenarios["threads"]
      ROUTES.each do |key, route|
        next unless t.is_a?(Hash) && (p = t[key])

        all_ok = p["ok"] == p["requests"]
        list << ["Thread freedom#{route}: 1,000 done ≤ 1.5 s", "#{f(p["wall_secs"], 2)} s, #{p["ok"]}/#{p["requests"]} ok",
                 all_ok && p["wall_secs"] <= 1.5, answer_floor(t, key)]
        p99 = p.dig("probe", "p99_ms")
        floor = (rack = t["rack_inline"]) && "no proxy, plain Rack: the probe waits #{f(rack.dig("probe", "p99_ms"), 1)} ms behind the 1,000"
        list << ["Thread freedom#{route}: inline p99 ≤ 50 ms", "#{f(p99, 1)} ms (p50 #{f(p.dig("probe", "p50_ms"), 1)} ms)", p99 && p99 <= 50, floor]
      end
      s = @scenarios["sse"]
      if s.is_a?(Hash) && s["proxy_fetch"]
        p, ng = s["proxy_fetch"], s["nginx"]
        list << ["SSE: ~9,900 streams healthy", "#{p["healthy"]} of #{s["streams_asked"]}", p["healthy"] >= s["streams_asked"] && s["streams_asked"] >= 9900, nil]
        ROUTES.each do |key, route|
          next unless (r = s[key])

          list << ["SSE#{route}: opened quickly (≤ #{SSE_RAMP_SECS} s, as nginx in the issue)",
                   "#{f(r["ramp_secs"])} s for #{r["opened"]} (nginx here: #{f(ng&.dig("ramp_secs"))} s)",
                   r["ramp_secs"] && r["ramp_secs"] <= SSE_RAMP_SECS, ramp_floor(t, key, r["opened"])]
        end
        pr, nr = p["rss_per_stream_kb"], ng&.dig("rss_per_stream_kb")
        list << ["SSE: RSS per stream ≤ nginx's", "#{f(pr)} vs #{f(nr)} KiB", pr && nr && pr <= nr, nil]
        after = p["origin_open_sse_after_2s"]
        list << ["SSE: all origin streams closed within 2 s", "#{after&.to_i.inspect} open after 2 s (0 after #{f(p["origin_zero_after_secs"], 2)} s)",
                 after && after.zero?, nil]
      end
      e = @scenarios["events"]
      list.concat(EventsReport.new(e).targets) if e.is_a?(Hash) && !e["error"]
      mr = @scenarios["machine"]
      list.concat(MachineReport.new(mr).targets) if mr.is_a?(Hash) && !mr["error"]
      sm = @scenarios["small"]
      ROUTES.each do |key, route|
        next unless sm.is_a?(Hash) && (p = sm[key]) && (i = sm["inline"])

        r = ratio(p["rps"], i["rps"])
        list << ["Small#{route}: proxy_fetch ≥ 1.0× inline req/s", "#{f(p["rps"], 0)} vs #{f(i["rps"], 0)} req/s = #{f(r, 2)}×", r && r >= 1.0, nil]
        list << ["Small#{route}: proxy_fetch p99 ≤ inline p99", "#{f(p["p99_ms"], 2)} vs #{f(i["p99_ms"], 2)} ms",
                 p["p99_ms"] && i["p99_ms"] && p["p99_ms"] <= i["p99_ms"], nil]
      end
      list
    end

    # Every one of the 1,000 passes through the route before its 1 s at the
    # origin starts: about as long as that Puma takes to answer 1,000 at once.
    def answer_floor(threads, key)
      row_key, who = FLOOR_ROW.fetch(key)
      return nil unless (row = threads[row_key]) && row["wall_secs"]

      "no proxy, #{who} takes #{f(row["wall_secs"], 2)} s to answer the 1,000; with the origin's 1 s: ≈ #{f(row["wall_secs"] + 1, 2)} s"
    end

    # Each stream is one pass through the route, at best at the rate that
    # Puma answers connections arriving together (scenario 2's no-proxy row).
    def ramp_floor(threads, key, streams)
      row_key, who = FLOOR_ROW.fetch(key)
      return nil unless threads.is_a?(Hash) && (row = threads[row_key]) && row["wall_secs"]&.positive? && streams

      rate = row["requests"] / row["wall_secs"]
      "no proxy, #{who} answers #{f(rate, 0)} new connections/s (scenario 2): #{streams} take ≈ #{f(streams / rate)} s"
    end

    def targets_table
      return [] if targets.empty?

      out = ["", "### Targets", "", "| target | measured | met | the same Puma or hop with no proxy work (this run) |", "|---|---|---|---|"]
      targets.each do |name, measured, met, floor|
        out << "| #{name} | #{measured} | #{met.nil? ? "n/a" : (met ? "yes" : "**no**")} | #{floor || ""} |"
      end
      out
    end

    def noise_lines
      notes = @results["competition"].to_h.filter_map do |scenario, c|
        "#{scenario}: load #{c["loadavg"]}#{c["busy"].empty? ? "" : "; busy others: #{c["busy"].join("; ")}"}"
      end
      return [] if notes.empty?

      ["", "Other load when each scenario started (loadavg 1/5/15 min; processes not ours above 5% of a core):", ""] +
        notes.map { |line| "- #{line}" }
    end
  end
end
