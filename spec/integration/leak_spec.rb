# frozen_string_literal: true

require "socket"

RSpec.describe "no leaks under sustained mixed traffic", :slow do
  before(:all) do
    @origin = OriginServer.new.start
    refused = TCPServer.new("127.0.0.1", 0)
    @refused_url = "http://127.0.0.1:#{refused.addr[1]}"
    refused.close
    @puma = PumaServer.new(
      env: { "ORIGIN_URL" => @origin.url, "ORIGIN2_URL" => @refused_url, "RAILS_LOG_LEVEL" => "warn",
             "THREADED_PROXY_POOL_IDLE_TIMEOUT" => 0.3 },
      threads: "4:4"
    ).start
  end

  after(:all) do
    @puma&.stop
    @origin&.stop
  end

  let(:puma) { @puma }

  # One exchange of a kind chosen by `i`: success, origin error, 502 for a
  # refused origin, or a client that leaves before the answer.
  def exchange(i)
    case i % 20
    when 0 then expect(RawHTTP.request("#{puma.url}/proxy2/bytes?n=10").status).to eq(502)
    when 1 then expect(RawHTTP.request("#{puma.url}/proxy/truncate?n=5000&send=100").complete).to be(false)
    when 2
      socket = TCPSocket.new("127.0.0.1", puma.port)
      socket.write("GET /proxy/slow?delay=0.05 HTTP/1.1\r\nHost: x\r\n\r\n")
      socket.close
    when 3 then expect(RawHTTP.request("#{puma.url}/proxy/status?code=404").status).to eq(404)
    else
      response = RawHTTP.request("#{puma.url}/proxy/bytes?n=2000")
      expect([response.status, response.body_bytes]).to eq([200, 2000])
    end
  end

  # Waits until the process is idle and its descriptor count stops falling
  # (idle pooled origin connections close after pool_idle_timeout).
  def settled_stats
    StatsClient.wait_for(puma, timeout: 20) { |s| s["active"].zero? }
    previous = nil
    20.times do
      stats = StatsClient.fetch(puma)
      return stats if previous && stats["open_fds"] >= previous["open_fds"] && stats["tasks_alive"] >= previous["tasks_alive"]

      previous = stats
      sleep 0.5
    end
    previous
  end

  it "returns to its baseline of descriptors and tasks; memory stops growing", timeout: 600 do
    200.times { |i| exchange(i) }
    baseline = settled_stats

    10_000.times { |i| exchange(i) }
    middle = settled_stats
    10_000.times { |i| exchange(i) }

    # 2,000 more, up to 100 at once.
    queue = Queue.new
    2_000.times { |i| queue << i }
    100.times { queue << nil }
    Array.new(100) do
      Thread.new do
        while (i = queue.pop)
          i % 5 == 2 ? exchange(2) : exchange(i % 4 == 0 ? 4 : i)
        end
      end
    end.each(&:join)

    done = StatsClient.wait_for(puma, timeout: 30) do |s|
      s["active"].zero? && s["open_fds"] <= baseline["open_fds"] && s["tasks_alive"] <= baseline["tasks_alive"]
    end
    final = StatsClient.fetch(puma)
    expect(done).not_to be_nil, "did not return to baseline: baseline=#{baseline.slice("open_fds", "tasks_alive")} now=#{final.slice("open_fds", "tasks_alive", "active")}"
    # Clients that leave at once (1,400 of them) often never reach the app.
    expect(final["started"] - baseline["started"]).to be >= 20_600
    # Every exchange that started also ended, one way or the other.
    expect(final["completed"] + final["failed"]).to eq(final["started"])
    expect(final["callbacks_queued"]).to eq(0)
    # Memory: the second 10,000 exchanges did not grow the process much.
    expect(final["rss_kb"] - middle["rss_kb"]).to be < 32 * 1024
  end
end
