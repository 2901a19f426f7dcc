# frozen_string_literal: true

require "net/http"
require_relative "harness"

module Bench
  # Scenario 5 (issue 17): SSE subscribers on one channel fed by publishes,
  # done three ways in one run, each on a fresh Puma serving
  # bench/events_app.ru:
  #   gem    - ThreadedProxy's stream_events + ThreadedProxy.publish
  #   live   - ActionController::Live, one Puma thread per stream (-t N:N)
  #   hijack - rack.hijack + Thread.new per stream, Ruby in-process fan-out
  #   floor  - fanout only: bench-origin --mode fanout, no Puma, no Ruby, no
  #            runtime: a publish is a blocking send(2) per stream from two
  #            threads, the yardstick of what the kernel and the clients
  #            cost on these 2 cores
  # Measurements (bench-loadgen `events`, raw TCP SSE clients that timestamp
  # every event against the publish time it carries):
  #   hold    - STREAMS open streams, all receiving; RSS per stream
  #   fanout  - one publish to FANOUT subscribers: the last one's latency,
  #             p99 over PUBLISHES publishes
  #   rate    - the most delivered events/s to RATE_SUBS subscribers while
  #             an inline action on the same Puma (-t 2:2) is probed
  #   cluster - gem only: two Puma workers with events_url (a PostgreSQL the
  #             scenario starts), CLUSTER_SUBS subscribers over both
  # A row whose Puma cannot do a measurement (no stream_events in this gem,
  # out of threads or descriptors) reports an error or how far it got; the
  # others still run.
  class EventsScenario
    ROWS = %w[gem live hijack floor].freeze
    # The rows that are not a Puma app measure only this.
    FLOOR_MEASUREMENTS = %w[fanout].freeze
    MEASUREMENTS = %w[hold fanout rate cluster].freeze
    RACKUP = File.join(__dir__, "events_app.ru")

    # Tunables (BENCH_EVENTS_*), for quick runs.
    STREAMS = Integer(ENV.fetch("BENCH_EVENTS_STREAMS", "19000"))
    # How many the Live row tries to hold (one Puma thread each, -t N:N).
    LIVE_STREAMS = Integer(ENV.fetch("BENCH_EVENTS_LIVE_STREAMS", STREAMS.to_s))
    FANOUT = Integer(ENV.fetch("BENCH_EVENTS_FANOUT", "10000"))
    PUBLISHES = Integer(ENV.fetch("BENCH_EVENTS_PUBLISHES", "20"))
    RATE_SUBS = Integer(ENV.fetch("BENCH_EVENTS_RATE_SUBS", "1000"))
    RATE_SECS = Float(ENV.fetch("BENCH_EVENTS_RATE_SECS", "5"))
    CLUSTER_SUBS = Integer(ENV.fetch("BENCH_EVENTS_CLUSTER_SUBS", "1000"))
    HOLD_SECS = Float(ENV.fetch("BENCH_EVENTS_HOLD", "5"))
    SELECTED_ROWS = ENV.fetch("BENCH_EVENTS_ROWS", ROWS.join(",")).split(",")
    SELECTED_MEASUREMENTS = ENV.fetch("BENCH_EVENTS_MEASURE", MEASUREMENTS.join(",")).split(",")

    def self.settings
      { "streams" => STREAMS, "live_streams" => LIVE_STREAMS, "fanout" => FANOUT, "publishes" => PUBLISHES,
        "rate_subs" => RATE_SUBS, "rate_secs" => RATE_SECS, "cluster_subs" => CLUSTER_SUBS, "hold_secs" => HOLD_SECS,
        "rows" => SELECTED_ROWS, "measurements" => SELECTED_MEASUREMENTS }
    end

    def initialize(say:)
      @say = say
    end

    def run
      unknown = (SELECTED_ROWS - ROWS) + (SELECTED_MEASUREMENTS - MEASUREMENTS)
      raise Error, "unknown BENCH_EVENTS_ROWS/MEASURE entries: #{unknown.join(", ")}" unless unknown.empty?

      results = { "settings" => self.class.settings }
      (SELECTED_MEASUREMENTS - ["cluster"]).each do |measurement|
        rows = SELECTED_ROWS.reject { |row| row == "floor" && !FLOOR_MEASUREMENTS.include?(measurement) }
        results[measurement] = rows.to_h do |row|
          @say.call("events: #{measurement}, #{row}")
          [row, guarded { public_send(measurement, row) }]
        end
      end
      if SELECTED_MEASUREMENTS.include?("cluster") && SELECTED_ROWS.include?("gem")
        @say.call("events: cluster, gem")
        results["cluster"] = { "gem" => guarded { cluster } }
      end
      # The gem is what the scenario measures: a gem row that could not run
      # fails the run (Bench.run), after the report is written.
      failed = MEASUREMENTS.select { |m| results.dig(m, "gem").is_a?(Hash) && results.dig(m, "gem", "error") }
      results["gem_rows_failed"] = failed unless failed.empty?
      results
    end

    def hold(row)
      streams = row == "live" ? LIVE_STREAMS : STREAMS
      with_puma(row, streams) do |puma|
        drive(puma, row, streams: streams, publishes: 3, hold_secs: HOLD_SECS, watch_pid: puma.pid)
      end
    end

    def fanout(row)
      return floor_fanout if row == "floor"

      with_puma(row, FANOUT) do |puma|
        drive(puma, row, streams: FANOUT, publishes: PUBLISHES, watch_pid: puma.pid)
      end
    end

    def floor_fanout
      origin = Origin.new(fanout: true).start
      drive_at(origin.url, streams: FANOUT, publishes: PUBLISHES, watch_pid: origin.pid)
    ensure
      origin&.stop
    end

    def rate(row)
      with_puma(row, RATE_SUBS) do |puma|
        drive(puma, row, streams: RATE_SUBS, publishes: 3, rate_secs: RATE_SECS, rate_batch: 50, rate_window: 500,
                         probe_url: "#{puma.url}/bench/inline_1k", watch_pid: puma.pid)
      end
    end

    # Two workers, events_url on a PostgreSQL of its own; the publish lands
    # on whichever worker accepts it and reaches both through NOTIFY.
    def cluster
      require_relative "../spec/support/postgres_server"
      postgres = PostgresServer.new.start
      url = postgres.create_database("bench_events")
      with_puma("gem", CLUSTER_SUBS, workers: 2, env: { "THREADED_PROXY_EVENTS_URL" => url }) do |puma|
        drive(puma, "gem", streams: CLUSTER_SUBS, publishes: PUBLISHES, group_header: "x-worker")
      end
    rescue PostgresServer::Unavailable => e
      raise Error, "no PostgreSQL for the cluster row: #{e.message.lines.first.strip}"
    ensure
      postgres&.stop
    end

    private

    def guarded(&measurement)
      Bench.guarded("events", @say, &measurement)
    end

    # A fresh Puma for one row and measurement. Live needs a Puma thread per
    # stream (and a few for publish and the probe): -t N+4:N+4. (With
    # -t 4:N+4, Puma 5.6 stopped starting threads part way: 179 of 300
    # streams, the rest waited in its queue.) Its N threads exist before the
    # RSS baseline is read, so Live's RSS per stream leaves them out. The
    # others -t 2:2. The gem's limits are raised to the streams asked for:
    # one fd each.
    def with_puma(row, streams, workers: 0, env: {})
      threads = row == "live" ? "#{streams + 4}:#{streams + 4}" : "2:2"
      limit = (streams + 100).to_s
      env = { "THREADED_PROXY_MAX_CONNECTIONS" => limit, "THREADED_PROXY_FD_BUDGET" => limit,
              "THREADED_PROXY_SHUTDOWN_TIMEOUT" => "2" }.merge(env)
      puma = Puma.new("http://127.0.0.1:9", threads: threads, env: env, rackup: RACKUP, name: "puma-events-#{row}",
                                             workers: workers, boot_timeout: row == "live" ? 300 : 60).start
      check(puma, row)
      result = yield(puma).merge("puma_threads" => threads, "workers" => workers)
      # A Ruby row can take its Puma down (out of threads or memory maps):
      # say so, with the last error it logged (a crash ends with a map dump).
      unless puma.alive?
        lines = puma.log.lines.map(&:strip).reject(&:empty?)
        result["puma_died"] = lines.reverse.find { |line| line.match?(/\[BUG\]|\[FATAL\]|Error/) } || lines.last.to_s
      end
      result
    ensure
      puma&.stop
    end

    # The row's API must be there (the gem row needs issue 17): fail now,
    # with the app's reason, rather than open streams that never get events.
    def check(puma, row)
      response = Net::HTTP.start("127.0.0.1", puma.port, open_timeout: 5, read_timeout: 10) do |http|
        http.get("/bench/events/#{row}/check")
      end
      raise Error, "#{row} row cannot run: #{response.body.strip}" unless response.code == "200"
    end

    def drive(puma, row, **options)
      drive_at("#{puma.url}/bench/events/#{row}", **options)
    end

    # bench-loadgen's SSE clients on BASE/stream, publishing through
    # BASE/publish.
    def drive_at(base, streams:, watch_pid: nil, **options)
      Loadgen.run("events", url: "#{base}/stream", publish_url: "#{base}/publish",
                            streams: streams, window: 256, watch_pid: watch_pid, timeout: 900, **options)
    end
  end
end
