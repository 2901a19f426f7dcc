# frozen_string_literal: true

require "json"
require "openssl"
require "securerandom"
require "socket"
require "digest"
require "fileutils"
require "uri"

# Helpers of this file only.
module ContractSpec
  MIB = 1024 * 1024

  # A minimal HTTPS origin that speaks HTTP/2 when the client offers "h2"
  # via ALPN (and a one-shot HTTP/1.1 answer otherwise). It answers every
  # request stream with "hello over h2"; it does not decode HPACK (requests
  # are not inspected), it only frames its answer with static-table and
  # literal header fields. Records the ALPN offers, the protocol negotiated
  # per connection and the number of answered requests.
  class MiniH2Origin
    PREFACE = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".b
    BODY = "hello over h2\n"
    FRAME_DATA = 0
    FRAME_HEADERS = 1
    FRAME_SETTINGS = 4
    FRAME_PING = 6
    FRAME_GOAWAY = 7
    END_STREAM = 0x1
    ACK = 0x1
    END_HEADERS = 0x4

    attr_reader :port

    def initialize(cert:, key:)
      @mutex = Mutex.new
      @cond = ConditionVariable.new
      @offered = []
      @negotiated = []
      @answered = 0
      @sockets = []
      @threads = []
      @ctx = OpenSSL::SSL::SSLContext.new
      @ctx.cert = OpenSSL::X509::Certificate.new(File.binread(cert))
      @ctx.key = OpenSSL::PKey.read(File.binread(key))
      @ctx.min_version = OpenSSL::SSL::TLS1_2_VERSION
      @ctx.alpn_select_cb = lambda do |protocols|
        @mutex.synchronize { @offered << protocols }
        protocols.include?("h2") ? "h2" : "http/1.1"
      end
    end

    def start
      @server = TCPServer.new("127.0.0.1", 0)
      @port = @server.addr[1]
      @accept = Thread.new do
        loop do
          raw = @server.accept
          @mutex.synchronize do
            @sockets << raw
            @threads << Thread.new(raw) { |r| serve(r) }
          end
        end
      rescue IOError, SystemCallError
        nil
      end
      self
    end

    def url
      "https://localhost:#{@port}"
    end

    def offered = @mutex.synchronize { @offered.dup }
    def negotiated = @mutex.synchronize { @negotiated.dup }
    def answered = @mutex.synchronize { @answered }

    def stop
      @server&.close
      sockets, threads = @mutex.synchronize { [@sockets.dup, @threads.dup] }
      sockets.each { |s| s.close rescue nil } # rubocop:disable Style/RescueModifier
      (threads + [@accept]).compact.each { |t| t.join(2) || t.kill }
    end

    private

    def serve(raw)
      ssl = OpenSSL::SSL::SSLSocket.new(raw, @ctx)
      ssl.sync_close = true
      ssl.accept
      @mutex.synchronize { @negotiated << ssl.alpn_protocol }
      ssl.alpn_protocol == "h2" ? serve_h2(ssl) : serve_http1(ssl)
    rescue IOError, SystemCallError, OpenSSL::SSL::SSLError, EOFError
      nil
    ensure
      ssl&.close rescue nil # rubocop:disable Style/RescueModifier
      raw.close rescue nil # rubocop:disable Style/RescueModifier
    end

    def serve_h2(ssl)
      return unless ssl.read(PREFACE.bytesize) == PREFACE

      frame(ssl, FRAME_SETTINGS, 0, 0, "")
      loop do
        header = ssl.read(9)
        return if header.nil? || header.bytesize < 9

        length = (header.getbyte(0) << 16) | (header.getbyte(1) << 8) | header.getbyte(2)
        type = header.getbyte(3)
        flags = header.getbyte(4)
        stream = header.byteslice(5, 4).unpack1("N") & 0x7fff_ffff
        payload = length.zero? ? "".b : ssl.read(length)
        case type
        when FRAME_SETTINGS then frame(ssl, FRAME_SETTINGS, ACK, 0, "") if (flags & ACK).zero?
        when FRAME_PING then frame(ssl, FRAME_PING, ACK, 0, payload) if (flags & ACK).zero?
        when FRAME_GOAWAY then return
        when FRAME_HEADERS, FRAME_DATA then answer(ssl, stream) if (flags & END_STREAM).positive?
        end
      end
    end

    def answer(ssl, stream)
      block = +"\x88".b # :status 200 (static table index 8)
      block << literal(31, "text/plain") << literal(28, BODY.bytesize.to_s) # content-type, content-length
      block << "\x00".b << [13].pack("C") << "x-origin-alpn" << [2].pack("C") << "h2"
      frame(ssl, FRAME_HEADERS, END_HEADERS, stream, block)
      frame(ssl, FRAME_DATA, END_STREAM, stream, BODY)
      @mutex.synchronize do
        @answered += 1
        @cond.broadcast
      end
    end

    # Literal header field without indexing, name from the static table.
    def literal(index, value)
      prefix = index < 15 ? [index].pack("C") : [0x0f, index - 15].pack("CC")
      prefix.b + [value.bytesize].pack("C") + value.b
    end

    def frame(ssl, type, flags, stream, payload)
      payload = payload.b
      head = [payload.bytesize >> 16, (payload.bytesize >> 8) & 0xff, payload.bytesize & 0xff, type, flags, stream]
      ssl.write(head.pack("CCCCCN") + payload)
    end

    def serve_http1(ssl)
      buffer = +""
      buffer << ssl.readpartial(16_384) until buffer.include?("\r\n\r\n")
      body = "hello over http/1.1\n"
      ssl.write("HTTP/1.1 200 OK\r\ncontent-length: #{body.bytesize}\r\nconnection: close\r\n\r\n#{body}")
    end
  end
end

# The proxy_fetch / reverse_proxy contract of DESIGN.md, end to end: a real
# Puma running rails_test_app (ContractController), real origin servers
# (OriginServer, plus ContractSpec::MiniH2Origin above), raw sockets on
# the client side.
RSpec.describe "threaded-proxy contract (DESIGN.md)" do
  before(:all) do
    @tmp = File.join(PumaServer::LOG_DIR, "contract-#{Process.pid}")
    FileUtils.mkdir_p(@tmp)
    @certs = OriginServer.generate_test_ca(File.join(@tmp, "ca"))
    @origin = OriginServer.new.start
    @tls_origin = OriginServer.new(tls: { cert: @certs[:cert], key: @certs[:key] }).start
    @h2_origin = ContractSpec::MiniH2Origin.new(cert: @certs[:cert], key: @certs[:key]).start
    @puma = PumaServer.new(env: { "ORIGIN_URL" => @origin.url, "CA_FILE" => @certs[:ca] }, threads: "4:4").start
  end

  after(:all) do
    @puma&.stop
    @origin&.stop
    @tls_origin&.stop
    @h2_origin&.stop
    FileUtils.rm_rf(@tmp) if @tmp
  end

  after do
    expect(@origin.errors).to be_empty
    expect(@tls_origin.errors).to be_empty
    expect(@puma.log).not_to match(/panicked|\[BUG\]/)
  end

  let(:origin) { @origin }
  let(:puma) { @puma }

  # ------------------------------------------------------------------ helpers

  def contract_path(action, **query)
    query.empty? ? "/contract/#{action}" : "/contract/#{action}?#{URI.encode_www_form(query)}"
  end

  # One request to a ContractController action; `verb` is the client's
  # method, everything else goes into the query string.
  def call(action, verb: "GET", headers: {}, body: nil, http10: false, keep_body: true, read_timeout: 15, **query)
    RawHTTP.request("#{puma.url}#{contract_path(action, **query)}", method: verb, headers: headers, body: body,
                                                                      http10: http10, keep_body: keep_body,
                                                                      read_timeout: read_timeout)
  end

  def echo(response)
    expect(response.status).to eq(200), "expected 200, got #{response.status}: #{response.body.to_s[0, 500]}"
    JSON.parse(response.body)
  end

  def connect
    TCPSocket.new("127.0.0.1", puma.port)
  end

  def send_request(socket, verb, path, headers = {})
    head = +"#{verb} #{path} HTTP/1.1\r\nHost: 127.0.0.1:#{puma.port}\r\n"
    headers.each { |name, value| head << "#{name}: #{value}\r\n" }
    socket.write(head << "\r\n")
  end

  # Reads until `needle` shows up; returns what was read.
  def read_until(socket, needle, timeout: 10)
    data = +"".b
    deadline = monotonic + timeout
    until data.include?(needle)
      remaining = deadline - monotonic
      raise "timed out waiting for #{needle.inspect}; got #{data[0, 300].inspect}" unless remaining.positive? && socket.wait_readable(remaining)

      data << socket.readpartial(65_536)
    end
    data
  end

  # Reads until the server closes; returns [bytes, reset?].
  def read_to_eof(socket, timeout: 10)
    data = +"".b
    deadline = monotonic + timeout
    loop do
      remaining = deadline - monotonic
      raise "timed out waiting for EOF; got #{data.bytesize} bytes" unless remaining.positive? && socket.wait_readable(remaining)

      data << socket.readpartial(65_536)
    end
  rescue EOFError
    [data, false]
  rescue Errno::ECONNRESET
    [data, true]
  end

  # The exact bytes of a whole exchange: [status line, header pairs, body bytes].
  def wire(action, verb: "GET", headers: {}, **query)
    socket = connect
    send_request(socket, verb, contract_path(action, **query), headers)
    data, = read_to_eof(socket)
    head, body = data.split("\r\n\r\n", 2)
    status_line, *lines = head.split("\r\n")
    [status_line, lines.map { |l| l.split(":", 2).map(&:strip) }, body.to_s]
  ensure
    socket&.close
  end

  def monotonic
    Process.clock_gettime(Process::CLOCK_MONOTONIC)
  end

  def closed_port
    server = TCPServer.new("127.0.0.1", 0)
    server.addr[1]
  ensure
    server&.close
  end

  def pinged?(server, key, tag)
    server.requests.any? { |r| r[:path].start_with?("/echo?") && URI.decode_www_form(r[:path].split("?", 2)[1]).include?([key, tag]) }
  end

  # The "[contract-event] {json}" line the subscriber logged for the URL
  # carrying notify=tag (waits for its ping first: no log polling).
  def event_for(tag)
    expect(origin.wait_until(timeout: 5) { pinged?(origin, "event", tag) }).to be(true), "no threaded_proxy.fetch event for #{tag}"
    line = puma.log.lines.find { |l| l.include?("[contract-event]") && l.include?("notify=#{tag}") }
    expect(line).not_to be_nil
    JSON.parse(line.split("[contract-event] ", 2).last)
  end

  def write_pattern_file(path, size)
    digest = Digest::SHA256.new
    File.open(path, "wb") do |file|
      OriginServer.each_pattern_slice(0, size) do |slice|
        file.write(slice)
        digest << slice
      end
    end
    digest.hexdigest
  end

  def status_kib(pid, field)
    Integer(File.read("/proc/#{pid}/status")[/^#{field}:\s+(\d+) kB/, 1])
  end

  # Rails' own error page: a complete HTTP 500, the socket never taken.
  def expect_rails_error_page(response, message)
    expect(response.status).to eq(500)
    expect(response.complete).to be(true)
    expect(response["x-threaded-proxy-error"]).to be_nil
    expect(response.body).to include("ArgumentError").and include(message)
  end

  # ================================================================= requests

  describe "requests" do
    %w[GET POST PUT PATCH DELETE OPTIONS].each do |verb|
      it "sends #{verb} to the origin when the client uses #{verb}" do
        sent = echo(call(:fetch, verb: verb, path: "/echo/#{verb.downcase}"))
        expect(sent["method"]).to eq(verb)
        expect(sent["path"]).to eq("/echo/#{verb.downcase}")
        expect(origin.last_request[:method]).to eq(verb)
      end
    end

    it "sends HEAD to the origin when the client uses HEAD" do
      status_line, headers, body = wire(:fetch, verb: "HEAD", path: "/echo/head")
      expect(status_line).to start_with("HTTP/1.1 200")
      expect(headers.to_h { |n, v| [n.downcase, v] }).to include("content-length")
      expect(body).to be_empty
      expect(origin.last_request).to include(method: "HEAD", path: "/echo/head")
    end

    %w[get post put patch delete options head].each do |option|
      it "sends method: :#{option} whatever the client's method" do
        response = call(:fetch, method: option, path: "/echo/by-option")
        expect(response.status).to eq(200)
        expect(response.complete).to be(true)
        expect(origin.last_request).to include(method: option.upcase, path: "/echo/by-option")
      end
    end

    it "sends body: String byte for byte" do
      data = "caf\u00e9 \u2603 & = + % \n" * 100
      sent = echo(call(:string_body, data: data, path: "/echo"))
      expect(sent["method"]).to eq("POST")
      expect(sent["body_bytes"]).to eq(data.bytesize)
      expect(sent["body_sha256"]).to eq(Digest::SHA256.hexdigest(data))
    end

    it "sends body: IO (a File) byte for byte" do
      path = File.join(@tmp, "file-body.bin")
      size = 3 * ContractSpec::MIB + 7
      sha = write_pattern_file(path, size)
      sent = echo(call(:file_body, file: path, path: "/echo"))
      expect(sent["method"]).to eq("PUT")
      expect(sent["body_bytes"]).to eq(size)
      expect(sent["body_sha256"]).to eq(sha)
    end

    it "sends body: :rack (a small body) with the client's Content-Type" do
      data = JSON.generate("hello" => "rack", "n" => 1)
      sent = echo(call(:rack_body, verb: "PATCH", headers: { "Content-Type" => "application/json" }, body: data,
                                   path: "/echo"))
      expect(sent["method"]).to eq("PATCH")
      expect(sent["body_sha256"]).to eq(Digest::SHA256.hexdigest(data))
      expect(sent["headers"]["content-type"]).to eq(["application/json"])
      expect(sent["headers"]["content-length"]).to eq([data.bytesize.to_s])
    end

    it "streams a 200 MiB body: :rack upload byte-identical, Puma's RSS staying flat", timeout: 150 do
      size = 200 * ContractSpec::MIB
      path = File.join(@tmp, "upload.bin")
      sha = write_pattern_file(path, size)
      echo(call(:rack_body, verb: "POST", body: "warm up", path: "/echo")) # load the code paths first
      rss_before = status_kib(puma.pid, "VmRSS")
      peak_before = status_kib(puma.pid, "VmHWM")

      socket = connect
      send_request(socket, "POST", contract_path(:rack_body, path: "/echo/upload"),
                   "Content-Type" => "application/x-upload", "Content-Length" => size)
      File.open(path, "rb") { |file| IO.copy_stream(file, socket) }
      response = RawHTTP.read_response(socket, head_only: false, keep_body: true, read_timeout: 120)
      socket.close

      sent = echo(response)
      expect(sent["body_bytes"]).to eq(size)
      expect(sent["body_sha256"]).to eq(sha)
      expect(sent["headers"]["content-type"]).to eq(["application/x-upload"])
      expect(origin.last_request).to include(method: "POST", path: "/echo/upload", body_bytes: size, body_sha256: sha)
      growth = status_kib(puma.pid, "VmRSS") - rss_before
      peak_growth = status_kib(puma.pid, "VmHWM") - peak_before
      expect(growth).to be < 100 * 1024, "Puma's RSS grew by #{growth / 1024} MiB"
      expect(peak_growth).to be < 100 * 1024, "Puma's peak RSS grew by #{peak_growth / 1024} MiB"
    ensure
      File.delete(path) if path && File.exist?(path)
    end

    describe "forward_headers" do
      let(:client_headers) do
        { "X-Client" => "1", "X-Other" => "2", "X-Named" => "3", "Connection" => "keep-alive, X-Named",
          "Keep-Alive" => "timeout=5", "TE" => "trailers" }
      end

      def expect_no_hop_by_hop(sent)
        expect(sent).not_to include("x-named", "keep-alive", "te")
        expect(Array(sent["connection"]).join(",")).not_to match(/x-named/i)
      end

      it "false (the default): no client header reaches the origin" do
        sent = echo(call(:fetch, headers: client_headers, path: "/echo"))["headers"]
        expect(sent).not_to include("x-client", "x-other")
        expect(sent["host"]).to eq(["127.0.0.1:#{origin.port}"])
        expect_no_hop_by_hop(sent)
        sent = echo(call(:fetch, forward: "false", headers: client_headers, path: "/echo"))["headers"]
        expect(sent).not_to include("x-client", "x-other")
      end

      it "true: end-to-end headers go, hop-by-hop ones and those named in Connection do not" do
        sent = echo(call(:fetch, forward: "true", headers: client_headers, path: "/echo"))["headers"]
        expect(sent).to include("x-client" => ["1"], "x-other" => ["2"])
        expect(sent["host"]).to eq(["127.0.0.1:#{origin.port}"])
        expect_no_hop_by_hop(sent)
      end

      it "a list: only the listed headers go (never hop-by-hop ones)" do
        sent = echo(call(:fetch, forward: "X-Client,x-named,TE", headers: client_headers, path: "/echo"))["headers"]
        expect(sent).to include("x-client" => ["1"])
        expect(sent).not_to include("x-other")
        expect_no_hop_by_hop(sent)
      end
    end

    it "reverse_proxy forwards method, path and query, body and headers, adding X-Forwarded-*" do
      body = "reverse body \u00e9"
      response = RawHTTP.request("#{puma.url}/contract/reverse/echo/deep/path?a=1&b=two%20words",
                                 method: "POST", body: body,
                                 headers: { "X-Client" => "yes", "Content-Type" => "text/plain",
                                            "X-Forwarded-For" => "10.1.2.3", "Connection" => "X-Named",
                                            "X-Named" => "no" })
      sent = echo(response)
      expect(sent["method"]).to eq("POST")
      expect(sent["path"]).to eq("/echo/deep/path?a=1&b=two%20words")
      expect(sent["body_sha256"]).to eq(Digest::SHA256.hexdigest(body))
      expect(sent["headers"]).to include(
        "x-client" => ["yes"], "content-type" => ["text/plain"],
        "x-forwarded-for" => ["10.1.2.3, 127.0.0.1"], "x-forwarded-proto" => ["http"],
        "x-forwarded-host" => ["127.0.0.1:#{puma.port}"], "host" => ["127.0.0.1:#{origin.port}"]
      )
      expect(sent["headers"]).not_to include("x-named")
    end

    it "reverse_proxy does not forward Expect: Puma answered the 100-continue and read the body already" do
      body = "expected body " * 1000
      socket = connect
      send_request(socket, "POST", "/contract/reverse/echo/expect",
                   "Expect" => "100-continue", "Content-Type" => "text/plain",
                   "Content-Length" => body.bytesize, "Connection" => "close")
      expect(read_until(socket, "\r\n\r\n")).to eq("HTTP/1.1 100 Continue\r\n\r\n")
      socket.write(body)
      data, reset = read_to_eof(socket)
      head, payload = data.split("\r\n\r\n", 2)
      expect([head.lines.first, reset]).to eq(["HTTP/1.1 200 OK\r\n", false])
      sent = JSON.parse(payload)
      expect(sent).to include("method" => "POST", "body_sha256" => Digest::SHA256.hexdigest(body))
      expect(sent["headers"]).not_to include("expect")
      expect(sent["headers"]).to include("content-type" => ["text/plain"])
    ensure
      socket&.close
    end

    it "reverse_proxy passes other methods through too (DELETE, no body)" do
      sent = echo(RawHTTP.request("#{puma.url}/contract/reverse/echo/item/7", method: "DELETE"))
      expect(sent).to include("method" => "DELETE", "path" => "/echo/item/7", "body_bytes" => 0)
    end

    describe "mistakes raise ArgumentError in the action (Rails' 500, the socket never taken)" do
      it "an unknown option" do
        before = origin.request_count
        expect_rails_error_page(call(:unknown_option), "no_such_option")
        expect(origin.request_count).to eq(before)
      end

      it "a malformed URL" do
        expect_rails_error_page(call(:fetch, url: "http://exa mple.test/%%x"), "malformed url")
      end

      # Issue 15 item 11: each was taken by Ruby's URI and failed after the
      # hijack (a bare 500 the action could not rescue), or went to port 80.
      it "a URL the Rust parser refuses, an out-of-range port or a bad host: the action rescues it" do
        before = origin.request_count
        ["http://127.0.0.1:#{origin.port}/echo?a=1 2", "http://127%2e0%2e0%2e1:#{origin.port}/echo",
         "http://127.0.0.1:74326/echo", "http://127..0.0.1:#{origin.port}/echo"].each do |url|
          response = call(:fetch_rescued, url: url)
          expect(response.status).to eq(422), "#{url}: #{response.status} #{response.body.to_s[0, 200]}"
          expect(response.body).to start_with("own page: ")
          expect(response.complete).to be(true)
        end
        expect(origin.request_count).to eq(before)
        expect_rails_error_page(call(:fetch, url: "http://127.0.0.1:74326/echo"), "invalid port")
      end

      it "a URL without a path asks the origin for /" do
        tag = SecureRandom.hex(4)
        response = call(:fetch, url: "http://127.0.0.1:#{origin.port}?no-path=#{tag}")
        expect(response.status).to eq(404) # the origin's answer for "/"
        expect(origin.requests.map { |r| r[:path] }).to include("/?no-path=#{tag}")
      end

      it "a non-http(s) scheme" do
        expect_rails_error_page(call(:fetch, url: "ftp://127.0.0.1:#{origin.port}/echo"), "http:// or https://")
        expect_rails_error_page(call(:fetch, url: "file:///etc/passwd"), "http:// or https://")
      end

      it "a header value with CR/LF in the options (nothing reaches the origin)" do
        before = origin.request_count
        response = call(:header_option_crlf)
        expect_rails_error_page(response, "X-Injected")
        expect(response["x-evil"]).to be_nil
        expect(origin.request_count).to eq(before)
      end

      it "a host not in allowed_hosts (a listed one passes)" do
        before = origin.request_count
        expect_rails_error_page(call(:allowed_hosts, origin: "http://127.0.0.1:#{origin.port}"), "allowed_hosts")
        expect(origin.request_count).to eq(before)
        sent = echo(call(:allowed_hosts, origin: "http://localhost:#{origin.port}", path: "/echo/allowed"))
        expect(sent["path"]).to eq("/echo/allowed")
        # the setting was restored: no allowed_hosts for the next call
        expect(call(:allowed_hosts_restored).body).to eq("nil")
        expect(call(:fetch, path: "/echo").status).to eq(200)
      end
    end
  end

  # ================================================================ responses

  describe "responses" do
    it "passes Content-Length through" do
      response = call(:fetch, path: "/bytes?n=123457", keep_body: false)
      expect(response.framing).to eq(:length)
      expect(response["content-length"]).to eq("123457")
      expect(response.complete).to be(true)
      expect(response.sha256).to eq(OriginServer.expected_sha256(123_457))
      expect(response["connection"]).to eq("close")
    end

    it "re-frames a chunked origin body as chunked for an HTTP/1.1 client" do
      response = call(:fetch, path: "/chunked?n=#{ContractSpec::MIB + 5}&chunk=7000", keep_body: false)
      expect(response.framing).to eq(:chunked)
      expect(response.complete).to be(true)
      expect(response.sha256).to eq(OriginServer.expected_sha256(ContractSpec::MIB + 5))
    end

    it "re-frames a close-delimited origin body as chunked for an HTTP/1.1 client" do
      response = call(:fetch, path: "/close-delimited?n=#{ContractSpec::MIB + 9}", keep_body: false)
      expect(response.framing).to eq(:chunked)
      expect(response.complete).to be(true)
      expect(response.sha256).to eq(OriginServer.expected_sha256(ContractSpec::MIB + 9))
    end

    it "sends a chunked origin body close-delimited to an HTTP/1.0 client" do
      response = call(:fetch, http10: true, path: "/chunked?n=#{ContractSpec::MIB + 3}&chunk=5000", keep_body: false)
      expect(response["transfer-encoding"]).to be_nil
      expect(response.framing).to eq(:close)
      expect(response.complete).to be(true)
      expect(response.sha256).to eq(OriginServer.expected_sha256(ContractSpec::MIB + 3))
    end

    it "sends a close-delimited origin body close-delimited to an HTTP/1.0 client" do
      response = call(:fetch, http10: true, path: "/close-delimited?n=70001", keep_body: false)
      expect(response.framing).to eq(:close)
      expect(response.complete).to be(true)
      expect(response.sha256).to eq(OriginServer.expected_sha256(70_001))
    end

    it "answers HEAD with the headers (Content-Length kept) and no body" do
      status_line, headers, body = wire(:fetch, verb: "HEAD", path: "/bytes?n=5000")
      expect(status_line).to eq("HTTP/1.1 200 OK")
      expect(headers.select { |n, _| n.casecmp?("content-length") }.map(&:last)).to eq(["5000"])
      expect(body).to be_empty
    end

    it "answers 204 with no body (and no Content-Length)" do
      status_line, headers, body = wire(:fetch, path: "/status?code=204")
      expect(status_line).to eq("HTTP/1.1 204 No Content")
      names = headers.map { |n, _| n.downcase }
      expect(names).not_to include("content-length", "transfer-encoding")
      expect(body).to be_empty
    end

    it "answers 304 with no body, Content-Length kept" do
      status_line, headers, body = wire(:fetch, path: "/status?code=304")
      expect(status_line).to eq("HTTP/1.1 304 Not Modified")
      lengths = headers.select { |n, _| n.casecmp?("content-length") }.map(&:last)
      expect(lengths).to eq(["status 304\n".bytesize.to_s])
      expect(headers.map { |n, _| n.downcase }).not_to include("transfer-encoding")
      expect(body).to be_empty
    end

    it "keeps several Set-Cookie headers as separate lines" do
      query = URI.encode_www_form([%w[h Set-Cookie:a=1;\ Path=/], %w[h Set-Cookie:b=2;\ HttpOnly], %w[h Set-Cookie:c=3]])
      response = call(:fetch, path: "/headers?#{query}")
      expect(response.status).to eq(200)
      expect(response.get_all("set-cookie")).to eq(["a=1; Path=/", "b=2; HttpOnly", "c=3"])
    end

    it "keeps the origin's reason phrase, custom or standard" do
      response = call(:fetch, path: "/status?code=418&reason=Short+And+Stout")
      expect([response.status, response.reason]).to eq([418, "Short And Stout"])
      response = call(:fetch, path: "/status?code=404")
      expect([response.status, response.reason]).to eq([404, "Not Found"])
      response = call(:fetch, path: "/status?code=201")
      expect([response.status, response.reason]).to eq([201, "Created"])
    end

    it "pools origin connections: 30 sequential requests use a few of them" do
      fresh = OriginServer.new.start
      30.times do |i|
        response = call(:fetch, origin: fresh.url, path: "/bytes?n=#{1000 + i}")
        expect([response.status, response.body_bytes, response.complete]).to eq([200, 1000 + i, true])
      end
      expect(fresh.request_count).to eq(30)
      expect(fresh.connections_accepted).to be <= 3
      expect(fresh.errors).to be_empty
    ensure
      fresh&.stop
    end
  end

  # ====================================================================== TLS

  describe "TLS" do
    let(:tls) { @tls_origin }

    it "reaches an https origin with ca_file" do
      sent = echo(call(:fetch, origin: tls.url, path: "/echo/tls", ca_file: "1"))
      expect(sent["path"]).to eq("/echo/tls")
      expect(tls.last_request).to include(method: "GET", path: "/echo/tls")
    end

    it "refuses an origin certificate it cannot verify: 502" do
      before = tls.request_count
      response = call(:fetch, origin: tls.url, path: "/echo/untrusted")
      expect(response.status).to eq(502)
      expect(response.complete).to be(true)
      expect(tls.request_count).to eq(before)
    end

    it "verify_tls: false works without the CA" do
      sent = echo(call(:fetch, origin: tls.url, path: "/echo/noverify", verify_tls: "false"))
      expect(sent["path"]).to eq("/echo/noverify")
    end

    it "ignore_ssl_errors: true works without the CA" do
      sent = echo(call(:fetch, origin: tls.url, path: "/echo/ignore", ignore_ssl_errors: "true"))
      expect(sent["path"]).to eq("/echo/ignore")
    end

    it "streams a large body from an https origin" do
      response = call(:fetch, origin: tls.url, path: "/bytes?n=#{5 * ContractSpec::MIB}", ca_file: "1", keep_body: false)
      expect(response.complete).to be(true)
      expect(response.sha256).to eq(OriginServer.expected_sha256(5 * ContractSpec::MIB))
    end

    it "speaks HTTP/2 to an https origin that offers it via ALPN, on one reused connection" do
      h2 = @h2_origin
      5.times do
        response = call(:fetch, origin: h2.url, path: "/h2", ca_file: "1")
        expect(response.status).to eq(200)
        expect(response.body).to eq(ContractSpec::MiniH2Origin::BODY)
        expect(response["x-origin-alpn"]).to eq("h2")
      end
      expect(h2.offered.flatten).to include("h2")
      expect(h2.negotiated).to eq(["h2"])
      expect(h2.answered).to eq(5)
    end
  end

  # ================================================================ callbacks

  describe "callbacks" do
    it "on_response reads the body and renders text:" do
      response = call(:on_response_render, as: "text", path: "/bytes?n=7777")
      expect(response.status).to eq(201)
      expect(response["content-type"]).to start_with("text/plain")
      expect(response.body).to eq("200 7777 #{OriginServer.expected_sha256(7777)}")
      expect(response.complete).to be(true)
    end

    it "on_response reads the body and renders json:" do
      response = call(:on_response_render, as: "json", path: "/bytes?n=999")
      expect(response.status).to eq(202)
      expect(response["content-type"]).to start_with("application/json")
      expect(response["x-rendered"]).to eq("json")
      expect(JSON.parse(response.body)).to eq("status" => 200, "bytes" => 999,
                                              "sha256" => OriginServer.expected_sha256(999))
    end

    it "on_response reads the body and renders it as body: String" do
      response = call(:on_response_render, as: "string", path: "/chunked?n=300000&chunk=9999", keep_body: false)
      expect(response.status).to eq(203)
      expect(response["content-type"]).to eq("application/octet-stream")
      expect(response["content-length"]).to eq("300000")
      expect(response.complete).to be(true)
      expect(response.sha256).to eq(OriginServer.expected_sha256(300_000))
    end

    it "on_response renders an IO body that is not a File (StringIO)" do
      response = call(:on_response_render, as: "io", path: "/bytes?n=4321")
      expect(response.status).to eq(200)
      expect(response["content-length"]).to eq("4321")
      expect(response.body).to eq(OriginServer.pattern_bytes(4321))
    end

    it "on_response renders a File body" do
      path = File.join(@tmp, "render.bin")
      sha = write_pattern_file(path, 2 * ContractSpec::MIB + 1)
      response = call(:on_response_render, as: "file", file: path, path: "/bytes?n=10", keep_body: false)
      expect(response.status).to eq(200)
      expect(response["content-type"]).to eq("application/x-file")
      expect(response["content-length"]).to eq((2 * ContractSpec::MIB + 1).to_s)
      expect(response.complete).to be(true)
      expect(response.sha256).to eq(sha)
    end

    it "on_response that neither reads nor renders lets the origin's response through (headers changed)" do
      response = call(:on_response_pass, path: "/bytes?n=400000", keep_body: false)
      expect(response.status).to eq(200)
      expect(response["x-on-response"]).to eq("seen 200")
      expect(response["content-length"]).to eq("400000")
      expect(response.complete).to be(true)
      expect(response.sha256).to eq(OriginServer.expected_sha256(400_000))
    end

    it "responder.redirect_to answers 302 by default, or the status given" do
      response = call(:on_response_redirect, to: "https://example.test/moved?x=1", path: "/bytes?n=10")
      expect(response.status).to eq(302)
      expect(response["location"]).to eq("https://example.test/moved?x=1")
      expect(response.complete).to be(true)
      response = call(:on_response_redirect, to: "/elsewhere", status: "303", path: "/bytes?n=10")
      expect(response.status).to eq(303)
      expect(response["location"]).to eq("/elsewhere")
    end

    it "on_response that reads the body and renders nothing: 500" do
      response = call(:on_response_unrendered, path: "/bytes?n=100")
      expect(response.status).to eq(500)
      expect(response.complete).to be(true)
      expect(response.body).not_to eq(OriginServer.pattern_bytes(100))
      expect(puma.log).to include("ResponseBodyAlreadyConsumedError")
    end

    it "response.body past max_buffered_body: 500" do
      response = call(:on_response_too_large, max_buffered_body: "10000", path: "/bytes?n=50000")
      expect(response.status).to eq(500)
      expect(response.complete).to be(true)
      expect(response.body).not_to include("read ")
      expect(puma.log).to include("BodyTooLargeError")
    end

    it "response.body past max_buffered_body: on_error renders its own answer" do
      response = call(:on_response_too_large, max_buffered_body: "10000", rescue: "1", path: "/bytes?n=50000")
      expect(response.status).to eq(413)
      expect(response.body).to start_with("on_error: ").and include("BodyTooLarge")
    end

    it "response.body within max_buffered_body is read whole" do
      response = call(:on_response_too_large, max_buffered_body: "50000", path: "/bytes?n=50000")
      expect(response.status).to eq(200)
      expect(response.body).to eq("read 50000 bytes")
    end

    it "on_complete runs after the last byte went out" do
      tag = SecureRandom.hex(6)
      socket = connect
      send_request(socket, "GET", contract_path(:on_complete, tag: tag, path: "/drip?n=3&interval=0.5"))
      first = read_until(socket, "data: 0\n")
      # Two more events are still to come: on_complete must not have run.
      expect(origin.wait_until(timeout: 0.3) { pinged?(origin, "on_complete", tag) }).to be(false)
      rest, reset = read_to_eof(socket)
      socket.close # the proxy lets a client close its side first (bounded drain)
      raw = first + rest
      expect(reset).to be(false)
      expect(raw).to include("data: 1\n", "data: 2\n")
      expect(raw).to end_with("0\r\n\r\n")
      expect(origin.wait_until(timeout: 5) { pinged?(origin, "on_complete", tag) }).to be(true)
      expect(puma.log).to include("[contract-on-complete] tag=#{tag} status=200")
    ensure
      socket&.close
    end

    it "on_error renders its own answer when the connection is refused" do
      port = closed_port
      response = call(:on_error, origin: "http://127.0.0.1:#{port}", path: "/echo")
      expect(response.status).to eq(599)
      expect(response.body).to eq("on_error: ThreadedProxy::ConnectError")
      expect(response["x-error-class"]).to eq("ThreadedProxy::ConnectError")
      expect(response["x-error-url"]).to eq("http://127.0.0.1:#{port}/echo")
    end

    # What on_error is handed, by failure (DESIGN.md: ConnectError for
    # refused/unreachable/DNS, TLSError, UpstreamError for protocol
    # violations and resets, TimeoutError).
    {
      "DNS failure" => [->(_) { { url: "http://nonexistent.invalid/echo" } }, "ThreadedProxy::ConnectError"],
      "an untrusted certificate" => [->(spec) { { origin: spec.instance_variable_get(:@tls_origin).url } }, "ThreadedProxy::TLSError"],
      "a garbage answer" => [->(_) { { path: "/garbage" } }, "ThreadedProxy::UpstreamError"],
      "conflicting framing" => [->(_) { { path: "/conflicting-framing" } }, "ThreadedProxy::UpstreamError"],
      "a reset before the headers" => [->(_) { { path: "/reset" } }, "ThreadedProxy::UpstreamError"]
    }.each do |failure, (query, error_class)|
      it "on_error is handed a #{error_class} for #{failure}" do
        response = call(:on_error, **query.call(self))
        expect(response.status).to eq(599)
        expect(response.body).to eq("on_error: #{error_class}")
      end
    end

    it "on_error renders its own answer on a timeout" do
      started = monotonic
      response = call(:on_error, path: "/hang", header_timeout: "0.5")
      expect(response.status).to eq(599)
      expect(response.body).to eq("on_error: ThreadedProxy::TimeoutError")
      expect(monotonic - started).to be < 3
    end

    it "a CR/LF header value from on_headers: InvalidHeaderError, 500, never on the wire" do
      status_line, headers, body = wire(:on_headers_crlf, path: "/headers?h=X-Origin:fine")
      expect(status_line).to start_with("HTTP/1.1 500")
      expect(headers.map { |n, _| n.downcase }).not_to include("x-bad", "b")
      expect(headers.map { |n, _| n.downcase }).not_to include("x-origin")
      expect(body).not_to include("a\r\nb")
      expect(puma.log).to include("InvalidHeaderError")
    end

    describe "the threaded_proxy.fetch event" do
      it "reports method, url, status, bytes and times of an exchange" do
        tag = SecureRandom.hex(6)
        response = call(:fetch, path: "/bytes?n=5000&notify=#{tag}")
        expect(response.status).to eq(200)
        event = event_for(tag)
        expect(event).to include("method" => "GET", "url" => "#{origin.url}/bytes?n=5000&notify=#{tag}",
                                 "status" => 200, "error" => nil)
        expect(event["bytes_to_client"]).to be > 5000
        expect(event["time_to_first_byte"]).to be_a(Float).and be > 0
        expect(event["total_time"]).to be_a(Float).and be >= event["time_to_first_byte"]
      end

      it "reports the error of a failed exchange" do
        tag = SecureRandom.hex(6)
        port = closed_port
        response = call(:fetch, origin: "http://127.0.0.1:#{port}", path: "/echo?notify=#{tag}", verb: "POST")
        expect(response.status).to eq(502)
        event = event_for(tag)
        expect(event).to include("method" => "POST", "url" => "http://127.0.0.1:#{port}/echo?notify=#{tag}",
                                 "status" => 502)
        expect(event["error"]).to start_with("ThreadedProxy::ConnectError")
        expect(event["total_time"]).to be_a(Float)
      end
    end
  end

  # ======================================================= errors and timeouts

  describe "errors and timeouts" do
    def expect_bad_gateway(response)
      expect(response.status).to eq(502)
      expect(response.complete).to be(true)
    end

    it "connection refused: 502" do
      expect_bad_gateway(call(:fetch, origin: "http://127.0.0.1:#{closed_port}", path: "/echo"))
    end

    it "DNS failure: 502" do
      expect_bad_gateway(call(:fetch, url: "http://nonexistent.invalid/echo"))
    end

    it "a garbage answer: 502" do
      expect_bad_gateway(call(:fetch, path: "/garbage"))
    end

    it "Content-Length and Transfer-Encoding together: 502" do
      response = call(:fetch, path: "/conflicting-framing")
      expect_bad_gateway(response)
      expect(response.body).not_to eq("hello")
    end

    it "512 KiB of response headers: 502" do
      expect_bad_gateway(call(:fetch, path: "/huge-headers?kb=512"))
    end

    it "header_timeout: 504 soon after the timeout" do
      started = monotonic
      response = call(:fetch, path: "/hang", header_timeout: "0.5")
      elapsed = monotonic - started
      expect(response.status).to eq(504)
      expect(response.complete).to be(true)
      expect(elapsed).to be_between(0.4, 3)
    end

    it "connect_timeout is accepted and a reachable origin still answers" do
      expect(call(:fetch, path: "/echo", connect_timeout: "0.5").status).to eq(200)
    end

    it "idle_timeout mid-body: the client sees a cut body, never a clean end" do
      started = monotonic
      response = call(:fetch, path: "/hang-body?n=200000&send=100000", idle_timeout: "0.5", keep_body: false)
      expect(response.status).to eq(200)
      expect(response["content-length"]).to eq("200000")
      expect(response.complete).to be(false)
      expect(response.body_bytes).to be < 200_000
      expect(monotonic - started).to be < 5
    end

    it "idle_timeout mid-body for an HTTP/1.0 client: the connection is reset, not closed cleanly" do
      response = call(:fetch, http10: true, path: "/hang-body?n=200000&send=100000", idle_timeout: "0.5",
                              keep_body: false)
      expect(response.complete).to be(false)
      expect(response.body_bytes).to be < 200_000
    end

    it "origin closes mid-body (Content-Length): the client sees an incomplete body" do
      response = call(:fetch, path: "/truncate?n=300000&send=120000", keep_body: false)
      expect(response.status).to eq(200)
      expect(response.framing).to eq(:length)
      expect(response.complete).to be(false)
      expect(response.body_bytes).to be < 300_000
    end

    it "origin closes mid-body (chunked): the client sees an incomplete body" do
      response = call(:fetch, path: "/truncate-chunked?send=120000&chunk=10000", keep_body: false)
      expect(response.status).to eq(200)
      expect(response.framing).to eq(:chunked)
      expect(response.complete).to be(false)
    end

    it "origin closes mid-body (chunked) for an HTTP/1.0 client: reset, not a clean close" do
      response = call(:fetch, http10: true, path: "/truncate-chunked?send=120000&chunk=10000", keep_body: false)
      expect(response.framing).to eq(:close)
      expect(response.complete).to be(false)
      expect(response.reset).to be(true)
    end

    describe "a client that disconnects mid-stream cancels the origin request" do
      around do |example|
        @fresh = OriginServer.new.start
        example.run
      ensure
        @fresh.stop
      end

      it "during a slow event stream" do
        socket = connect
        send_request(socket, "GET", contract_path(:fetch, origin: @fresh.url, path: "/drip?n=1000&interval=0.5"))
        read_until(socket, "data: 0\n")
        expect(@fresh.peer_closed_count).to eq(0)
        socket.close
        expect(@fresh.wait_until(timeout: 3) { @fresh.peer_closed_count >= 1 }).to be(true)
        expect(@fresh.errors).to be_empty
      end

      it "during a large body read slowly" do
        socket = connect
        send_request(socket, "GET", contract_path(:fetch, origin: @fresh.url, path: "/bytes?n=#{4096 * ContractSpec::MIB}"))
        read_until(socket, "\r\n\r\n")
        got = 0
        got += socket.readpartial(65_536).bytesize while got < ContractSpec::MIB
        expect(@fresh.peer_closed_count).to eq(0)
        socket.close
        expect(@fresh.wait_until(timeout: 3) { @fresh.peer_closed_count >= 1 }).to be(true)
        expect(@fresh.errors).to be_empty
      end
    end
  end
end
