# frozen_string_literal: true

RSpec.describe "proxy_fetch under real Puma" do
  before(:all) do
    @origin = OriginServer.new.start
    @puma = PumaServer.new(env: { "ORIGIN_URL" => @origin.url }, threads: "1:1").start
  end

  after(:all) do
    @puma&.stop
    @origin&.stop
  end

  after do
    expect(@origin.errors).to be_empty
    expect(@puma.log).not_to match(/panicked|\[BUG\]|fatal/)
  end

  let(:puma) { @puma }
  let(:origin) { @origin }

  def get(path, **options)
    RawHTTP.request("#{puma.url}#{path}", **options)
  end

  it "streams a 100 MiB body byte-identical, with its Content-Length, socket to socket with splice(2)", timeout: 120 do
    size = 100 * 1024 * 1024
    spliced_before = StatsClient.fetch(puma)["bytes_spliced"]
    response = get("/proxy/bytes?n=#{size}", keep_body: false)
    expect(response.status).to eq(200)
    expect(response["content-length"]).to eq(size.to_s)
    expect(response.complete).to be(true)
    expect(response.body_bytes).to eq(size)
    expect(response.sha256).to eq(OriginServer.expected_sha256(size))
    spliced = StatsClient.fetch(puma)["bytes_spliced"] - spliced_before
    if ENV["THREADED_PROXY_ZERO_COPY"] == "0"
      expect(spliced).to eq(0) # bin/test's rerun on the copy path (zero_copy_spec.rb)
    else
      # All but what arrived with the origin's head went through the pipe.
      expect(spliced).to be >= size - (256 * 1024)
    end
  end

  it "keeps its origin connection for the next request (keep-alive pool)" do
    expect(get("/proxy/bytes?n=100").status).to eq(200)
    accepted = origin.connections_accepted
    3.times { expect(get("/proxy/bytes?n=100").body_bytes).to eq(100) }
    expect(origin.connections_accepted).to eq(accepted)
  end

  it "re-frames a chunked origin body and delivers it whole" do
    size = 3 * 1024 * 1024 + 17
    response = get("/proxy/chunked?n=#{size}&chunk=10000", keep_body: false)
    expect(response.framing).to eq(:chunked)
    expect(response.complete).to be(true)
    expect(response.sha256).to eq(OriginServer.expected_sha256(size))
  end

  it "answers HTTP/1.1 with Connection: close and without the origin's hop-by-hop headers" do
    response = get("/proxy/headers?h=Keep-Alive:timeout%3D5&h=X-Kept:yes")
    expect(response["connection"]).to eq("close")
    expect(response["keep-alive"]).to be_nil
    expect(response["x-kept"]).to eq("yes")
  end

  it "sends the action's headers to the origin" do
    response = get("/proxy/echo")
    sent = JSON.parse(response.body)
    expect(sent["headers"]["x-from-proxy"]).to eq(["1"])
  end

  it "puts on_headers' changes on the wire: added, replaced, deleted; repeated headers kept apart" do
    response = get("/headers_proxy/headers?h=X-Remove-Me:1&h=Content-Security-Policy:default-src&h=Set-Cookie:a=1&h=Set-Cookie:b=2")
    expect(response.status).to eq(200)
    expect(response["x-proxied-by"]).to eq("threaded-proxy")
    expect(response.get_all("content-security-policy")).to eq(["sandbox;"])
    expect(response["x-remove-me"]).to be_nil
    expect(response.get_all("set-cookie")).to eq(["a=1", "b=2"])
    expect(response.body).to eq("ok\n")
  end

  it "answers 500 when on_headers raises, logs it, and keeps serving" do
    response = get("/raising/bytes?n=10")
    expect(response.status).to eq(500)
    expect(response.complete).to be(true)
    expect(puma.log).to include("callback raised").and include("boom")
    expect(get("/proxy/bytes?n=10").status).to eq(200)
    expect(get("/inline").body).to eq("inline ok")
  end

  # rails_test_app/lib/edge_routes.rb: ThreadedProxy::Middleware at the head
  # of the Rails stack, for hot routes, still behind the app's own sign-in.
  it "proxies hot routes ahead of Rails' middleware, signed in by the app's signed cookie" do
    before = origin.request_count
    expect([get("/edge/echo").status, get("/edge/echo").body]).to eq([401, "sign in first"])
    expect(get("/edge/echo", headers: { "Cookie" => "user=alice" }).status).to eq(401) # not signed
    expect(origin.request_count).to eq(before)

    login = get("/edge_login?user=alice")
    expect(login.status).to eq(204)
    cookie = login.get_all("set-cookie").find { |c| c.start_with?("user=") }.split(";").first
    echo = JSON.parse(get("/edge/echo?x=1", headers: { "Cookie" => cookie }).body)
    expect(echo["path"]).to eq("/echo?x=1")
    expect(echo["headers"]["x-user"]).to eq(["alice"])
    expect(echo["headers"]["x-forwarded-for"]).to eq(["127.0.0.1"])

    bench = get("/bench/edge/echo?y=2")
    expect([bench.status, JSON.parse(bench.body)["path"]]).to eq([200, "/echo?y=2"])
  end

  it "frees the only Puma thread: an inline action answers while 10 slow proxied requests are in flight", timeout: 60 do
    before = origin.request_count
    finished = Queue.new
    slow = Array.new(10) do
      Thread.new do
        response = get("/proxy/slow?delay=2")
        finished << [:slow, response.status, response.body]
      end
    end
    # All ten reached the origin at once through a one-thread Puma: none
    # of them holds the thread. (A blocking proxy would let one through.)
    expect(origin.wait_until(timeout: 15) { origin.request_count >= before + 10 }).to be(true)
    inline = get("/inline")
    finished << [:inline, inline.status, inline.body]
    slow.each { |t| t.join(20) }
    events = Array.new(11) { finished.pop }
    expect(events.first).to eq([:inline, 200, "inline ok"])
    expect(events.drop(1)).to all(eq([:slow, 200, "slow done\n"]))
  end
end
