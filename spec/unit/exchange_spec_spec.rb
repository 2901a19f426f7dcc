# frozen_string_literal: true

require "threaded_proxy"
require "rack"
require "tempfile"

# ExchangeSpec: the one writer of the Hash Native.start_exchange reads
# (issue 16 item 1).
RSpec.describe ThreadedProxy::ExchangeSpec do
  let(:timeouts) { { connect_timeout: 1.0, header_timeout: 2.0, idle_timeout: 3.0 } }

  it "fills every field Rust reads with its default and leaves nil ones out" do
    native = described_class.new(url: "http://o.test/", **timeouts).to_native
    expect(native).to eq(
      id: 0, method: "GET", url: "http://o.test/", headers: [], client_head: false, client_http10: false,
      on_headers: false, on_response: false, on_error: false, finished: false,
      connect_timeout: 1.0, header_timeout: 2.0, idle_timeout: 3.0, verify_tls: true, max_buffered_body: 1
    )
  end

  it "writes every flag as true or false, never leaving one out" do
    native = described_class.new(url: "http://o.test/", finished: nil, on_error: 1, verify_tls: nil).to_native
    expect(native).to include(finished: false, on_error: true, verify_tls: false)
  end

  it "refuses a field it does not know and a spec without a URL" do
    expect { described_class.new(url: "http://o.test/", client_header: true) }
      .to raise_error(ArgumentError, /unknown exchange spec field client_header/)
    expect { described_class.new(**timeouts) }.to raise_error(ArgumentError, /needs url/)
  end

  it "is frozen; #with returns a changed copy and checks its fields too" do
    spec = described_class.new(url: "http://o.test/", upgrade: "websocket", **timeouts)
    changed = spec.with(id: 7, upgrade: nil)
    expect(spec).to be_frozen
    expect([spec.id, spec.upgrade]).to eq([0, "websocket"])
    expect([changed.id, changed.upgrade]).to eq([7, nil])
    expect(changed.to_native).not_to have_key(:upgrade)
    expect(changed).to eq(spec.with(upgrade: nil, id: 7))
    expect { spec.with(bogus: 1) }.to raise_error(ArgumentError, /bogus/)
  end

  # The real boundary: Rust parses the whole spec before it touches the
  # descriptor, so a key the builder misnamed or dropped is a KeyError or
  # TypeError here, and a complete spec reaches the duplicate (of -1: IOError).
  it "is what Native.start_exchange parses, key for key" do
    spec = described_class.new(url: "http://o.test/", method: "POST", headers: [%w[X-A 1]], body: "hi".b,
                               on_error: true, **timeouts)
    expect { ThreadedProxy::Native.start_exchange(-1, spec.to_native) }
      .to raise_error(IOError, /cannot duplicate client fd/)
    expect { ThreadedProxy::Native.start_exchange(-1, spec.to_native.except(:client_http10)) }
      .to raise_error(KeyError)
    expect { ThreadedProxy::Native.start_exchange(-1, spec.with(body_fd: -1).to_native) }
      .to raise_error(IOError, /cannot duplicate body fd/)
  end

  describe "as ThreadedProxy::Exchange builds it" do
    def env(method = "GET", headers = {})
      Rack::MockRequest.env_for("http://app.test/x", { method: method }.merge(headers))
    end

    def native_spec(env, url, options = {}, tunnel: nil, &block)
      ThreadedProxy::Exchange.new(env, url, options, tunnel: tunnel, &block).send(:native_spec)
    end

    it "takes a fetch's request, options and callbacks" do
      spec = native_spec(env("HEAD"), "http://o.test/a", { method: :post, headers: { "X-A" => "1" }, body: "b",
                                                           header_timeout: 4, verify_tls: false }) do |c|
        c.on_headers { nil }
      end
      expect(spec).to be_a(described_class)
      expect(spec.to_native).to include(method: "POST", url: "http://o.test/a", headers: [%w[X-A 1]], body: "b",
                                        client_head: true, on_headers: true, on_response: false, finished: true,
                                        header_timeout: 4.0, verify_tls: false, max_buffered_body: 10 * 1024 * 1024)
      expect(spec.body.encoding).to eq(Encoding::BINARY)
    end

    it "sends a large body as its file descriptor, from its start" do
      file = Tempfile.new("body")
      file.write("x" * 10)
      file.flush
      spec = native_spec(env("POST", input: file), "http://o.test/", { body: :rack })
      expect(spec.to_native).to include(body_fd: file.fileno, body_offset: 0)
      expect(spec.to_native).not_to have_key(:body)
    ensure
      file&.close!
    end

    it "gives a tunnel no request of its own and its connect timeout as header timeout" do
      upgrade = env("GET", "HTTP_UPGRADE" => "raw", "HTTP_CONNECTION" => "Upgrade")
      spec = native_spec(upgrade, "tcp://db.test:5432", { connect_timeout: 2 }, tunnel: true)
      expect(spec.to_native).to include(method: "GET", headers: [], tunnel_address: "db.test:5432",
                                        tunnel_upgrade: "raw", header_timeout: 2.0, connect_timeout: 2.0)
      expect(spec.to_native.keys).not_to include(:body, :body_fd, :upgrade)
      expect { native_spec(env, "tcp://db.test:5432", {}, tunnel: true) }
        .to raise_error(ArgumentError, /needs a request with Upgrade/)
    end
  end
end
