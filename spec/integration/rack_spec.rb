# frozen_string_literal: true

require "rack/test"
require "rack/builder"
require "threaded_proxy"
require "timeout"

RSpec.describe "ThreadedProxy without Rails" do
  before(:all) { @origin = OriginServer.new.start }
  after(:all) { @origin&.stop }

  let(:origin) { @origin }

  describe "a plain Rack app under real Puma" do
    before(:all) do
      @puma = PumaServer.new(env: { "ORIGIN_URL" => @origin.url }, threads: "2:2",
                             rackup: File.expand_path("../fixtures/plain_rack.ru", __dir__)).start
    end
    after(:all) { @puma&.stop }

    let(:url) { @puma.url }

    it "proxies through ThreadedProxy.call with callbacks" do
      response = RawHTTP.request("#{url}/call/bytes?n=1000")
      expect(response.status).to eq(200)
      expect(response["x-plain-rack"]).to eq("1")
      expect(response.sha256).to eq(OriginServer.expected_sha256(1000))
    end

    it "routes by a prefix Hash, keeping method, path, query and body" do
      response = RawHTTP.request("#{url}/echo/deep/path?q=1", method: "POST", body: "payload",
                                                              headers: { "X-Client" => "c", "Content-Type" => "text/plain" })
      echo = JSON.parse(response.body)
      expect(echo["method"]).to eq("POST")
      expect(echo["path"]).to eq("/echo/deep/path?q=1")
      expect(echo["body_bytes"]).to eq(7)
      expect(echo["headers"]["x-client"]).to eq(["c"])
      expect(echo["headers"]["x-forwarded-for"]).to eq(["127.0.0.1"])
    end

    it "routes by a block: URL proxies, nil passes to the app, a Rack response answers" do
      expect(RawHTTP.request("#{url}/routed/status?code=201").status).to eq(201)
      expect(RawHTTP.request("#{url}/elsewhere").body).to eq("app\n")
      blocked = RawHTTP.request("#{url}/blocked")
      expect([blocked.status, blocked.body]).to eq([403, "blocked by router\n"])
    end
  end

  describe "servers without hijack (rack-test)" do
    include Rack::Test::Methods

    def app
      origin_url = @origin.url
      Rack::Builder.new do
        use ThreadedProxy::Middleware, "/echo" => origin_url
        run lambda { |env|
          ThreadedProxy.call(env, "#{origin_url}#{env["PATH_INFO"]}?#{env["QUERY_STRING"]}") do |config|
            config.on_headers { |response| response["x-seen"] = "yes" }
          end
        }
      end
    end

    it "proxies in the request thread and returns a streaming body" do
      get "/bytes?n=300000"
      expect(last_response.status).to eq(200)
      expect(last_response.headers["x-seen"]).to eq("yes")
      expect(last_response.headers["content-length"]).to eq("300000")
      expect(Digest::SHA256.hexdigest(last_response.body)).to eq(OriginServer.expected_sha256(300_000))
    end

    it "keeps repeated headers as Rack's newline-joined value and re-frames chunked bodies" do
      get "/headers?h=Set-Cookie:a=1&h=Set-Cookie:b=2"
      expect(last_response.headers["set-cookie"]).to eq("a=1\nb=2")
      get "/chunked?n=5000&chunk=700"
      expect(last_response.body.bytesize).to eq(5000)
      expect(last_response.headers).not_to have_key("transfer-encoding")
    end

    it "passes the request body through the middleware" do
      post "/echo/upload", "x" * 200_000, "CONTENT_TYPE" => "application/octet-stream"
      echo = JSON.parse(last_response.body)
      expect(echo["body_bytes"]).to eq(200_000)
      expect(echo["headers"]["content-type"]).to eq(["application/octet-stream"])
    end

    it "answers 502 for a refused origin and raises for a truncated body" do
      closed_port = TCPServer.new("127.0.0.1", 0).then { |s| s.addr[1].tap { s.close } }
      response = ThreadedProxy.call(Rack::MockRequest.env_for("/x"), "http://127.0.0.1:#{closed_port}/")
      expect(response[0]).to eq(502)
      response[2].close
      status, _headers, body = ThreadedProxy.call(Rack::MockRequest.env_for("/x"), "#{@origin.url}/truncate?n=100000&send=1000")
      expect(status).to eq(200)
      expect { body.each { |_chunk| nil } }.to raise_error(ThreadedProxy::UpstreamError, /cut short/)
      body.close
    end
  end

  # Issue 15 item 12: the caller interrupts ThreadedProxy.call while it waits
  # for the head (no hijack: rack-test, Puma over TLS). The socket pair must
  # close in `ensure` (Ruby 3.1's Timeout unwinds with throw, past `rescue`),
  # which cancels the origin request; the caller's own exception comes back
  # unchanged.
  describe "interrupted without hijack" do
    custom_timeout = Class.new(StandardError)
    stop = Class.new(StandardError)

    def open_fds
      Dir.children("/proc/self/fd").size
    end

    # Polls with a bound: nothing signals an fd count.
    def eventually(within: 5)
      deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + within
      until (value = yield)
        return value if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

        sleep 0.01
      end
      value
    end

    def hang_env
      Rack::MockRequest.env_for("/x")
    end

    # The origin's /hang keeps the request open until its peer closes; a
    # long header_timeout so only the cleanup can close it in time.
    def expect_cleaned_up(fds_before, closed_before)
      expect(origin.wait_for_closed(closed_before + 1, timeout: 5)).to be(true), "the origin connection stayed open"
      expect(ThreadedProxy::Native.wait_idle(5)).to be(true)
      expect(ThreadedProxy.stats[:active]).to eq(0)
      expect(eventually { open_fds <= fds_before }).to be(true), "fds #{open_fds} > #{fds_before} before the call"
    end

    def hang_url = "#{origin.url}/hang"

    around do |example|
      ThreadedProxy.ensure_configured
      # Warm up: the runtime, the dispatcher and their fds exist before
      # the count is taken.
      ThreadedProxy.call(hang_env, "#{origin.url}/bytes?n=10")[2].tap { |b| b.each { nil } }.close
      example.run
    end

    it "Timeout.timeout closes the socket pair, cancels the origin request and frees the slot" do
      fds = open_fds
      closed = origin.peer_closed_count
      started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      expect do
        Timeout.timeout(0.5) { ThreadedProxy.call(hang_env, hang_url, header_timeout: 60) }
      end.to raise_error(Timeout::Error)
      expect_cleaned_up(fds, closed)
      expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - started).to be < 5
    end

    it "a Timeout class of the caller's own propagates unchanged, not as UpstreamError" do
      fds = open_fds
      closed = origin.peer_closed_count
      expect do
        Timeout.timeout(0.5, custom_timeout) { ThreadedProxy.call(hang_env, hang_url, header_timeout: 60) }
      end.to raise_error(custom_timeout)
      expect_cleaned_up(fds, closed)
    end

    it "Thread#raise propagates unchanged and cleans up" do
      fds = open_fds
      closed = origin.peer_closed_count
      requests = origin.request_count
      # The thread hands back what ThreadedProxy.call raised (a thread dying
      # of it would re-raise it in the main thread: abort_on_exception).
      thread = Thread.new do
        ThreadedProxy.call(hang_env, hang_url, header_timeout: 60)
      rescue Exception => e # rubocop:disable Lint/RescueException
        e
      end
      expect(origin.wait_for_requests(requests + 1)).to be(true)
      thread.raise(stop, "stop waiting")
      raised = thread.value
      expect([raised.class, raised.message]).to eq([stop, "stop waiting"])
      expect_cleaned_up(fds, closed)
    end
  end
end
