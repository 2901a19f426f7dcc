# frozen_string_literal: true

module Bench
  # The markdown table and targets of the machine scenario (issue 18's
  # "Numbers"), from MachineScenario#run's Hash.
  class MachineReport
    LABELS = {
      "machine" => "ThreadedProxy::Machine, Ruby block routing on the first bytes (bench/machine_server.rb)",
      "haproxy" => "HAProxy, mode tcp, inspect-delay + use_backend on req.payload",
      "direct" => "direct to the sink (no proxy)"
    }.freeze
    THROUGHPUT_GOAL = 1.0
    SHORT_GOAL = 0.5

    def initialize(result)
      @result = result
      @rows = result["rows"] || {}
      @settings = result["settings"] || {}
    end

    def table
      s = @settings
      out = ["", "### 6. The machine: content-routed TCP beside HAProxy (issue 18)", "",
             "| path | #{gib(s["bytes"])} push MB/s | proxy CPU s/GiB | short c=#{s["connections"]}, #{f(s["secs"], 0)} s: conn/s | " \
             "proxy CPU µs/exchange | RSS KiB per idle routed connection (#{s["idle"]}) |",
             "|---|---:|---:|---:|---:|---:|"]
      @rows.each do |name, row|
        if row["error"]
          out << "| #{LABELS.fetch(name, name)} | #{row["error"]} | | | | |"
          next
        end
        push, short, idle = row.values_at("push", "short", "idle")
        out << "| #{LABELS.fetch(name, name)} | #{cell(push, "mb_per_s", 0)} | #{cell(push, "cpu_s_per_gib", 2)} | " \
               "#{cell(short, "per_s", 0)}#{failed(short)} | #{cell(short, "proxy_cpu_us_per_exchange", 0)} | " \
               "#{cell(idle, "rss_kib_per_connection", 2)} |"
      end
      if (route = @result["route"])
        out << "" << (route["error"] ? "Routing block cost: #{route["error"]}" :
                      "Routing block: #{f(route["us_per_call"], 1)} µs per call over #{route["route_calls"]} calls " \
                      "(Machine#stats route_seconds / route_calls, the whole run).")
      end
      out << "" << "The sink and the clients are bench-loadgen (`tcp-sink`, `tcp`, Rust); every connection sends \"GO\" " \
                   "first. Proxy CPU is utime + stime of the proxy's process from /proc; RSS per idle connection is " \
                   "(VmRSS with the connections held, each having seen the sink's greeting) − (VmRSS before) over the count."
    end

    # [target, measured, met, floor] rows for Report's targets table.
    def targets
      m, h = @rows["machine"], @rows["haproxy"]
      return [] unless ok?(m) && ok?(h)

      list = []
      mp, hp = m["push"], h["push"]
      if ok?(mp) && ok?(hp)
        r = ratio(mp["mb_per_s"], hp["mb_per_s"])
        list << ["Machine: 1 GiB routed ≥ #{THROUGHPUT_GOAL}× HAProxy's MB/s", "#{f(mp["mb_per_s"], 0)} vs #{f(hp["mb_per_s"], 0)} MB/s = #{f(r, 2)}×",
                 r && r >= THROUGHPUT_GOAL, nil]
        mc, hc = mp["cpu_s_per_gib"], hp["cpu_s_per_gib"]
        list << ["Machine: less proxy CPU per GiB than HAProxy", "#{f(mc, 2)} vs #{f(hc, 2)} s/GiB", mc && hc && mc < hc, nil]
      end
      ms, hs = m["short"], h["short"]
      if ok?(ms) && ok?(hs)
        r = ratio(ms["per_s"], hs["per_s"])
        us = @result.dig("route", "us_per_call")
        list << ["Machine: short routed exchanges c=#{@settings["connections"]} ≥ #{SHORT_GOAL}× HAProxy's conn/s",
                 "#{f(ms["per_s"], 0)} vs #{f(hs["per_s"], 0)}/s = #{f(r, 2)}× (block #{f(us, 1)} µs/call)", r && r >= SHORT_GOAL, nil]
      end
      mi, hi = m["idle"], h["idle"]
      if ok?(mi) && ok?(hi)
        a, b = mi["rss_kib_per_connection"], hi["rss_kib_per_connection"]
        list << ["Machine: RSS per idle routed connection ≤ HAProxy's", "#{f(a, 2)} vs #{f(b, 2)} KiB", a && b && a <= b, nil]
      end
      list
    end

    private

    def ok?(value) = value.is_a?(Hash) && !value["error"]

    def cell(measurement, key, digits)
      return "" unless measurement
      return measurement["error"].to_s if measurement["error"]

      f(measurement[key], digits)
    end

    def failed(short)
      short.is_a?(Hash) && short["failed"].to_i.positive? ? " (#{short["failed"]} failed)" : ""
    end

    def gib(bytes)
      bytes.to_i >= (1 << 30) ? "#{f(bytes.to_f / (1 << 30), 0)} GiB" : "#{f(bytes.to_f / (1 << 20), 0)} MiB"
    end

    def ratio(a, b) = a && b && b.positive? ? a.to_f / b : nil

    def f(value, digits = 1)
      value.nil? ? "–" : format("%.#{digits}f", value)
    end
  end
end
