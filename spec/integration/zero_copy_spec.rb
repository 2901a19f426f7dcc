# frozen_string_literal: true

# The zero-copy switch (README "Install", issue 14 item 6): with it off a
# body of known length is copied, the path every system other than Linux
# takes, and arrives the same; with it on (the default) it is spliced.
# bin/test also reruns the download and slow-client specs with
# THREADED_PROXY_ZERO_COPY=0.
require "threaded_proxy"

RSpec.describe "zero copy on and off" do
  let(:size) { 8 * 1024 * 1024 }
  let(:rackup) { File.expand_path("../fixtures/zero_copy.ru", __dir__) }

  before(:all) { @origin = OriginServer.new.start }
  after(:all) { @origin&.stop }

  # Fetches `size` bytes through a Puma started with `env`; returns the
  # bytes spliced and sent to the client meanwhile.
  def download_through(env)
    puma = PumaServer.new(env: { "ORIGIN_URL" => @origin.url, "THREADED_PROXY_ZERO_COPY" => nil }.merge(env),
                          threads: "1:1", rackup: rackup).start
    before = StatsClient.fetch(puma)
    response = RawHTTP.request("#{puma.url}/bytes?n=#{size}", keep_body: false)
    expect(response.status).to eq(200)
    expect(response["content-length"]).to eq(size.to_s)
    expect(response.complete).to be(true)
    expect(response.sha256).to eq(OriginServer.expected_sha256(size))
    after = StatsClient.wait_for(puma) { |s| s["completed"] > before["completed"] } || StatsClient.fetch(puma)
    expect(puma.log).not_to match(/panicked|\[BUG\]|fatal/)
    %w[bytes_spliced bytes_to_client].to_h { |k| [k, after[k] - before[k]] }
  ensure
    puma&.stop
  end

  it "splices by default", timeout: 60 do
    moved = download_through({})
    expect(moved["bytes_spliced"]).to be >= size - (256 * 1024)
  end

  it "copies with THREADED_PROXY_ZERO_COPY=0: byte-identical, nothing spliced", timeout: 60 do
    moved = download_through("THREADED_PROXY_ZERO_COPY" => "0")
    expect(moved["bytes_spliced"]).to eq(0)
    expect(moved["bytes_to_client"]).to be >= size
  end

  it "copies with c.zero_copy = false: byte-identical, nothing spliced", timeout: 60 do
    moved = download_through("ZERO_COPY_SETTING" => "false")
    expect(moved["bytes_spliced"]).to eq(0)
    expect(moved["bytes_to_client"]).to be >= size
  end

  it "refuses a zero_copy setting that is not true, false or nil" do
    config = ThreadedProxy::Configuration.new
    config.zero_copy = "no"
    expect { config.apply! }.to raise_error(ArgumentError, /zero_copy/)
  end
end
