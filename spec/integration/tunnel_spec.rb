# frozen_string_literal: true

require "digest"

RSpec.describe "tunnels: WebSocket pass-through and proxy_tunnel" do
  before(:all) do
    @ws_origin = WebSocketPeers::Origin.new.start
    @echo = TCPServer.new("127.0.0.1", 0)
    @echo_thread = Thread.new do
      loop do
        conn = @echo.accept
        # Echoes until EOF, then half-closes back.
        Thread.new(conn) do |c|
          IO.copy_stream(c, c)
          c.close_write
        rescue IOError, SystemCallError
          nil
        ensure
          c.close
        end
      end
    rescue IOError, SystemCallError
      nil
    end
    @puma = PumaServer.new(env: { "ORIGIN_URL" => @ws_origin.url }, threads: "2:2").start
  end

  after(:all) do
    @puma&.stop
    @ws_origin&.stop
    @echo&.close
    @echo_thread&.join(2)
  end

  let(:puma) { @puma }

  def websocket(path = "/proxy/ws")
    client = WebSocketPeers::Client.new("#{puma.url}#{path}")
    expect(client.next_event).to eq([:open])
    client
  end

  def raw_upgrade(path, protocol: "websocket", extra: "")
    socket = TCPSocket.new("127.0.0.1", puma.port)
    socket.write("GET #{path} HTTP/1.1\r\nHost: x\r\nUpgrade: #{protocol}\r\nConnection: Upgrade\r\n" \
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n#{extra}\r\n")
    buffer = +""
    buffer << socket.readpartial(4096) until buffer.include?("\r\n\r\n")
    head, @after_head = buffer.split("\r\n\r\n", 2)
    [socket, "#{head}\r\n\r\n"]
  end

  it "relays text and binary frames both ways" do
    client = websocket
    client.text("hello through rust")
    expect(client.next_event).to eq([:message, "hello through rust"])
    client.binary([0, 1, 2, 255, 254])
    expect(client.next_event).to eq([:message, [0, 1, 2, 255, 254]])
    client.disconnect
  end

  it "answers pings with pongs" do
    client = websocket
    expect(client.ping("are you there")).to be(true)
    client.disconnect
  end

  it "carries a 10 MiB message each way intact", timeout: 120 do
    client = websocket
    message = ("0123456789abcdef" * (10 * 1024 * 1024 / 16))
    client.text(message)
    kind, echoed = client.next_event(60)
    expect(kind).to eq(:message)
    expect(Digest::SHA256.hexdigest(echoed)).to eq(Digest::SHA256.hexdigest(message))
    client.disconnect
  end

  it "completes a close handshake the client starts" do
    client = websocket
    client.close
    expect(client.next_event).to eq([:close, 1000, ""])
    expect(@ws_origin.events.pop(timeout: 5)).to eq([:closed, 1000])
    client.disconnect
  end

  it "passes on a close the origin starts" do
    client = websocket
    client.text("close-me")
    expect(client.next_event).to eq([:close, 1000, "origin says bye"])
    client.disconnect
  end

  it "lets on_headers add headers to the 101 and forwards the handshake" do
    socket, head = raw_upgrade("/headers_proxy/ws")
    expect(head).to start_with("HTTP/1.1 101 Switching Protocols\r\n")
    expect(head).to match(/^sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK\+xOo=\r$/i)
    expect(head).to match(/^x-proxied-by: threaded-proxy\r$/i)
    expect(head).to match(/^upgrade: websocket\r$/i)
    expect(head).to match(/^connection: upgrade\r$/i)
  ensure
    socket&.close
  end

  it "relays the origin's normal response when it refuses the upgrade" do
    socket, head = raw_upgrade("/proxy/refuse")
    expect(head).to start_with("HTTP/1.1 403 Forbidden\r\n")
    expect(head).to include("connection: close")
    expect(@after_head + socket.read).to eq("forbidden\n")
  ensure
    socket&.close
  end

  it "joins the client to a raw TCP service with proxy_tunnel: 100 MiB round trip, half-close honoured", timeout: 180 do
    socket, head = raw_upgrade("/tunnel/#{@echo.addr[1]}", protocol: "tcp")
    expect(head).to start_with("HTTP/1.1 101 Switching Protocols\r\n")
    expect(head).to match(/^upgrade: tcp\r$/i)
    size = 100 * 1024 * 1024
    sent = Digest::SHA256.new
    writer = Thread.new do
      OriginServer.each_pattern_slice(0, size) do |slice|
        sent << slice
        socket.write(slice)
      end
      socket.close_write # half-close: the echo still comes back
    end
    received = Digest::SHA256.new
    count = 0
    loop do
      data = socket.readpartial(1 << 20)
      received << data
      count += data.bytesize
    rescue EOFError
      break
    end
    writer.join
    expect(count).to eq(size)
    expect(received.hexdigest).to eq(sent.hexdigest)
    # Both directions are counted once the tunnel has ended.
    stats = StatsClient.wait_for(puma) { |s| s["bytes_from_client"] >= size }
    expect(stats).not_to be_nil
    expect(stats["bytes_to_client"]).to be >= size
  ensure
    socket&.close
  end

  it "answers 502 before switching when the tunnel target refuses" do
    closed = TCPServer.new("127.0.0.1", 0).then { |s| s.addr[1].tap { s.close } }
    socket, head = raw_upgrade("/tunnel/#{closed}", protocol: "tcp")
    expect(head).to start_with("HTTP/1.1 502 Bad Gateway\r\n")
  ensure
    socket&.close
  end

  it "closes a tunnel that stays silent for idle_timeout" do
    socket, head = raw_upgrade("/tunnel/#{@echo.addr[1]}?idle_timeout=0.5", protocol: "tcp")
    expect(head).to start_with("HTTP/1.1 101 ")
    socket.write("still here?")
    expect(socket.readpartial(100)).to eq("still here?")
    # Nothing more either way: the proxy ends the tunnel.
    expect(socket.wait_readable(10)).to be_truthy
    expect { socket.readpartial(100) }.to raise_error { |e| expect([EOFError, Errno::ECONNRESET]).to include(e.class) }
  ensure
    socket&.close
  end
end
