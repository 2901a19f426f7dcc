# frozen_string_literal: true

require "socket"
require "rack/mock"
require "threaded_proxy"

RSpec.describe "graceful shutdown on SIGTERM" do
  before(:all) { @origin = OriginServer.new.start }
  after(:all) { @origin&.stop }

  # Starts a slow stream through Puma and returns the socket once its head
  # and first event arrived.
  def start_stream(puma, path)
    socket = TCPSocket.new("127.0.0.1", puma.port)
    socket.write("GET #{path} HTTP/1.1\r\nHost: x\r\n\r\n")
    raise "no head" unless socket.wait_readable(10)

    socket
  end

  def read_rest(socket)
    RawHTTP.read_response(socket, head_only: false, keep_body: true, read_timeout: 20)
  end

  [["single mode", 0], ["cluster mode", 2]].each do |mode, workers|
    it "lets an in-flight stream finish within shutdown_timeout (#{mode})", timeout: 90 do
      puma = PumaServer.new(env: { "ORIGIN_URL" => @origin.url, "THREADED_PROXY_SHUTDOWN_TIMEOUT" => 15 },
                            threads: "2:2", workers: workers).start
      socket = start_stream(puma, "/proxy/drip?n=6&interval=0.4")
      Process.kill("TERM", puma.pid)
      response = read_rest(socket)
      expect(response.status).to eq(200)
      expect(response.complete).to be(true)
      expect(response.body).to eq((0...6).map { |i| "data: #{i}\n\n" }.join)
      puma.stop
      expect(puma.running?).to be(false)
    ensure
      socket&.close
      puma&.stop
    end
  end

  it "cuts a stream that outlives shutdown_timeout, so it cannot look complete", timeout: 90 do
    puma = PumaServer.new(env: { "ORIGIN_URL" => @origin.url, "THREADED_PROXY_SHUTDOWN_TIMEOUT" => 1 },
                          threads: "2:2").start
    socket = start_stream(puma, "/proxy/drip?n=100&interval=0.5")
    Process.kill("TERM", puma.pid)
    response = read_rest(socket)
    expect(response.status).to eq(200)
    expect(response.complete).to be(false)
    expect(response.body_bytes).to be < 100 * "data: 10\n\n".bytesize
    puma.stop
    expect(puma.running?).to be(false)
  ensure
    socket&.close
    puma&.stop
  end

  it "refuses new exchanges with 503 once shutdown began, in a forked child with its own runtime" do
    ThreadedProxy.start # the parent's runtime: the child must not reuse it
    reader, writer = IO.pipe
    pid = fork do
      reader.close
      ThreadedProxy.start
      ThreadedProxy::Native.stop_accepting
      status, headers, body = ThreadedProxy.call(Rack::MockRequest.env_for("/x"), "#{@origin.url}/bytes?n=10")
      body.close
      writer.write(JSON.generate([status, headers["retry-after"], ThreadedProxy::Native.runtime_pid == Process.pid]))
      writer.close
      exit!(0)
    end
    writer.close
    result = JSON.parse(reader.read)
    Process.wait(pid)
    expect(result).to eq([503, "1", true])
    # The parent still proxies.
    status, _headers, body = ThreadedProxy.call(Rack::MockRequest.env_for("/x"), "#{@origin.url}/bytes?n=10")
    body.close
    expect(status).to eq(200)
  end
end
