# frozen_string_literal: true

require "json"
require "net/http"
require "socket"

# stream_events / publish against a real Puma (one thread: every stream must
# free it at once) with raw TCP SSE clients that check the wire bytes.
RSpec.describe "event streams (stream_events, publish)" do
  SSE_HEAD = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n" \
         "x-accel-buffering: no\r\nconnection: close\r\n"

  def publish(puma, channel, data, **fields)
    uri = URI("#{puma.url}/events/publish")
    response = Net::HTTP.post_form(uri, { channel:, data: }.merge(fields.transform_keys(&:to_s)))
    [Integer(response.code), JSON.parse(response.body)]
  end

  def subscribers(puma, channel)
    JSON.parse(RawHTTP.request("#{puma.url}/events/subscribers?channel=#{channel}").body).fetch("count")
  end

  def wait_subscribers(puma, channel, count, timeout: 10)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    loop do
      now = subscribers(puma, channel)
      return now if now == count || Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

      sleep 0.02
    end
  end

  def open_stream(puma, query, **options)
    client = SSEClient.new("#{puma.url}/events/stream?#{query}", **options)
    @clients << client
    client
  end

  def head_for(pid, retry_ms: nil)
    "#{SSE_HEAD}x-pid: #{pid}\r\n\r\n#{retry_ms ? "retry: #{retry_ms}\n\n" : ""}"
  end

  before { @clients = [] }
  after { @clients.each(&:close) }

  context "single mode, one Puma thread" do
    before(:all) { @puma = PumaServer.new(threads: "1:1").start }
    after(:all) { @puma&.stop }
    let(:puma) { @puma }
    let(:pid) { JSON.parse(RawHTTP.request("#{puma.url}/stats").body).fetch("pid") }

    it "writes the SSE head and retry line, and frees the only Puma thread for each stream" do
      streams = Array.new(3) { open_stream(puma, "channels=head&retry=3000") }
      streams.each { |s| expect(s.head + s.take_exactly("retry: 3000\n\n".bytesize)).to eq(head_for(pid, retry_ms: 3000)) }
      expect(subscribers(puma, "head")).to eq(3) # answered by the one thread
      bare = open_stream(puma, "channels=head2")
      expect(bare.head).to eq(head_for(pid))
      expect(publish(puma, "head2", "x")).to eq([200, { "count" => 1, "pid" => pid }])
      expect(bare.take_until("\n\n")).to eq("data: x\n\n")
    end

    it "encodes data, event, id, multi-line and JSON data byte for byte, to every subscriber of the channel" do
      a = open_stream(puma, "channels=enc")
      b = open_stream(puma, "channels=other,enc")
      [a, b].each(&:head)
      expect(publish(puma, "enc", "hello", event: "greeting", id: "1").first).to eq(200)
      expect(publish(puma, "enc", "l1\r\nl2\rl3\nl4").last["count"]).to eq(2)
      expect(publish(puma, "enc", JSON.generate({ "progress" => 50, "s" => "a\nb" }), json: "1").first).to eq(200)
      wire = "event: greeting\nid: 1\ndata: hello\n\n" \
             "data: l1\ndata: l2\ndata: l3\ndata: l4\n\n" \
             "data: {\"progress\":50,\"s\":\"a\\nb\"}\n\n"
      [a, b].each { |client| expect(client.take_exactly(wire.bytesize)).to eq(wire.b) }
      expect(publish(puma, "nobody-listens", "x").last["count"]).to eq(0)
    end

    it "keeps injection attempts in data as data, and refuses CR/LF in event and id with ArgumentError" do
      client = open_stream(puma, "channels=inj")
      client.head
      expect(publish(puma, "inj", "x\n\nevent: evil\r\nid: 666\rretry: 1\r\n\r\ndata: y").first).to eq(200)
      expect(client.take_until("y\n\n"))
        .to eq("data: x\ndata: \ndata: event: evil\ndata: id: 666\ndata: retry: 1\ndata: \ndata: data: y\n\n")
      ["a\nb", "a\rb", "a\r\n"].each do |bad|
        status, body = publish(puma, "inj", "z", event: bad)
        expect([status, body["error"]]).to eq([422, "event: must not contain CR, LF or NUL"])
        status, body = publish(puma, "inj", "z", id: bad)
        expect([status, body["error"]]).to eq([422, "id: must not contain CR, LF or NUL"])
      end
      publish(puma, "inj", "after")
      # Nothing of the refused publishes went out.
      expect(client.take_until("\n\n")).to eq("data: after\n\n")
    end

    it "replays the events after Last-Event-ID first, then streams new ones" do
      (1..5).each { |i| publish(puma, "replay", "e#{i}", id: i.to_s) }
      client = open_stream(puma, "channels=replay", headers: { "Last-Event-ID" => "3" })
      client.head
      publish(puma, "replay", "e6", id: "6")
      expect(client.take_exactly("id: 4\ndata: e4\n\nid: 5\ndata: e5\n\nid: 6\ndata: e6\n\n".bytesize))
        .to eq("id: 4\ndata: e4\n\nid: 5\ndata: e5\n\nid: 6\ndata: e6\n\n")
      no_replay = open_stream(puma, "channels=replay&replay=0", headers: { "Last-Event-ID" => "3" })
      no_replay.head
      publish(puma, "replay", "e7", id: "7")
      expect(no_replay.take_until("\n\n")).to eq("id: 7\ndata: e7\n\n")
    end

    it "sends a heartbeat comment after heartbeat seconds of silence" do
      client = open_stream(puma, "channels=hb&heartbeat=0.3")
      client.head
      started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      expect(client.take_exactly(2, timeout: 3)).to eq(":\n")
      expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - started).to be >= 0.25
      expect(client.take_exactly(2, timeout: 3)).to eq(":\n")
    end

    it "notices a client that leaves (FIN or RST) and removes it at once" do
      a = open_stream(puma, "channels=leave")
      b = open_stream(puma, "channels=leave")
      [a, b].each(&:head)
      expect(subscribers(puma, "leave")).to eq(2)
      a.close
      expect(wait_subscribers(puma, "leave", 1, timeout: 2)).to eq(1)
      b.reset
      expect(wait_subscribers(puma, "leave", 0, timeout: 2)).to eq(0)
      stats = JSON.parse(RawHTTP.request("#{puma.url}/stats").body)
      expect(stats["events_streams_open"]).to eq(@clients.count { |c| !c.socket.closed? })
    end

    it "counts streams, publishes and deliveries in stats and the Prometheus exposition" do
      stats = -> { JSON.parse(RawHTTP.request("#{puma.url}/stats").body) }
      before = stats.call
      clients = Array.new(2) { open_stream(puma, "channels=counted") }
      clients.each(&:head)
      3.times { |i| publish(puma, "counted", "n#{i}") }
      clients.each { |c| c.take_until("data: n2\n\n") }
      after = stats.call
      deltas = %w[events_streams_started events_published events_delivered].map { |k| after[k] - before[k] }
      expect(deltas).to eq([2, 3, 6])
      expect(after["events_streams_open"]).to be >= 2
      text = RawHTTP.request("#{puma.url}/metrics").body
      expect(text).to include("# TYPE threaded_proxy_events_streams_open gauge\n")
      expect(text).to match(/^threaded_proxy_events_delivered_total\{pid="#{pid}"\} #{after["events_delivered"]}$/)
      expect(text).to include("# TYPE threaded_proxy_events_slow_disconnects counter\n")
    end

    it "answers ArgumentError for bad arguments before the socket is taken" do
      {
        "no_channel" => "stream_events needs at least one channel",
        "integer_channel" => "an event channel must be a String or a Symbol, not Integer",
        "nil_channel" => "an event channel must be a String or a Symbol, not NilClass",
        "retry" => "retry must be nil or a non-negative Integer (milliseconds)",
        "retry_float" => "retry must be nil or a non-negative Integer (milliseconds)",
        "heartbeat" => "heartbeat must be a positive number of seconds",
        "headers" => "headers must be a Hash",
        "header_crlf" => "header x-a has CR, LF or NUL in its value",
        "header_name" => "header name \"x a\" is not a token",
        "header_reserved" => "header Content-Type is set by stream_events",
        "replay" => "replay must be true or false",
        "unknown" => "unknown keyword: :nope"
      }.each do |name, message|
        response = RawHTTP.request("#{puma.url}/events/bad/#{name}")
        expect([response.status, response.body]).to eq([422, "ArgumentError: #{message}"]), name
      end
      expect(subscribers(puma, "c")).to eq(0)
    end
  end

  context "a subscriber that does not read" do
    before(:all) { @puma = PumaServer.new(threads: "1:1", env: { "EVENTS_QUEUE_BYTES" => 256 * 1024 }).start }
    after(:all) { @puma&.stop }
    let(:puma) { @puma }

    it "is disconnected once its queue passes event_queue_bytes; the others get every event" do
      slow = open_stream(puma, "channels=slow", rcvbuf: 4096)
      fast = open_stream(puma, "channels=slow")
      [slow, fast].each(&:head)
      chunk = "x" * 32 * 1024
      events = 400 # 12.8 MiB: far past the kernel's socket buffers and the 256 KiB queue
      reader = Thread.new { fast.take_exactly(events * (chunk.bytesize + 8), timeout: 60) }
      counts = Array.new(events) { publish(puma, "slow", chunk).last["count"] }
      got = reader.value
      expect(got.scan("data: ").size).to eq(events)
      expect(counts.first).to eq(2)
      expect(counts.last).to eq(1) # the slow one was cut
      expect(slow.closed_by_server?(timeout: 10)).to be(true)
      stats = JSON.parse(RawHTTP.request("#{puma.url}/stats").body)
      expect(stats["events_slow_disconnects"]).to eq(1)
      expect(stats["events_dropped"]).to be >= 1
      expect(subscribers(puma, "slow")).to eq(1)
    end
  end

  context "a subscriber whose write never progresses" do
    before(:all) { @puma = PumaServer.new(threads: "1:1", env: { "EVENTS_QUEUE_BYTES" => 16 * 1024 * 1024 }).start }
    after(:all) { @puma&.stop }
    let(:puma) { @puma }

    it "is cut as a slow subscriber once its write makes no progress for max(2 x heartbeat, 5 s), with no further publish" do
      stuck = open_stream(puma, "channels=stuck&heartbeat=1", rcvbuf: 4096)
      stuck.head
      before = JSON.parse(RawHTTP.request("#{puma.url}/stats").body)
      # 9 MiB, under the queue bound but past what the kernel's buffers hold
      # (tcp_wmem's 4 MiB max plus a 4 KiB receive buffer): a write waits,
      # and nothing else is published. (3 MiB each: Rack's 4 MiB form limit.)
      published = Process.clock_gettime(Process::CLOCK_MONOTONIC) # the last progress comes after this
      3.times { expect(publish(puma, "stuck", "x" * 3 * 1024 * 1024).last["count"]).to eq(1) }
      stats = nil
      deadline = published + 20
      loop do
        stats = JSON.parse(RawHTTP.request("#{puma.url}/stats").body)
        break if stats["events_slow_disconnects"] > before["events_slow_disconnects"]
        raise "the stuck reader was never cut" if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

        sleep 0.1
      end
      waited = Process.clock_gettime(Process::CLOCK_MONOTONIC) - published
      expect(waited).to be_between(5, 12) # the 5 s floor (heartbeat 1 s), not at once, not never
      expect(stats["events_slow_disconnects"]).to eq(before["events_slow_disconnects"] + 1)
      expect(stats["events_streams_open"]).to eq(before["events_streams_open"] - 1)
      expect(subscribers(puma, "stuck")).to eq(0)
      expect(stuck.closed_by_server?(timeout: 10)).to be(true) # its fd is given back: EOF after the partial write
    end
  end

  context "past max_connections" do
    before(:all) { @puma = PumaServer.new(threads: "1:1", env: { "THREADED_PROXY_MAX_CONNECTIONS" => 2 }).start }
    after(:all) { @puma&.stop }
    let(:puma) { @puma }

    it "answers 503 with Retry-After, like a proxied request, and admits again once a stream left" do
      held = Array.new(2) { open_stream(puma, "channels=cap") }
      held.each(&:head)
      refused = RawHTTP.request("#{puma.url}/events/stream?channels=cap")
      expect([refused.status, refused["retry-after"], refused.complete]).to eq([503, "1", true])
      expect(subscribers(puma, "cap")).to eq(2)
      held.first.close
      expect(wait_subscribers(puma, "cap", 1, timeout: 2)).to eq(1)
      expect(open_stream(puma, "channels=cap").head).to start_with("HTTP/1.1 200 OK\r\n")
      stats = JSON.parse(RawHTTP.request("#{puma.url}/stats").body)
      expect(stats["events_streams_rejected"]).to eq(1)
    end
  end

  context "cluster mode (two workers, preload_app!)" do
    before(:all) do
      @puma = PumaServer.new(threads: "1:1", workers: 2, preload: true, env: { "THREADED_PROXY_START" => "1" }).start
    end
    after(:all) { @puma&.stop }
    let(:puma) { @puma }

    it "serves streams in each worker, each fed by publishes in its own process" do
      by_pid = {}
      20.times do
        client = open_stream(puma, "channels=cl")
        pid = Integer(client.head[/x-pid: (\d+)/, 1])
        by_pid[pid] ||= client
        break if by_pid.size == 2
      end
      expect(by_pid.keys).to match_array(puma.worker_pids)
      seen = {}
      40.times do |i|
        _, body = publish(puma, "cl", "from #{i}")
        seen[body["pid"]] ||= [i, body["count"]]
        break if seen.size == 2
      end
      expect(seen.keys).to match_array(puma.worker_pids)
      seen.each do |pid, (i, count)|
        expect(count).to eq(@clients.count { |c| c.buffer.include?("x-pid: #{pid}") })
        expect(by_pid.fetch(pid).take_until("from #{i}\n\n")).to end_with("data: from #{i}\n\n")
      end
    end
  end
end
