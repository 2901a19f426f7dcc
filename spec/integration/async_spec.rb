# frozen_string_literal: true

require "json"
require "tmpdir"
require "digest"

# proxy_async against real Puma (rails_test_app, AsyncController) and real
# origins: the request is durable before the client gets its answer, and the
# Rust worker delivers it in the background. The same examples run on both
# backends: the embedded SQLite queue and PostgreSQL (a private server on
# loopback, started once for this file).
RSpec.shared_examples "a deferred delivery queue" do
  it "answers 202 at once with the request on disk and delivers it byte-identical" do
    up = origin
    server = puma(up.url)
    small = "small body \x00\xFF".b
    large = OriginServer.pattern_bytes(300 * 1024) # above Puma's 112 KiB: a Tempfile

    started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    slow = post_async(server, "slow?delay=2", tag: "slow", body: small)
    answered_in = Process.clock_gettime(Process::CLOCK_MONOTONIC) - started
    expect(slow.status).to eq(202)
    expect(slow.body).to eq("")
    expect(answered_in).to be < 1.5 # the origin takes 2 s; the client did not wait

    big = post_async(server, "echo", tag: "large", body: large)
    expect(big.status).to eq(202)
    expect(Integer(big["x-delivery-id"])).to be_positive
    string = RawHTTP.request("#{server.url}/async/deliver_string/echo", method: "POST", headers: { "X-Tag" => "string" })
    expect(string.status).to eq(200)

    expect(up.wait_until(timeout: 20) { up.tags.sort == %w[large slow string] }).to be(true)
    expect(eventually { settled?(stats(server), delivered: 3) }).to be(true), stats(server).inspect
    by_tag = up.requests.to_h { |r| [r[:headers]["x-tag"].first, r] }
    expect(by_tag["slow"]).to include(method: "POST", path: "/slow?delay=2", body_sha256: Digest::SHA256.hexdigest(small))
    expect(by_tag["slow"][:headers]["content-type"]).to eq(["application/x-test"])
    expect(by_tag["large"]).to include(body_bytes: large.bytesize, body_sha256: Digest::SHA256.hexdigest(large))
    expect(by_tag["string"]).to include(method: "PUT", body_sha256: Digest::SHA256.hexdigest("string body string"))
    expect(by_tag["string"][:headers]["content-type"]).to eq(["text/plain"])
  end

  it "streams large bodies from the queue while delivering them: Puma's peak memory stays flat", :slow do
    up = origin
    server = puma(up.url, { concurrency: 3 })
    mib = 1024 * 1024
    bodies = Array.new(4) { |i| OriginServer.pattern_bytes(64 * mib, i * 7) }
    # One round first: Puma's upload buffers, the runtime's threads, the
    # allocator's arenas reach their working size.
    expect(post_async(server, "echo", tag: "big-0", body: bodies[0]).status).to eq(202)
    expect(eventually(timeout: 60) { settled?(stats(server), delivered: 1) }).to be(true), stats(server).inspect
    peak_before = status_kib(server.pid, "VmHWM")

    # Three deliveries at once (the origin holds each for 2 s after reading it).
    bodies.drop(1).each_with_index do |body, i|
      expect(post_async(server, "slow?delay=2", tag: "big-#{i + 1}", body: body).status).to eq(202)
    end
    expect(eventually(timeout: 90) { settled?(stats(server), delivered: 4) }).to be(true), stats(server).inspect

    by_tag = up.requests.to_h { |r| [r[:headers]["x-tag"].first, r] }
    bodies.each_with_index do |body, i|
      expect(by_tag["big-#{i}"]).to include(body_bytes: body.bytesize, body_sha256: Digest::SHA256.hexdigest(body))
    end
    # 192 MiB went through at once; attempts holding their bodies would
    # raise the peak by that much at least.
    expect(status_kib(server.pid, "VmHWM") - peak_before).to be < 96 * 1024
  end

  it "keeps retrying while the origin is down and delivers everything once it is up", :slow do
    port = AsyncOrigin.reserve_port
    server = puma("http://127.0.0.1:#{port}", { backoff: 0.1, backoff_max: 0.5, max_attempts: 1000, timeout: 2 })
    tags = Array.new(6) { |i| "down-#{i}" }
    tags.each { |tag| expect(post_async(server, "echo", tag: tag).status).to eq(202) }

    # Connection refused: every request waits for another attempt.
    expect(eventually { stats(server)[:retrying] == tags.size }).to be(true), stats(server).inspect

    up = origin(port: port)
    expect(up.wait_until(timeout: 20) { (tags - up.tags).empty? }).to be(true), up.tags.inspect
    expect(eventually { settled?(stats(server), delivered: tags.size) }).to be(true), stats(server).inspect
    expect(up.tags.sort).to eq(tags.sort)
  end

  it "loses nothing when Puma is killed mid-delivery and started again on the same queue", :slow do
    up = origin
    settings = { concurrency: 3, timeout: 10 }
    first = puma(up.url, settings)
    tags = Array.new(8) { |i| "kill-#{i}" }
    tags.each { |tag| expect(post_async(first, "slow?delay=1", tag: tag).status).to eq(202) }
    # Deliveries in flight (the origin holds them for a second each).
    expect(up.wait_until(timeout: 10) { up.request_count >= 2 }).to be(true)
    expect(stats(first)[:in_flight]).to be_positive

    Process.kill("KILL", -first.pid)
    first.stop(timeout: 5)

    second = puma(up.url, settings)
    expect(eventually(timeout: 60) { settled?(stats(second), delivered: tags.size) }).to be(true), stats(second).inspect
    expect(up.tags.uniq.sort).to eq(tags.sort) # at least once each
    expect(up.tags.size).to be >= tags.size
  end

  it "gives unfinished deliveries back to the queue on a graceful stop", :slow do
    up = origin
    first = puma(up.url, { timeout: 10 }, env: { "THREADED_PROXY_SHUTDOWN_TIMEOUT" => "1" })
    tags = %w[graceful-0 graceful-1]
    tags.each { |tag| expect(post_async(first, "slow?delay=4", tag: tag).status).to eq(202) }
    expect(up.wait_until(timeout: 10) { up.request_count >= 2 }).to be(true)

    started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    first.stop
    expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - started).to be < 8
    expect(first.log).to include("2 unfinished request(s) returned to the queue")

    second = puma(up.url, { timeout: 10 })
    expect(eventually(timeout: 30) { settled?(stats(second), delivered: 2) }).to be(true), stats(second).inspect
    expect(up.tags.tally).to eq("graceful-0" => 2, "graceful-1" => 2)
  end

  it "holds async_rate across the processes sharing the queue", :slow do
    up = origin
    rate = 5.0
    count = 12
    # Two workers, each able to send: the rate is the queue's, not each
    # process's (per-process pacing would reach about twice the rate).
    server = puma(up.url, { rate: rate, concurrency: 8 }, workers: 2, threads: "2:2")
    count.times { |i| expect(post_async(server, "echo", tag: "rate-#{i}").status).to eq(202) }

    expect(up.wait_until(timeout: 30) { up.arrivals.size >= count }).to be(true), -> { [up.arrivals.size, stats(server)].inspect }
    arrivals = up.arrivals
    expect(arrivals.last - arrivals.first).to be >= (count - 1) / rate - 0.05
    expect(eventually { settled?(stats(server), delivered: count) }).to be(true), stats(server).inspect
  end

  it "moves poison requests to the dead state and requeues them" do
    up = origin
    server = puma(up.url, { max_attempts: 3, backoff: 0.05 })
    expect(post_async(server, "status?code=400", tag: "bad").status).to eq(202)
    expect(post_async(server, "status?code=503", tag: "unavailable").status).to eq(202)

    expect(eventually { stats(server)[:dead] == 2 }).to be(true), stats(server).inspect
    dead = JSON.parse(RawHTTP.request("#{server.url}/async/dead").body, symbolize_names: true)
    by_url = dead.to_h { |row| [row[:url], row] }
    expect(by_url["#{up.url}/status?code=400"]).to include(attempts: 1, last_error: "HTTP 400")
    expect(by_url["#{up.url}/status?code=503"]).to include(attempts: 3)
    expect(by_url["#{up.url}/status?code=503"][:last_error]).to start_with("HTTP 503")
    expect(up.tags.tally).to eq("bad" => 1, "unavailable" => 3)

    id = by_url["#{up.url}/status?code=400"][:id]
    requeued = RawHTTP.request("#{server.url}/async/requeue?id=#{id}", method: "POST")
    expect(JSON.parse(requeued.body)).to eq("requeued" => 1)
    expect(up.wait_until(timeout: 10) { up.tags.count("bad") == 2 }).to be(true)
    expect(eventually { stats(server)[:dead] == 2 && stats(server)[:in_flight].zero? }).to be(true)

    all = RawHTTP.request("#{server.url}/async/requeue", method: "POST")
    expect(JSON.parse(all.body)).to eq("requeued" => 2)
    expect(up.wait_until(timeout: 10) { up.tags.tally == { "bad" => 3, "unavailable" => 6 } }).to be(true), up.tags.tally.inspect
    expect(eventually { settled?(stats(server), delivered: 0, dead: 2) }).to be(true), stats(server).inspect
  end

  it "counts async_success as delivered, retries async_retry_on and gives up on the rest" do
    up = origin
    server = puma(up.url, { max_attempts: 2, backoff: 0.05, success: "202", retry_on: "409,418..420" })
    { "accepted" => 202, "conflict" => 409, "teapot" => 418, "unavailable" => 503, "ok" => 200 }.each do |tag, code|
      expect(post_async(server, "status?code=#{code}", tag: tag).status).to eq(202)
    end

    expect(eventually { settled?(stats(server), delivered: 1, dead: 4) }).to be(true), stats(server).inspect
    expect(up.tags.tally).to eq("accepted" => 1, "conflict" => 2, "teapot" => 2, "unavailable" => 1, "ok" => 1)
  end

  it "shares the queue between two Puma workers without delivering twice", :slow do
    up = origin
    server = puma(up.url, { concurrency: 4 }, workers: 2, threads: "2:2")
    tags = Array.new(40) { |i| "cluster-#{i}" }
    tags.each_slice(8) do |slice|
      slice.map { |tag| Thread.new { post_async(server, "echo", tag: tag) } }.each do |thread|
        expect(thread.value.status).to eq(202)
      end
    end

    expect(up.wait_until(timeout: 30) { up.tags.size >= tags.size }).to be(true)
    expect(eventually { settled?(stats(server), delivered: tags.size) }).to be(true), stats(server).inspect
    expect(up.tags.tally.values.uniq).to eq([1])
    expect(up.tags.sort).to eq(tags.sort)
    expect(server.log).not_to match(/panicked|\[BUG\]|deferred delivery: /)
  end
end

RSpec.describe "proxy_async (deferred delivery)" do
  around do |example|
    Dir.mktmpdir("threaded-proxy-async") do |dir|
      @queue_path = File.join(dir, "queue.sqlite3")
      example.run
    ensure
      @pumas&.each(&:stop)
      @origins&.each(&:stop)
    end
  end

  def origin(port: 0)
    (@origins ||= []) << AsyncOrigin.new(port: port).start
    @origins.last
  end

  def puma(origin_url, settings = {}, workers: 0, threads: "4:4", env: {})
    env = env.merge("ORIGIN_URL" => origin_url).merge(queue_env)
    settings.each { |name, value| env["THREADED_PROXY_ASYNC_#{name.to_s.upcase}"] = value }
    (@pumas ||= []) << PumaServer.new(env: env, workers: workers, threads: threads).start
    @pumas.last
  end

  def post_async(server, path, tag:, body: "payload #{tag}", headers: {})
    RawHTTP.request("#{server.url}/async/deliver/#{path}", method: "POST", body: body,
                                                           headers: { "X-Tag" => tag, "Content-Type" => "application/x-test" }.merge(headers))
  end

  def stats(server)
    JSON.parse(RawHTTP.request("#{server.url}/async/stats").body, symbolize_names: true)
  end

  # Polls the queue's state (bounded): true once the block holds.
  def eventually(timeout: 20, interval: 0.05)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    loop do
      return true if yield
      return false if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

      sleep interval
    end
  end

  def status_kib(pid, field)
    Integer(File.read("/proc/#{pid}/status")[/^#{field}:\s+(\d+) kB/, 1])
  end

  def settled?(counts, delivered:, dead: 0)
    counts[:delivered] == delivered && counts[:dead] == dead &&
      counts[:queued].zero? && counts[:retrying].zero? && counts[:in_flight].zero?
  end

  context "on the embedded SQLite queue" do
    def queue_env = { "ASYNC_QUEUE_PATH" => @queue_path }

    it_behaves_like "a deferred delivery queue"
  end

  context "on PostgreSQL" do
    before(:all) { @postgres = PostgresServer.start_or_skip(self) }

    after(:all) { @postgres&.stop }

    before do |example|
      @database = "q_#{example.metadata[:scoped_id].tr(":", "_")}"
      @queue_url = @postgres.create_database(@database)
    end

    def queue_env = { "ASYNC_QUEUE_URL" => @queue_url }

    it_behaves_like "a deferred delivery queue"

    it "lets separate Puma servers claim with SKIP LOCKED, each row once", :slow do
      up = origin
      servers = Array.new(2) { puma(up.url, { concurrency: 4 }) }
      tags = Array.new(30) { |i| "pg-#{i}" }
      tags.each_with_index { |tag, i| expect(post_async(servers[i % 2], "slow?delay=0.2", tag: tag).status).to eq(202) }

      expect(up.wait_until(timeout: 30) { up.tags.size >= tags.size }).to be(true)
      expect(eventually { settled?(stats(servers[0]), delivered: tags.size) }).to be(true), stats(servers[0]).inspect
      expect(up.tags.tally.values.uniq).to eq([1])
      # Rows are gone once delivered; the counter is in the database.
      expect(@postgres.psql(@database, "SELECT COUNT(*) FROM threaded_proxy_deliveries")).to eq([["0"]])
      expect(@postgres.psql(@database, "SELECT value FROM threaded_proxy_counters WHERE name = 'delivered'")).to eq([["30"]])
      servers.each { |server| expect(server.log).not_to match(/panicked|\[BUG\]|deferred delivery: /) }
    end
  end
end
