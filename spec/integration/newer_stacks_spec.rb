# frozen_string_literal: true

require "digest"
require "rack"
require "json"
require "open3"
require "rbconfig"
require "socket"
require "timeout"

# What the newer stacks (Debian trixie: Puma 6.6, Rack 3.1, Rails 7.2; sid:
# Puma 8, Rack 3.2, websocket-driver 0.8) showed. Each example runs on every
# stack; bin/matrix runs them on trixie and sid, where the bugs appeared.
RSpec.describe "newer stacks (Rack 3, Puma 6+, Rails 7.2)" do
  before(:all) { @origin = OriginServer.new.start }
  after(:all) { @origin&.stop }

  describe "under real Puma (rails_test_app)" do
    before(:all) do
      @echo = TCPServer.new("127.0.0.1", 0)
      @echo_thread = Thread.new do
        loop do
          Thread.new(@echo.accept) do |conn|
            IO.copy_stream(conn, conn)
            conn.close_write
          rescue IOError, SystemCallError
            nil
          ensure
            conn.close
          end
        end
      rescue IOError, SystemCallError
        nil
      end
      @puma = PumaServer.new(env: { "ORIGIN_URL" => @origin.url }, threads: "2:2").start
    end

    after(:all) do
      @puma&.stop
      @echo&.close
      @echo_thread&.join(2)
    end

    # Puma 7+ under Rack >= 3.1 leaves HTTP_VERSION to the client (sid): a
    # `Version: HTTP/1.0` header made the gem answer close-delimited.
    it "answers an HTTP/1.1 request that carries a `Version: HTTP/1.0` header with HTTP/1.1 framing" do
      response = RawHTTP.request("#{@puma.url}/proxy/chunked?n=5000&chunk=700", headers: { "Version" => "HTTP/1.0" })
      expect(response.status).to eq(200)
      expect(response.framing).to eq(:chunked)
      expect(response.complete).to be(true)
      expect(response.sha256).to eq(OriginServer.expected_sha256(5000))
    end

    it "answers a real HTTP/1.0 request close-delimited, whatever its `Version:` header says" do
      response = RawHTTP.request("#{@puma.url}/proxy/chunked?n=5000&chunk=700", http10: true,
                                                                                 headers: { "Version" => "HTTP/1.1" })
      expect(response.status).to eq(200)
      expect(response["transfer-encoding"]).to be_nil
      expect(response.framing).to eq(:close)
      expect(response.complete).to be(true)
      expect(response.sha256).to eq(OriginServer.expected_sha256(5000))
    end

    # Puma 6+ answers CONNECT with 501 itself unless supported_http_methods
    # is :any (rails_test_app/config/puma.rb).
    it "reaches proxy_tunnel with CONNECT: 200, then bytes both ways" do
      socket = TCPSocket.new("127.0.0.1", @puma.port)
      socket.write("CONNECT /tunnel/#{@echo.addr[1]} HTTP/1.1\r\nHost: x\r\n\r\n")
      head = +""
      Timeout.timeout(15) { head << socket.readpartial(4096) until head.include?("\r\n\r\n") }
      expect(head).to start_with("HTTP/1.1 200 ")
      after_head = head.split("\r\n\r\n", 2)[1]
      socket.write("through the tunnel")
      socket.close_write
      echoed = after_head + Timeout.timeout(15) { socket.read }
      expect(echoed).to eq("through the tunnel")
    ensure
      socket&.close
    end
  end

  # Rack 3's Lint rejected the frozen response returned after the hijack.
  describe "a Rack app behind Rack::Lint under real Puma" do
    before(:all) do
      # One thread: the request that reads the recorded Lint errors runs after
      # the proxied request's app call (and Lint's checks) are done.
      @puma = PumaServer.new(env: { "ORIGIN_URL" => @origin.url }, threads: "1:1",
                             rackup: File.expand_path("../fixtures/lint_rack.ru", __dir__)).start
    end
    after(:all) { @puma&.stop }

    it "proxies Lint-clean on Rack #{Rack.release}" do
      response = RawHTTP.request("#{@puma.url}/bytes?n=100000")
      expect(response.status).to eq(200)
      expect(response.complete).to be(true)
      expect(response.sha256).to eq(OriginServer.expected_sha256(100_000))
      head = RawHTTP.request("#{@puma.url}/bytes?n=10", method: "HEAD")
      expect(head.status).to eq(200)

      errors = RawHTTP.request("#{@puma.url}/lint_errors")
      expect(errors.status).to eq(200)
      expect(errors.body).to eq("")
      expect(File.read(@puma.log_path)).not_to include("LintError")
    end
  end

  # Rails 7.2 under Rack 3 asks for the whole body up front (Rack::ETag
  # calls to_ary, which calls the body's each without a block): that was a
  # LocalJumpError (500), and an Enumerator alone read the one-shot body
  # twice.
  describe "rails_test_app through rack-test (no hijack)" do
    it "answers the proxied body whole, read once" do
      script = File.expand_path("../fixtures/rails_rack_test.rb", __dir__)
      paths = ["/proxy/bytes?n=300000", "/proxy/chunked?n=70000&chunk=7000"]
      output, errors, status = Open3.capture3({ "ORIGIN_URL" => @origin.url }, RbConfig.ruby, script, *paths)
      expect(status.success?).to be(true), errors
      results = output.lines.grep(/\ARESULT /).map { |line| JSON.parse(line.delete_prefix("RESULT ")) }
      expect(results.map { |r| r["path"] }).to eq(paths)
      by_path = results.to_h { |r| [r["path"], r] }
      [["/proxy/bytes?n=300000", 300_000], ["/proxy/chunked?n=70000&chunk=7000", 70_000]].each do |path, size|
        result = by_path.fetch(path)
        expect(result["status"]).to eq(200), "#{path}: #{result["error"]}"
        expect(result["bytes"]).to eq(size)
        expect(result["sha256"]).to eq(OriginServer.expected_sha256(size))
      end
    end
  end
end
