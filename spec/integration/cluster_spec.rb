# frozen_string_literal: true

RSpec.describe "proxy_fetch in Puma cluster mode" do
  before(:all) { @origin = OriginServer.new.start }
  after(:all) { @origin&.stop }

  # Concurrent slow requests make both workers accept some; the response
  # carries the pid of the worker whose callback thread ran on_headers.
  def worker_pids_seen(puma, wanted)
    seen = {}
    10.times do
      Array.new(8) do
        Thread.new { RawHTTP.request("#{puma.url}/pid_proxy/slow?delay=0.3") }
      end.map(&:value).each do |response|
        expect(response.status).to eq(200)
        expect(response.body).to eq("slow done\n")
        seen[Integer(response["x-worker-pid"])] = true
      end
      break if seen.size >= wanted
    end
    seen.keys
  end

  [
    ["with preload_app! and the runtime started in the master", { preload: true, env: { "THREADED_PROXY_START" => "1" } }],
    ["without preload", { preload: false, env: {} }]
  ].each do |label, setup|
    it "proxies from both workers #{label}", timeout: 120 do
      puma = PumaServer.new(env: { "ORIGIN_URL" => @origin.url }.merge(setup[:env]),
                            threads: "2:2", workers: 2, preload: setup[:preload]).start
      begin
        pids = worker_pids_seen(puma, 2)
        expect(pids.size).to eq(2)
        expect(pids).to match_array(puma.worker_pids)
        expect(pids).not_to include(puma.pid)
      ensure
        puma.stop
      end
      expect(puma.log).not_to match(/panicked|\[BUG\]|fatal/)
    end
  end
end
