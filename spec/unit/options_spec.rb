# frozen_string_literal: true

require "threaded_proxy"
require "tempfile"

RSpec.describe ThreadedProxy::Options do
  let(:configuration) { ThreadedProxy::Configuration.new }

  def options(url = "http://origin.test/x", opts = {})
    described_class.new(url, opts, configuration)
  end

  it "defaults to GET with the configured timeouts and TLS verification" do
    o = options
    expect(o.method).to eq("GET")
    expect(o.headers).to eq([])
    expect(o.connect_timeout).to eq(configuration.connect_timeout)
    expect(o.header_timeout).to eq(configuration.header_timeout)
    expect(o.idle_timeout).to eq(configuration.idle_timeout)
    expect(o.verify_tls).to be(true)
    expect(o.max_buffered_body).to eq(10 * 1024 * 1024)
  end

  it "refuses unknown options, naming them" do
    expect { options("http://o.test", timeout: 1) }.to raise_error(ArgumentError, /unknown option :timeout/)
  end

  it "refuses malformed URLs, other schemes and URLs without a host" do
    expect { options("http://exa mple.com/") }.to raise_error(ArgumentError, /malformed url/)
    expect { options("ftp://origin.test/") }.to raise_error(ArgumentError, /http:\/\/ or https:\/\//)
    expect { options("file:///etc/passwd") }.to raise_error(ArgumentError)
    expect { options("/relative") }.to raise_error(ArgumentError)
    expect { options(nil) }.to raise_error(ArgumentError, /url must be a String/)
    expect { options("http://user:pw@origin.test/") }.to raise_error(ArgumentError, /user info/)
  end

  # Issue 15 item 11: the Rust parser the request uses decides, in the
  # action. Ruby's URI took each of these and the request then failed after
  # the hijack (or went to the wrong place).
  describe "URLs are judged by the parser the request uses" do
    it "refuses what that parser refuses, as ArgumentError" do
      expect { options("http://origin.test/x?a=1 2") }.to raise_error(ArgumentError, /malformed url/)
      expect { options("http://127%2e0%2e0%2e1:8080/") }.to raise_error(ArgumentError, /malformed url/)
      expect { options("http://origin.test/\u00fc") }.to raise_error(ArgumentError, /not ASCII/)
    end

    it "refuses a port out of range instead of using port 80" do
      expect { options("http://127.0.0.1:74326/") }.to raise_error(ArgumentError, /invalid port "74326"/)
      expect { options("http://127.0.0.1:0/") }.to raise_error(ArgumentError, /invalid port/)
      expect { options("http://127.0.0.1:+80/") }.to raise_error(ArgumentError, /invalid port/)
    end

    it "refuses hosts no resolver takes" do
      expect { options("http://a..b/") }.to raise_error(ArgumentError, /invalid host/)
      expect { options("http://a!b/") }.to raise_error(ArgumentError, /invalid host/)
      expect { options("http://[v1.x]/") }.to raise_error(ArgumentError, /invalid host/)
      expect { options("http://:80/") }.to raise_error(ArgumentError, /no host/)
    end

    it "gives a URL without a path the path /" do
      expect(options("http://127.0.0.1:9000?x=1").url).to eq("http://127.0.0.1:9000/?x=1")
      expect(options("http://origin.test").url).to eq("http://origin.test/")
      expect(options("http://origin.test/a?b=1#frag").url).to eq("http://origin.test/a?b=1")
      expect(options(URI("http://origin.test:8080")).url).to eq("http://origin.test:8080/")
    end

    it "matches allowed_hosts against the host the request connects to" do
      configuration.allowed_hosts = ["::1", "files.internal"]
      expect(options("http://[::1]:8080/x").host).to eq("::1")
      expect(options("http://FILES.internal?x").url).to eq("http://FILES.internal/?x")
      expect { options("http://files.internal.evil.test/") }.to raise_error(ArgumentError, /allowed_hosts/)
      expect { options("http://files.internal:74326/") }.to raise_error(ArgumentError, /invalid port/)
    end
  end

  describe ThreadedProxy::TunnelOptions do
    def tunnel(target)
      described_class.new(target, {}, configuration)
    end

    it "takes tcp://host:port and gives the address to connect to" do
      expect(tunnel("tcp://127.0.0.1:5432").address).to eq("127.0.0.1:5432")
      expect(tunnel("tcp://[::1]:5432").url).to eq("tcp://[::1]:5432")
    end

    it "refuses a port out of range, a path, another scheme or no port" do
      expect { tunnel("tcp://127.0.0.1:74326") }.to raise_error(ArgumentError, /invalid port/)
      expect { tunnel("tcp://127.0.0.1:5432/x") }.to raise_error(ArgumentError, %r{tcp://host:port})
      expect { tunnel("http://127.0.0.1:5432") }.to raise_error(ArgumentError, %r{tcp://host:port})
      expect { tunnel("tcp://127.0.0.1") }.to raise_error(ArgumentError, %r{tcp://host:port})
      expect { tunnel("tcp://127%2e0%2e0%2e1:5432") }.to raise_error(ArgumentError, /malformed/)
    end

    it "checks allowed_hosts against the target host" do
      configuration.allowed_hosts = ["db.internal"]
      expect(tunnel("tcp://db.internal:5432").address).to eq("db.internal:5432")
      expect { tunnel("tcp://127.0.0.1:5432") }.to raise_error(ArgumentError, /allowed_hosts/)
    end
  end

  it "checks methods, headers and bodies" do
    expect(options("http://o.test", method: :post).method).to eq("POST")
    expect { options("http://o.test", method: :fetch) }.to raise_error(ArgumentError, /unsupported method/)
    expect { options("http://o.test", headers: { "X-A" => "1\r\nX-B: 2" }) }.to raise_error(ArgumentError, /CR, LF or NUL/)
    expect { options("http://o.test", headers: { "Bad Name" => "1" }) }.to raise_error(ArgumentError, /valid HTTP token/)
    expect(options("http://o.test", headers: { "X-Multi" => %w[a b] }).headers).to eq([%w[X-Multi a], %w[X-Multi b]])
    expect { options("http://o.test", body: 42) }.to raise_error(ArgumentError, /body must be/)
    expect(options("http://o.test", body: :rack).body).to eq(:rack)
    Tempfile.create("body") { |f| expect(options("http://o.test", body: f).body).to eq(f) }
  end

  it "accepts ignore_ssl_errors as the inverse of verify_tls, not both" do
    expect(options("https://o.test", ignore_ssl_errors: true).verify_tls).to be(false)
    expect(options("https://o.test", verify_tls: false).verify_tls).to be(false)
    expect { options("https://o.test", verify_tls: true, ignore_ssl_errors: true) }.to raise_error(ArgumentError, /not both/)
    expect { options("https://o.test", verify_tls: "no") }.to raise_error(ArgumentError)
  end

  it "checks timeouts, ca_file and max_buffered_body" do
    expect(options("http://o.test", header_timeout: 2).header_timeout).to eq(2.0)
    expect { options("http://o.test", idle_timeout: 0) }.to raise_error(ArgumentError, /idle_timeout/)
    expect { options("http://o.test", connect_timeout: "5") }.to raise_error(ArgumentError, /connect_timeout/)
    expect { options("https://o.test", ca_file: "/nonexistent/ca.pem") }.to raise_error(ArgumentError, /ca_file/)
    expect { options("http://o.test", max_buffered_body: -1) }.to raise_error(ArgumentError, /max_buffered_body/)
  end

  it "normalises forward_headers" do
    expect(options("http://o.test", forward_headers: true).forward_headers).to be(true)
    expect(options("http://o.test", forward_headers: ["Accept", :"X-Token"]).forward_headers).to eq(%w[accept x-token])
    expect { options("http://o.test", forward_headers: "all") }.to raise_error(ArgumentError)
  end

  describe "allowed_hosts" do
    before { configuration.allowed_hosts = ["files.internal", /\A[a-z]+\.api\.internal\z/] }

    it "lets listed hosts (String or Regexp) through" do
      expect(options("http://files.internal/a").uri.host).to eq("files.internal")
      expect(options("https://billing.api.internal/").uri.host).to eq("billing.api.internal")
      expect(options("http://FILES.internal/a").uri.host).to eq("FILES.internal")
    end

    it "refuses any other host before anything is sent" do
      expect { options("http://169.254.169.254/latest/meta-data") }.to raise_error(ArgumentError, /not in ThreadedProxy allowed_hosts/)
      expect { options("http://evil.api.internal.attacker.test/") }.to raise_error(ArgumentError)
    end
  end

  # The hop-by-hop list is Rust's (headers.rs), read once (issue 16 item 4).
  describe "HOP_BY_HOP" do
    it "is the list Rust drops from responses, and forwarding and proxy_async leave those out" do
      expect(described_class::HOP_BY_HOP).to eq(ThreadedProxy::Native.hop_by_hop_headers)
      expect(described_class::HOP_BY_HOP).to eq(%w[connection keep-alive proxy-connection te transfer-encoding
                                                    upgrade trailer proxy-authenticate proxy-authorization])
      expect(described_class::HOP_BY_HOP).to be_frozen.and(all(be_frozen))
      expect(ThreadedProxy::Exchange.forwardable_name("HTTP_KEEP_ALIVE")).to be_nil
      expect(ThreadedProxy::Exchange.forwardable_name("HTTP_PROXY_AUTHORIZATION")).to be_nil
      expect(ThreadedProxy::Exchange.forwardable_name("HTTP_X_REQUEST_ID")).to eq(%w[X-Request-Id x-request-id])
      expect(ThreadedProxy::Async::NOT_STORED).to include(*described_class::HOP_BY_HOP)
    end
  end
end
