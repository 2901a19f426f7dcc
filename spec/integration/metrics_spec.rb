# frozen_string_literal: true

require "tmpdir"
require "fileutils"

# ThreadedProxy::Metrics (issue 15 item 14), mounted at /metrics in
# rails_test_app, scraped from real Puma after real proxied exchanges.
RSpec.describe "ThreadedProxy::Metrics (Prometheus exposition)" do
  # One parsed sample: name, labels Hash, value.
  Sample = Struct.new(:name, :labels, :value)

  def scrape(puma)
    response = RawHTTP.request("#{puma.url}/metrics")
    expect(response.status).to eq(200)
    expect(response["content-type"]).to start_with("application/openmetrics-text")
    text = response.body
    expect(text).to end_with("# EOF\n")
    types = text.scan(/^# TYPE (\S+) (\S+)$/).to_h
    samples = text.lines.grep_v(/\A#/).map do |line|
      name, labels, value = line.match(/\A([a-z_:][a-z0-9_:]*)(?:\{(.*)\})? (\S+)\n\z/i).captures
      Sample.new(name, labels.to_s.scan(/(\w+)="([^"]*)"/).to_h, Float(value))
    end
    [types, samples]
  end

  def value(samples, name, **labels)
    found = samples.select { |s| s.name == name && labels.all? { |k, v| s.labels[k.to_s] == v.to_s } }
    expect(found.size).to eq(1), "#{name} #{labels}: #{found.inspect}"
    found.first.value
  end

  def host_of(url)
    URI(url).then { |u| "#{u.host}:#{u.port}" }
  end

  context "in single mode" do
    before(:all) do
      @origin = OriginServer.new.start
      @origin2 = OriginServer.new.start
      @puma = PumaServer.new(
        env: { "ORIGIN_URL" => @origin.url, "ORIGIN2_URL" => @origin2.url,
               # Only the first origin is listed: the second is "other".
               "THREADED_PROXY_METRICS_HOSTS" => "#{host_of(@origin.url)},",
               # Deferred delivery runs here: its queue stats are exposed too.
               "ASYNC_QUEUE_PATH" => File.join(@queue_dir = Dir.mktmpdir("metrics-queue"), "queue.sqlite3") },
        threads: "2:2"
      ).start
    end

    after(:all) do
      @puma&.stop
      @origin&.stop
      @origin2&.stop
      FileUtils.rm_rf(@queue_dir) if @queue_dir
    end

    it "exposes every stats counter, gauges, and per-host histograms with the pid label" do
      3.times { expect(RawHTTP.request("#{@puma.url}/proxy/bytes?n=1000").status).to eq(200) }
      expect(RawHTTP.request("#{@puma.url}/proxy/slow?delay=0.3").status).to eq(200)
      2.times { expect(RawHTTP.request("#{@puma.url}/proxy2/status?code=200").status).to eq(200) }
      stats = StatsClient.wait_for(@puma) { |s| s["completed"] >= 6 && s["active"].zero? }
      expect(stats).not_to be_nil
      pid = stats["pid"]

      types, samples = scrape(@puma)
      expect(samples.map { |s| s.labels["pid"] }.uniq).to eq([pid.to_s])
      # Every numeric key of ThreadedProxy.stats is there, typed by name.
      (stats.keys - %w[pid open_fds rss_kb]).each do |key|
        expect(types).to have_key("threaded_proxy_#{key}"), key
      end
      expect(types["threaded_proxy_started"]).to eq("counter")
      expect(types["threaded_proxy_failed_connect"]).to eq("counter")
      expect(types["threaded_proxy_active"]).to eq("gauge")
      expect(types["threaded_proxy_callbacks_queued"]).to eq("gauge")
      expect(types["threaded_proxy_async_queued"]).to eq("gauge") # the queue depth
      expect(types["threaded_proxy_async_in_flight"]).to eq("gauge")
      expect(types["threaded_proxy_async_delivered"]).to eq("counter")
      expect(value(samples, "threaded_proxy_async_queued")).to eq(0)
      expect(value(samples, "threaded_proxy_completed_total")).to be >= 6
      expect(value(samples, "threaded_proxy_active")).to eq(0)
      expect(value(samples, "threaded_proxy_bytes_from_origin_total")).to be >= 3000

      listed = host_of(@origin.url)
      expect(types["threaded_proxy_total_time_seconds"]).to eq("histogram")
      expect(types["threaded_proxy_time_to_first_byte_seconds"]).to eq("histogram")
      expect(value(samples, "threaded_proxy_total_time_seconds_count", host: listed)).to eq(4)
      expect(value(samples, "threaded_proxy_time_to_first_byte_seconds_count", host: listed)).to eq(4)
      expect(value(samples, "threaded_proxy_total_time_seconds_count", host: "other")).to eq(2)
      expect(value(samples, "threaded_proxy_time_to_first_byte_seconds_count", host: "other")).to eq(2)
      expect(samples.map { |s| s.labels["host"] }.compact.uniq).to match_array([listed, "other"])

      # Buckets are cumulative, end at +Inf with the count, and the 0.3 s
      # answer is above the 0.25 s bound.
      buckets = samples.select { |s| s.name == "threaded_proxy_total_time_seconds_bucket" && s.labels["host"] == listed }
      by_bound = buckets.to_h { |s| [s.labels["le"], s.value] }
      expect(by_bound["+Inf"]).to eq(4)
      expect(buckets.map(&:value)).to eq(buckets.map(&:value).sort)
      expect(by_bound["0.25"]).to eq(3)
      expect(by_bound["0.5"]).to eq(4)
      expect(value(samples, "threaded_proxy_total_time_seconds_sum", host: listed)).to be >= 0.3
      expect(value(samples, "threaded_proxy_time_to_first_byte_seconds_bucket", host: listed, le: "0.25")).to eq(3)
    end
  end

  context "in cluster mode" do
    before(:all) do
      @origin = OriginServer.new.start
      @puma = PumaServer.new(env: { "ORIGIN_URL" => @origin.url }, threads: "2:2", workers: 2).start
    end

    after(:all) do
      @puma&.stop
      @origin&.stop
    end

    it "answers for the worker that got the scrape, with that worker's pid" do
      workers = @puma.worker_pids
      expect(workers.size).to eq(2)
      served = Hash.new(0)
      20.times do
        response = RawHTTP.request("#{@puma.url}/pid_proxy/bytes?n=100")
        expect(response.status).to eq(200)
        served[Integer(response["x-worker-pid"])] += 1
      end
      scraped = {}
      50.times do # until both workers answered a scrape (bounded)
        _types, samples = scrape(@puma)
        pids = samples.map { |s| Integer(s.labels["pid"]) }.uniq
        expect(pids.size).to eq(1)
        scraped[pids.first] = samples
        break if scraped.size == 2
      end
      expect(scraped.keys).to match_array(workers)
      scraped.each do |pid, samples|
        # Each worker counts only the exchanges it ran (unlisted host: "other").
        counts = samples.select { |s| s.name == "threaded_proxy_total_time_seconds_count" }
        expect(counts.map { |s| [s.labels["host"], s.value] }).to eq(served[pid].zero? ? [] : [["other", served[pid]]])
        expect(value(samples, "threaded_proxy_completed_total")).to eq(served[pid])
      end
    end
  end
end
