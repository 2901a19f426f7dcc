# frozen_string_literal: true

require "socket"
require "json"
require "rack/mock"
require "threaded_proxy"

RSpec.describe "limits and stats" do
  before(:all) do
    @origin = OriginServer.new.start
    @origin2 = OriginServer.new.start
    @puma = PumaServer.new(
      env: { "ORIGIN_URL" => @origin.url, "ORIGIN2_URL" => @origin2.url,
             "THREADED_PROXY_MAX_CONNECTIONS" => 3, "THREADED_PROXY_MAX_CONNECTIONS_PER_ORIGIN" => 2 },
      threads: "2:2"
    ).start
  end

  after(:all) do
    @puma&.stop
    @origin&.stop
    @origin2&.stop
  end

  let(:puma) { @puma }

  # Opens a proxied request the origin never answers; returns its socket.
  def hanging(path)
    socket = TCPSocket.new("127.0.0.1", puma.port)
    socket.write("GET #{path} HTTP/1.1\r\nHost: x\r\n\r\n")
    socket
  end

  def wait_idle
    expect(StatsClient.wait_for(puma) { |s| s["active"].zero? }).not_to be_nil
  end

  it "answers 503 with Retry-After past max_connections_per_origin and max_connections, without touching the origin" do
    wait_idle
    before = @origin.request_count
    held = [hanging("/proxy/hang"), hanging("/proxy/hang")]
    expect(@origin.wait_until(timeout: 10) { @origin.request_count == before + 2 }).to be(true)

    per_origin = RawHTTP.request("#{puma.url}/proxy/bytes?n=10")
    expect(per_origin.status).to eq(503)
    expect(per_origin["retry-after"]).to eq("1")
    expect(per_origin.complete).to be(true)

    # Another origin still has room: the third exchange overall.
    before2 = @origin2.request_count
    held << hanging("/proxy2/hang")
    expect(@origin2.wait_until(timeout: 10) { @origin2.request_count == before2 + 1 }).to be(true)
    total = RawHTTP.request("#{puma.url}/proxy2/bytes?n=10")
    expect(total.status).to eq(503)
    expect(@origin.request_count).to eq(before + 2)

    stats = StatsClient.fetch(puma)
    expect(stats["active"]).to eq(3)
    expect(stats["rejected"]).to be >= 2
    expect(stats["failed_overload"]).to be >= 2

    expect(puma.wait_for_log("max_connections_per_origin reached")).to be(true)
    expect(puma.log).to include("failed (overload)")
    held.each(&:close)
    wait_idle
    expect(RawHTTP.request("#{puma.url}/proxy/bytes?n=10").status).to eq(200)
  ensure
    held&.each { |s| s.close unless s.closed? }
  end

  it "drops a client that reads nothing for idle_timeout, without buffering the body" do
    wait_idle
    rss_before = StatsClient.fetch(puma)["rss_kb"]
    closed_before = @origin.peer_closed_count
    path = URI.encode_www_form_component("/bytes?n=#{200 * 1024 * 1024}")
    socket = TCPSocket.new("127.0.0.1", puma.port)
    socket.setsockopt(Socket::SOL_SOCKET, Socket::SO_RCVBUF, 4096)
    socket.write("GET /contract/fetch?path=#{path}&idle_timeout=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    # The client never reads: the proxy's writes stall, it gives up after
    # idle_timeout and drops the origin connection too.
    expect(@origin.wait_until(timeout: 10) { @origin.peer_closed_count > closed_before }).to be(true)
    stats = StatsClient.wait_for(puma) { |s| s["active"].zero? }
    expect(stats["failed_client"]).to be >= 1
    expect(stats["rss_kb"] - rss_before).to be < 20 * 1024
    expect(puma.wait_for_log("client read nothing for 1s")).to be(true)
  ensure
    socket&.close
  end

  it "counts exchanges and bytes in ThreadedProxy.stats" do
    wait_idle
    before = StatsClient.fetch(puma)
    3.times { expect(RawHTTP.request("#{puma.url}/proxy/bytes?n=1000").status).to eq(200) }
    closed_port = TCPServer.new("127.0.0.1", 0).then { |s| s.addr[1].tap { s.close } }
    expect(RawHTTP.request("#{puma.url}/proxy2/status?code=200").status).to eq(200)
    after = StatsClient.wait_for(puma) { |s| s["completed"] >= before["completed"] + 4 }
    expect(after["started"] - before["started"]).to be >= 4
    expect(after["bytes_from_origin"] - before["bytes_from_origin"]).to be >= 3000
    expect(after["bytes_to_client"] - before["bytes_to_client"]).to be > 3000
    expect(closed_port).to be_positive
  end
end

# Issue 15 item 10: Puma at a 1,024-descriptor limit under ~700 concurrent
# slow exchanges, half of them with bodies big enough to be spliced (five
# descriptors each). Every client gets the proxied answer or 503 with
# Retry-After: never 500 (no descriptor to duplicate the socket), never 502
# (no descriptor for the origin socket), never a cut body; Puma still
# answers afterwards.
RSpec.describe "admission at the file-descriptor limit" do
  CLIENTS = 700
  SPLICED_BODY = 256 * 1024
  HOLD = 4 # seconds each exchange stays open at the origin

  before(:all) do
    # This process holds the 700 client sockets and the origin's ends.
    soft, hard = Process.getrlimit(:NOFILE)
    Process.setrlimit(:NOFILE, [hard, 4096].min, hard) if soft < 4096
    @origin = OriginServer.new.start
    @puma = PumaServer.new(env: { "ORIGIN_URL" => @origin.url }, threads: "4:4", nofile: 1024).start
  end

  after(:all) do
    @puma&.stop
    @origin&.stop
  end

  # Sends every request at once and reads all answers in one select loop;
  # returns one [status, complete, retry_after] per client ("reset" /
  # "none" for a connection that ended without an answer).
  def storm(paths, deadline:)
    pending = {}
    paths.each do |path|
      socket = TCPSocket.new("127.0.0.1", @puma.port)
      socket.write("GET #{path} HTTP/1.1\r\nHost: x\r\n\r\n")
      pending[socket] = +""
    end
    results = []
    until pending.empty?
      remaining = deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC)
      break if remaining <= 0

      ready, = IO.select(pending.keys, nil, nil, remaining)
      Array(ready).each do |socket|
        chunk = socket.read_nonblock(256 * 1024, exception: false)
        next if chunk == :wait_readable

        if chunk
          pending[socket] << chunk
          next
        end
        results << parse_answer(pending.delete(socket))
        socket.close
      rescue Errno::ECONNRESET
        pending.delete(socket)
        results << ["reset", false, nil]
        socket.close
      end
    end
    pending.each_key(&:close)
    results + Array.new(pending.size) { ["timeout", false, nil] }
  end

  def parse_answer(raw)
    head, body = raw.b.split("\r\n\r\n", 2)
    return ["none", false, nil] if head.nil? || head.empty?

    status = head[%r{\AHTTP/1\.1 (\d{3})}, 1] || "garbage"
    length = head[/^content-length: *(\d+)/i, 1]
    complete = !length.nil? && body.to_s.bytesize == Integer(length)
    [status, complete, head[/^retry-after: *(\S+)/i, 1]]
  end

  it "answers every client with the proxied response or 503 + Retry-After, and Puma keeps accepting" do
    paths = Array.new(CLIENTS) do |i|
      if i.even?
        "/proxy/bytes?n=#{SPLICED_BODY}&pause=#{HOLD}"
      else
        "/proxy/slow?delay=#{HOLD}"
      end
    end
    results = storm(paths, deadline: Process.clock_gettime(Process::CLOCK_MONOTONIC) + 90)
    by_status = results.group_by(&:first).transform_values(&:size)
    expect(results.size).to eq(CLIENTS)
    expect(by_status.keys - %w[200 503]).to be_empty, "statuses: #{by_status}"
    expect(by_status.fetch("200", 0)).to be >= 100
    expect(results.all? { |_, complete, _| complete }).to be(true), "cut answers: #{by_status}"
    expect(results.select { |status, _, _| status == "503" }.map(&:last).uniq).to satisfy { |v| v.empty? || v == ["1"] }

    stats = StatsClient.wait_for(@puma, timeout: 30) { |s| s["active"].zero? }
    expect(stats).not_to be_nil
    expect(stats["bytes_spliced"]).to be_positive
    expect(stats["failed_overload"]).to eq(by_status.fetch("503", 0))
    expect(RawHTTP.request("#{@puma.url}/proxy/bytes?n=#{SPLICED_BODY}").status).to eq(200)
    expect(RawHTTP.request("#{@puma.url}/inline").status).to eq(200)
    # Puma's own accept errors (main logged thousands) and 500s; the gem's
    # log line for each 503 it answered (it ran out of descriptors for the
    # client's duplicate or the origin socket: Puma 8 holds more accepted
    # sockets before it hands them over) is an overload answered right.
    fd_errors = @puma.log.lines.grep(/Too many open files/).grep_v(/\A\[threaded-proxy\] .* failed \(overload\)/)
    expect(fd_errors.size).to be < 10, fd_errors.last(20).join
  end
end

# The last resort of item 10: the process has no descriptor left when the
# action hands the socket over. Rust cannot duplicate it; the client must
# still get 503 with Retry-After (not 500 and an IOError in the action).
RSpec.describe "a hand-over with no descriptor left" do
  before(:all) { @origin = OriginServer.new.start }
  after(:all) { @origin&.stop }

  it "answers 503 + Retry-After on the socket and the action returns normally" do
    reader, writer = IO.pipe
    pid = fork do
      reader.close
      ThreadedProxy.start # runtime and callback threads before the table is full
      ours, theirs = UNIXSocket.pair(:STREAM)
      env = Rack::MockRequest.env_for("/x").merge("rack.hijack?" => true, "rack.hijack" => -> { theirs })
      soft, hard = Process.getrlimit(:NOFILE)
      Process.setrlimit(:NOFILE, [soft, 4096].min, hard)
      fillers = []
      loop { fillers << File.open(File::NULL) }
    rescue Errno::EMFILE
      outcome = begin
        ThreadedProxy.call(env, "#{@origin.url}/bytes?n=10")
        "returned"
      rescue Exception => e # rubocop:disable Lint/RescueException
        "#{e.class}: #{e.message}"
      end
      fillers.each(&:close)
      answer = ours.read
      writer.write(JSON.generate([outcome, answer, theirs.closed?]))
      writer.close
      exit!(0)
    end
    writer.close
    outcome, answer, closed = JSON.parse(reader.read)
    Process.wait(pid)
    expect(outcome).to eq("returned")
    expect(answer).to start_with("HTTP/1.1 503 Service Unavailable\r\n")
    expect(answer).to include("retry-after: 1\r\n")
    expect(answer).to end_with("\r\n\r\n503 Service Unavailable\n")
    expect(closed).to be(true)
  end
end
