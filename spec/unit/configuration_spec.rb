# frozen_string_literal: true

require "threaded_proxy"

RSpec.describe ThreadedProxy::Configuration do
  subject(:configuration) { described_class.new }

  it "sizes fd_budget and max_connections to the file-descriptor limit, leaving room for the app server" do
    soft, = Process.getrlimit(:NOFILE)
    # Rust's rule (limits::default_fd_budget, unit-tested there): the soft
    # limit less 256 and an eighth of it.
    expect(configuration.fd_budget).to eq(ThreadedProxy::Native.default_fd_budget)
    expect(configuration.fd_budget).to eq([soft - 256 - (soft / 8), 32].max)
    expect(configuration.max_connections).to eq([configuration.fd_budget / 2, 16].max)
  end

  it "refuses nonsense before it reaches Rust" do
    configuration.max_connections = 0
    expect { configuration.apply! }.to raise_error(ArgumentError, /max_connections/)
    configuration.max_connections = 10
    configuration.fd_budget = 0
    expect { configuration.apply! }.to raise_error(ArgumentError, /fd_budget/)
    configuration.fd_budget = 100
    configuration.metrics_hosts = [1]
    expect { configuration.apply! }.to raise_error(ArgumentError, /metrics_hosts/)
    configuration.metrics_hosts = ["files.internal"]
    configuration.idle_timeout = -1
    expect { configuration.apply! }.to raise_error(ArgumentError, /idle_timeout/)
    configuration.idle_timeout = 5
    configuration.allowed_hosts = "example.com"
    expect { configuration.apply! }.to raise_error(ArgumentError, /allowed_hosts/)
  end

  it "is what ThreadedProxy.configure yields" do
    original = ThreadedProxy.configuration.connect_timeout
    ThreadedProxy.configure { |c| c.connect_timeout = 1.5 }
    expect(ThreadedProxy.configuration.connect_timeout).to eq(1.5)
  ensure
    ThreadedProxy.configure { |c| c.connect_timeout = original }
  end
end

RSpec.describe "ThreadedProxy.ensure_configured" do
  it "pushes the Ruby defaults to Rust before the first exchange, once" do
    ThreadedProxy.instance_variable_set(:@configured, nil)
    expect(ThreadedProxy::Native).to receive(:configure).once.and_call_original
    ThreadedProxy.ensure_configured
    ThreadedProxy.ensure_configured
  end
end
