# frozen_string_literal: true

require "threaded_proxy"

RSpec.describe ThreadedProxy::Configuration do
  subject(:configuration) { described_class.new }

  it "sizes fd_budget and max_connections to the file-descriptor limit, leaving room for the app server" do
    soft, = Process.getrlimit(:NOFILE)
    # Rust's rule (limits::default_fd_budget and default_max_connections,
    # unit-tested there): the soft limit less 256 and an eighth of it.
    expect(configuration.fd_budget).to eq([soft - 256 - (soft / 8), 32].max)
    expect(configuration.max_connections).to eq([configuration.fd_budget / 2, 16].max)
    expect(configuration.max_connections_per_origin).to eq(configuration.max_connections)
  end

  # One place for the defaults Rust also needs (issue 16 item 4): Rust's
  # Settings / DeliverySettings, read through Native.default_settings.
  it "takes the defaults Rust owns from Rust, in the forms users write" do
    native = ThreadedProxy::Native.default_settings
    expect(native).to include(fd_budget: configuration.fd_budget, max_connections: configuration.max_connections,
                              callback_timeout: 30.0, pool_idle_timeout: 60.0, pool_max_idle_per_host: 64,
                              runtime_threads: 0, async_concurrency: 8, async_max_attempts: 10)
    expect([configuration.callback_timeout, configuration.pool_idle_timeout, configuration.pool_max_idle_per_host,
            configuration.runtime_threads]).to eq([30.0, 60.0, 64, 0])
    expect(configuration.async_queue_path).to eq("tmp/threaded_proxy_queue.sqlite3")
    expect([configuration.async_concurrency, configuration.async_rate, configuration.async_timeout,
            configuration.async_max_attempts, configuration.async_backoff, configuration.async_backoff_max])
      .to eq([8, nil, 30.0, 10, 1.0, 300.0])
    expect(configuration.async_success).to eq(200..299)
    expect(configuration.async_retry_on).to eq([429, 500..599])
    # And what Ruby hands back is what Rust started from.
    expect(ThreadedProxy::Async.send(:status_ranges, :r, configuration.async_retry_on)).to eq(native[:async_retry_on])
    expect(ThreadedProxy::Async.send(:status_ranges, :s, configuration.async_success)).to eq(native[:async_success])
  end

  it "keeps Ruby's own per-call defaults" do
    expect([configuration.connect_timeout, configuration.header_timeout, configuration.idle_timeout,
            configuration.callback_threads, configuration.shutdown_timeout, configuration.max_buffered_body])
      .to eq([5.0, 60.0, 60.0, 2, 25.0, 10 * 1024 * 1024])
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
