# frozen_string_literal: true

module Bench
  # The markdown tables and targets of the events scenario (issue 17's
  # "Numbers to reach"), from EventsScenario#run's Hash.
  class EventsReport
    LABELS = {
      "gem" => "threaded-proxy stream_events + publish (fan-out in Rust), Puma -t 2:2",
      "live" => "ActionController::Live, one Puma thread per stream (-t N:N)",
      "hijack" => "rack.hijack + Thread.new per stream, Ruby fan-out, Puma -t 2:2",
      "floor" => "yardstick: bare fan-out (bench-origin --mode fanout): a blocking send per stream from 2 threads, no Ruby, no runtime"
    }.freeze
    RSS_GOAL_KIB = 4.0
    STREAMS_GOAL = 19_000
    FANOUT_GOAL = 10_000
    RATE_SUBS_GOAL = 1000
    LATENCY_GOAL_MS = 50.0
    RATE_GOAL = 100_000
    INLINE_GOAL_MS = 50.0

    def initialize(result)
      @result = result
      @settings = result["settings"] || {}
    end

    def table
      out = ["", "### 5. Event streams from Ruby: one channel, SSE subscribers fed by publish (issue 17)"]
      out.concat(hold_table) if @result["hold"]
      out.concat(fanout_table) if @result["fanout"]
      out.concat(rate_table) if @result["rate"]
      out.concat(cluster_table) if @result["cluster"]
      out << "" << "Each row and measurement on a fresh Puma serving bench/events_app.ru; the clients are bench-loadgen's " \
                   "raw TCP SSE clients, and each event carries the publisher's CLOCK_MONOTONIC time, so latency is " \
                   "publish → parsed at the client. \"ready\" = open streams that received the warm-up publish; " \
                   "\"healthy\" = ready and received every measured publish. Live's Puma threads are all started " \
                   "before the RSS baseline, so its RSS per stream leaves out the Puma thread each stream holds. " \
                   "A row that could not run says why."
    end

    # [target, measured, met, floor] rows for Report's targets table.
    def targets
      list = []
      if (r = row("hold", "gem"))
        list << ["Events: #{STREAMS_GOAL} streams in one Puma, all receiving", "#{r["healthy"]} healthy of #{r["streams"]}",
                 r["healthy"] >= STREAMS_GOAL, others("hold") { |o| "#{o["healthy"]} healthy" }]
        kib = r["rss_per_stream_kb"]
        list << ["Events: RSS per stream ≤ #{RSS_GOAL_KIB} KiB", "#{f(kib)} KiB", kib && kib <= RSS_GOAL_KIB,
                 others("hold") { |o| "#{f(o["rss_per_stream_kb"])} KiB" }]
      end
      if (r = row("fanout", "gem"))
        p99 = r["last_p99_ms"]
        list << ["Events: one publish to #{FANOUT_GOAL} (here #{r["ready"]}) reaches the last ≤ #{LATENCY_GOAL_MS.to_i} ms (p99 of #{r["publishes"]})",
                 "#{f(p99)} ms", p99 && r["ready"] >= FANOUT_GOAL && p99 <= LATENCY_GOAL_MS,
                 others("fanout") { |o| "#{f(o["last_p99_ms"])} ms for #{o["ready"]}" }]
      end
      if (r = row("rate", "gem")) && (rate = r["rate"])
        inline = rate.dig("probe", "p99_ms")
        list << ["Events: delivered ≥ #{RATE_GOAL} events/s to #{RATE_SUBS_GOAL} (here #{r["ready"]}), inline p99 ≤ #{INLINE_GOAL_MS.to_i} ms",
                 "#{f(rate["delivered_per_s"], 0)} events/s, inline p99 #{f(inline)} ms",
                 r["ready"] >= RATE_SUBS_GOAL && rate["delivered_per_s"] >= RATE_GOAL && inline && inline <= INLINE_GOAL_MS,
                 others("rate") { |o| "#{f(o.dig("rate", "delivered_per_s"), 0)}/s, inline p99 #{f(o.dig("rate", "probe", "p99_ms"))} ms" }]
      end
      if (r = row("cluster", "gem"))
        list << ["Events: two workers with events_url, p99 for #{r["ready"]} subscribers (report)",
                 "#{f(r["delivery_p99_ms"])} ms (last subscriber p99 #{f(r["last_p99_ms"])} ms)", nil, nil]
      end
      list
    end

    private

    def f(value, digits = 1)
      value.nil? ? "n/a" : format("%.#{digits}f", value)
    end

    # A measured row (no error), or nil.
    def row(measurement, name)
      r = @result.dig(measurement, name)
      r.is_a?(Hash) && !r["error"] ? r : nil
    end

    # The Ruby rows and the yardstick of the same measurement, for the
    # targets' last column.
    def others(measurement)
      %w[live hijack floor].filter_map do |name|
        r = @result.dig(measurement, name)
        next unless r.is_a?(Hash)

        "#{name}: #{r["error"] ? "could not run" : yield(r)}"
      end.join("; ")
    end

    def rows(measurement)
      @result[measurement].map do |name, r|
        next "| #{LABELS.fetch(name, name)} | **could not run:** #{r["error"]} |" if r["error"]

        yield(LABELS.fetch(name, name), r)
      end
    end

    # Streams that failed, by kind; and a publish that failed (which ended
    # the measurement there).
    def failures(r)
      text = r["failures"].to_h.map { |kind, n| "#{n} #{kind}" }
      text << "stopped: #{r["publish_error"]}" if r["publish_error"]
      text << "Puma died: #{r["puma_died"].lines.last.strip}" if r["puma_died"]
      text.empty? ? "0" : text.join(", ")
    end

    def hold_table
      ["", "#{@settings["streams"]} streams asked (Live: #{@settings["live_streams"]}), held #{f(@settings["hold_secs"], 0)} s:", "",
       "| path | opened | ready | healthy | ramp s | RSS before → plateau MiB | RSS per stream KiB | fds at plateau | failures |",
       "|---|---:|---:|---:|---:|---:|---:|---:|---|"] +
        rows("hold") do |label, r|
          rss = [r["rss_baseline_kb"], r["rss_plateau_kb"]].map { |kb| f(kb && kb / 1024.0) }.join(" → ")
          opened = r["open_peak"].to_i > r["opened"] ? "#{r["opened"]} (#{r["open_peak"]} at most)" : r["opened"]
          "| #{label} | #{opened} | #{r["ready"]} | #{r["healthy"]} | #{f(r["ramp_secs"])} | #{rss} | " \
            "#{f(r["rss_per_stream_kb"], 2)} | #{r["fds_plateau"]&.to_i || "n/a"} | #{failures(r)} |"
        end
    end

    def fanout_table
      ["", "One publish to #{@settings["fanout"]} subscribers, #{@settings["publishes"]} publishes one after another:", "",
       "| path | ready | last subscriber p50 ms | last subscriber p99 ms | max ms | every delivery p50 / p99 ms | deliveries missing | failures |",
       "|---|---:|---:|---:|---:|---:|---:|---|"] +
        rows("fanout") do |label, r|
          "| #{label} | #{r["ready"]} | #{f(r["last_p50_ms"])} | #{f(r["last_p99_ms"])} | #{f(r["last_max_ms"])} | " \
            "#{f(r["delivery_p50_ms"])} / #{f(r["delivery_p99_ms"])} | #{r["deliveries_missing"]} | #{failures(r)} |"
        end
    end

    def rate_table
      ["", "Most delivered events/s to #{@settings["rate_subs"]} subscribers for #{f(@settings["rate_secs"], 0)} s " \
           "(publishes of 50, at most 500 events per subscriber in flight), inline 1 KiB action probed every 10 ms:", "",
       "| path | delivered events/s | published events/s | not delivered | streams open before → after | inline p50 ms | inline p99 ms | inline max ms | inline samples |",
       "|---|---:|---:|---:|---:|---:|---:|---:|---:|"] +
        rows("rate") do |label, r|
          rate = r["rate"] || {}
          probe = rate["probe"] || {}
          "| #{label} | #{f(rate["delivered_per_s"], 0)} | #{f(rate["published_per_s"], 0)} | #{rate["not_delivered"]} | " \
            "#{rate["open_before"]} → #{rate["open_after"]} | #{f(probe["p50_ms"])} | #{f(probe["p99_ms"])} | " \
            "#{f(probe["max_ms"])} | #{probe["count"] || "n/a"} |#{" #{rate["error"]}" if rate["error"]}"
        end
    end

    def cluster_table
      ["", "Two Puma workers with events_url (PostgreSQL NOTIFY), #{@settings["cluster_subs"]} subscribers, " \
           "#{@settings["publishes"]} publishes (each lands on one worker):", "",
       "| path | ready | streams per worker | every delivery p50 / p99 ms | last subscriber p50 / p99 ms | deliveries missing |",
       "|---|---:|---|---:|---:|---:|"] +
        rows("cluster") do |label, r|
          spread = r["groups"].to_h.map { |pid, n| "#{pid}: #{n}" }.join(", ")
          "| #{label.sub("Puma -t 2:2", "2 workers -t 2:2")} | #{r["ready"]} | #{spread} | #{f(r["delivery_p50_ms"])} / #{f(r["delivery_p99_ms"])} | " \
            "#{f(r["last_p50_ms"])} / #{f(r["last_p99_ms"])} | #{r["deliveries_missing"]} |"
        end
    end
  end
end
