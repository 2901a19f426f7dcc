# frozen_string_literal: true

require "json"
require "net/http"
require "rbconfig"

# events_url: publish through PostgreSQL NOTIFY from any process; every Puma
# worker LISTENs and fans out to its own streams. Real PostgreSQL (started
# by the spec), real Puma in cluster mode, raw SSE clients.
RSpec.describe "event streams across processes (events_url)" do
  EVENTS_ROOT_DIR = File.expand_path("../..", __dir__)
  # The advisory lock every publish takes (src/events/postgres.rs).
  PUBLISH_LOCK = 0x7468_7270_7278_6532

  before(:all) { @postgres = PostgresServer.start_or_skip(self) }

  before(:all) do
    @url = @postgres.create_database("events")
    @puma = PumaServer.new(threads: "1:1", workers: 2, preload: true, env: { "EVENTS_URL" => @url }).start
    @clients = []
    @by_pid = {}
    40.times do
      client = SSEClient.new("#{@puma.url}/events/stream?channels=pg")
      @clients << client
      @by_pid[Integer(client.head[/x-pid: (\d+)/, 1])] ||= client
      break if @by_pid.size == 2
    end
    # Each worker started its listener with its first stream; wait until
    # both say it is connected (LISTEN done).
    expect(wait_listeners).to be(true)
  end

  after(:all) do
    @clients&.each(&:close)
    @puma&.stop
    @postgres&.stop
  end

  # Waits until both workers report their listener connected, each with
  # more than `errors_above[pid]` lost connections (so a restart's has been
  # seen, not a stale "connected").
  def wait_listeners(timeout: 20, errors_above: Hash.new(-1))
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    alive = {}
    until alive.size == 2
      return false if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

      stats = JSON.parse(RawHTTP.request("#{@puma.url}/stats").body)
      ok = stats["events_listener_alive"] == 1 && stats["events_listener_errors"] > errors_above[stats["pid"]]
      ok ? alive[stats["pid"]] = true : alive.delete(stats["pid"])
      sleep 0.05
    end
    true
  end

  # events_listener_errors of each worker now.
  def listener_errors(timeout: 10)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    seen = {}
    until seen.size == 2 || Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline
      stats = JSON.parse(RawHTTP.request("#{@puma.url}/stats").body)
      seen[stats["pid"]] = stats["events_listener_errors"]
    end
    seen
  end

  # Publishes from a separate Ruby process (a job, a console); its output
  # and exit status.
  def run_publisher(channel, data, id: nil)
    script = <<~RUBY
      require "threaded_proxy"
      ThreadedProxy.configure { |c| c.events_url = ARGV[0] }
      print ThreadedProxy.publish(ARGV[1], ARGV[2], id: ARGV[3].empty? ? nil : ARGV[3])
    RUBY
    out = IO.popen([RbConfig.ruby, "-I", File.join(EVENTS_ROOT_DIR, "lib"), "-e", script, @url, channel, data, id.to_s],
                   err: %i[child out], &:read)
    [out, $?]
  end

  def publish_elsewhere(channel, data, id: nil)
    out, status = run_publisher(channel, data, id: id)
    expect(status.success?).to be(true), out
    out
  end

  it "reaches the streams of both workers from a publish in another process, large payloads through the table" do
    expect(@by_pid.keys).to match_array(@puma.worker_pids)
    expect(publish_elsewhere("pg", "from a job", id: "a1")).to eq("0") # no stream in the publishing process
    @clients.each { |c| expect(c.take_until("\n\n", timeout: 10)).to eq("id: a1\ndata: from a job\n\n") }
    big = "b" * 10_000 # past the inline limit: the notification carries only the row id
    publish_elsewhere("pg", big)
    @clients.each { |c| expect(c.take_until("\n\n", timeout: 10)).to eq("data: #{big}\n\n") }
  end

  it "publishes from a worker to both workers' streams" do
    _, body = [nil, JSON.parse(Net::HTTP.post_form(URI("#{@puma.url}/events/publish"), channel: "pg", data: "w").body)]
    expect(body["count"]).to eq(@clients.count { |c| c.buffer.include?("x-pid: #{body["pid"]}") })
    @clients.each { |c| expect(c.take_until("\n\n", timeout: 10)).to eq("data: w\n\n") }
  end

  it "catches up from the table on an event committed while the listener was disconnected" do
    # Cut both listeners and, in the same command, commit an event nobody
    # is LISTENing for: only the catch-up after reconnecting can deliver it.
    @postgres.psql("events", <<~SQL)
      SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'threaded-proxy events listener';
      INSERT INTO threaded_proxy_events (channel, payload) VALUES ('pg', convert_to(E'data: missed\\n\\n', 'UTF8'));
    SQL
    @clients.each { |c| expect(c.take_until("\n\n", timeout: 15)).to eq("data: missed\n\n") }
  end

  it "fails a publish that waits on a stuck publisher's lock, instead of hanging, and the next publish goes through" do
    # Another session holds the publish lock (src/events/postgres.rs,
    # PUBLISH_LOCK) for 30 s, as a publisher hung mid-transaction would.
    holder = Thread.new do
      @postgres.psql("events", "SELECT pg_advisory_xact_lock(#{PUBLISH_LOCK}); SELECT pg_sleep(30)")
    rescue PostgresServer::Unavailable
      :terminated # by the ensure below
    end
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 10
    until @postgres.psql("events", "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted") == [["1"]]
      raise "the lock was never taken" if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline
    end
    # Without lock_timeout this publish would wait the 30 s, then succeed.
    out, status = run_publisher("pg", "blocked")
    expect(status.success?).to be(false)
    expect(out).to match(/publish through events_url failed: .*canceling statement due to (lock|statement) timeout/)
  ensure
    @postgres.psql("events", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)%' " \
                             "AND pid <> pg_backend_pid()")
    expect(holder.value).to eq(:terminated)
    publish_elsewhere("pg", "after the lock", id: "l1")
    @clients.each { |c| expect(c.take_until("\n\n", timeout: 10)).to eq("id: l1\ndata: after the lock\n\n") }
  end

  it "connects again after the database restarts and delivers what is published then" do
    errors = listener_errors
    expect(errors.size).to eq(2)
    @postgres.restart
    expect(wait_listeners(timeout: 20, errors_above: errors)).to be(true)
    publish_elsewhere("pg", "after restart", id: "r1")
    @clients.each { |c| expect(c.take_until("\n\n", timeout: 10)).to eq("id: r1\ndata: after restart\n\n") }
  end
end
