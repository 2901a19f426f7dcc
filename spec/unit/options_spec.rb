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
end
