# frozen_string_literal: true

require "digest"
require "securerandom"
require "socket"
require "threaded_proxy"

# ThreadedProxy::Machine in this process, against backend processes
# (spec/fixtures/machine_backend.rb) and raw client sockets.
RSpec.describe ThreadedProxy::Machine do
  # Log lines, each also pushed on a queue a spec can wait on.
  class MachineSpecLog
    attr_reader :lines, :queue

    def initialize
      @lines = Queue.new
      @all = []
      @lock = Mutex.new
    end

    %i[debug info warn error].each do |level|
      define_method(level) do |text|
        @lock.synchronize { @all << [level, text] }
        @lines << [level, text]
      end
    end

    def all
      @lock.synchronize { @all.dup }
    end

    # The first line matching `pattern`, waited for up to `timeout` seconds
    # (each new line wakes the wait).
    def wait_for(pattern, timeout = 10)
      Timeout.timeout(timeout) do
        loop do
          found = all.map(&:last).find { |text| text.match?(pattern) }
          return found if found

          @lines.pop
        end
      end
    end
  end

  before(:all) do
    @a = MachineBackend.new("a").start
    @b = MachineBackend.new("b").start
    @silent = MachineBackend.new("silent", "silent").start
  end

  after(:all) do
    [@a, @b, @silent].each { |backend| backend&.stop }
  end

  let(:log) { MachineSpecLog.new }
  let(:seen) { Queue.new }
  let(:errors) { Queue.new }
  let(:options) { {} }
  let(:router) do
    a = @a.address
    b = @b.address
    silent = @silent.address
    seen = self.seen
    lambda do |data|
      seen << data
      case data
      when /\APING a/ then { remote: a }
      when /\APING b/ then { remote: b }
      when /\AREWRITE/ then { remote: a, data: "REWRITTEN\n" }
      when /\AREPLY/ then { remote: a, reply: "HELLO FIRST\n" }
      when /\ABYE/ then { close: "GOODBYE\n" }
      when /\ASHUT/ then { close: true }
      when /\AGET (\w+)\n/ then { remote: Regexp.last_match(1) == "b" ? b : a }
      when /\AQUIET/ then { remote: silent, inactivity_timeout: 0.3 }
      when /\ANOWHERE (\d+)/ then { remote: "127.0.0.1:#{Regexp.last_match(1)}" }
      when /\ARAISE/ then raise "router bug"
      when /\AEXIT/ then exit 3
      when /\AHANG/ then sleep 30
      when /\AGARBAGE/ then 42
      when /\ABADREMOTE/ then { remote: "no-port-here" }
      else { noop: true }
      end
    end
  end

  let(:machine) do
    errors = self.errors
    described_class.new(port: 0, logger: log, route_timeout: 0.5, threads: 2,
                        on_connect_error: ->(remote) { errors << [:connect, remote] },
                        on_inactivity_error: ->(remote) { errors << [:inactivity, remote] },
                        **options, &router).start
  end

  after { machine.stop(2) }

  def connect
    TCPSocket.new("127.0.0.1", machine.port)
  end

  # Everything until EOF, within `timeout` seconds.
  def read_all(socket, timeout = 10)
    Timeout.timeout(timeout) { socket.read }
  end

  def read_exactly(socket, bytes, timeout = 10)
    Timeout.timeout(timeout) { socket.read(bytes) }
  end

  # Sends `request`, half-closes, returns what came back until EOF.
  def exchange(request)
    socket = connect
    socket.write(request)
    socket.close_write
    read_all(socket)
  ensure
    socket&.close
  end

  it "listens on the port it picked and routes each connection by its first bytes" do
    expect(machine.port).to be > 0
    expect(exchange("PING a\n")).to eq("a\nPING a\n")
    expect(exchange("PING b\n")).to eq("b\nPING b\n")
    expect(machine.stats).to include(routed: 2, accepted: 2)
  end

  it "sends the block's data: instead of the buffer" do
    expect(exchange("REWRITE me\n")).to eq("a\nREWRITTEN\n")
  end

  it "sends reply: to the client before the remote's bytes" do
    expect(exchange("REPLY\n")).to eq("HELLO FIRST\na\nREPLY\n")
  end

  it "closes with the bytes of close:, or with none for close: true" do
    expect(exchange("BYE\n")).to eq("GOODBYE\n")
    expect(exchange("SHUT\n")).to eq("")
    expect(machine.stats[:closed_by_block]).to eq(2)
  end

  it "asks again with the whole buffer after noop, for a pattern split across TCP segments" do
    socket = connect
    socket.write("GE")
    expect(Timeout.timeout(5) { seen.pop }).to eq("GE")
    socket.write("T b")
    expect(Timeout.timeout(5) { seen.pop }).to eq("GET b")
    socket.write("\nafter")
    expect(Timeout.timeout(5) { seen.pop }).to eq("GET b\nafter")
    socket.close_write
    expect(read_all(socket)).to eq("b\nGET b\nafter")
    expect(seen).to be_empty
  ensure
    socket&.close
  end

  it "hands the block a binary String" do
    exchange("PING a\xff\n".b)
    expect(Timeout.timeout(5) { seen.pop }.encoding).to eq(Encoding::BINARY)
  end

  it "moves 1 MiB each way unchanged after routing, and passes the half-close on" do
    payload = SecureRandom.random_bytes(1024 * 1024)
    socket = connect
    socket.write("PING a\n")
    # The backend's greeting: routed, and the buffer replayed is exactly
    # "PING a\n" (payload bytes sent before that would be in the buffer,
    # replayed rather than spliced).
    greeting = read_exactly(socket, 2)
    writer = Thread.new do
      socket.write(payload)
      socket.close_write
    end
    back = greeting + read_all(socket, 30)
    writer.join(10)
    expect(back.bytesize).to eq(2 + 7 + payload.bytesize)
    expect(Digest::SHA256.hexdigest(back)).to eq(Digest::SHA256.hexdigest("a\nPING a\n#{payload}"))
    expect(machine.wait_idle(5)).to be(true)
    stats = machine.stats
    expect(stats[:bytes_to_remote]).to eq(7 + payload.bytesize)
    expect(stats[:bytes_to_client]).to eq(back.bytesize)
    # Everything after the replayed buffer moved by splice(2), unless zero
    # copy is switched off (then it was copied).
    spliced = ENV["THREADED_PROXY_ZERO_COPY"] == "0" ? 0 : (2 * payload.bytesize) + 9
    expect(stats[:bytes_spliced]).to eq(spliced)
  ensure
    socket&.close
  end

  context "with a small max_route_bytes" do
    let(:options) { { max_route_bytes: 1024 } }

    it "closes a client that sends more than max_route_bytes undecided" do
      socket = connect
      socket.write("x" * 600)
      expect(Timeout.timeout(5) { seen.pop }.bytesize).to eq(600)
      socket.write("y" * 600)
      # Closed with the client's bytes unread: EOF or a reset, never data.
      expect(begin
        read_all(socket)
      rescue Errno::ECONNRESET
        ""
      end).to eq("")
      expect(log.wait_for(/more than max_route_bytes \(1024\)/)).to include("closed")
      expect(seen.size).to eq(0)
      expect(machine.stats[:route_overflows]).to eq(1)
    ensure
      socket&.close
    end
  end

  it "retries a refused connect until the remote listens" do
    port = FreePort.take
    socket = connect
    socket.write("NOWHERE #{port}\n")
    log.wait_for(/127.0.0.1:#{port} refused the connection; trying 9 more times/)
    late = TCPServer.new("127.0.0.1", port)
    served = Thread.new do
      conn = late.accept
      conn.write("late\n")
      IO.copy_stream(conn, conn)
      conn.close
    end
    socket.close_write
    expect(read_all(socket)).to eq("late\nNOWHERE #{port}\n")
    expect(served.join(5)).to be_truthy
    expect(errors).to be_empty
    expect(machine.stats[:connect_retries]).to be >= 1
  ensure
    socket&.close
    late&.close
  end

  it "calls proxy_connect_error with the remote when every try is refused" do
    port = FreePort.take
    started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    expect(exchange("NOWHERE #{port}\n")).to eq("")
    expect(Timeout.timeout(5) { errors.pop }).to eq([:connect, "127.0.0.1:#{port}"])
    # 10 tries, 0.1 s apart.
    expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - started).to be_between(0.85, 3)
    expect(machine.stats[:connect_errors]).to eq(1)
  end

  it "cuts a joined connection after inactivity_timeout and calls proxy_inactivity_error" do
    socket = connect
    socket.write("QUIET\n")
    expect(read_all(socket)).to eq("")
    expect(Timeout.timeout(5) { errors.pop }).to eq([:inactivity, @silent.address])
    expect(machine.stats[:inactivity_cuts]).to eq(1)
  ensure
    socket&.close
  end

  it "takes a client that leaves, before or after routing, as no error" do
    early = connect
    early.write("undecided")
    Timeout.timeout(5) { seen.pop }
    early.close
    routed = connect
    routed.write("PING a\n")
    expect(read_exactly(routed, 2)).to eq("a\n")
    routed.close
    expect(machine.wait_idle(5)).to be(true)
    expect(errors).to be_empty
    expect(log.all).to be_empty
    expect(machine.stats).to include(open: 0, connect_errors: 0, inactivity_cuts: 0, route_failures: 0)
  end

  context "when the block misbehaves" do
    let(:options) { { threads: 1 } }

    it "closes only that connection when it raises, exits or answers garbage, and logs why" do
      expect(exchange("RAISE\n")).to eq("")
      expect(log.wait_for(/routing block raised RuntimeError/)).to include("router bug", "connection closed")
      expect(exchange("EXIT\n")).to eq("")
      expect(log.wait_for(/routing block raised SystemExit/)).to include("exit")
      expect(exchange("GARBAGE\n")).to eq("")
      expect(log.wait_for(/answered 42/)).to include("connection closed")
      expect(exchange("BADREMOTE\n")).to eq("")
      expect(log.wait_for(/answered .*no-port-here/)).to include("host:port")
      expect(exchange("PING a\n")).to eq("a\nPING a\n")
      expect(machine.stats).to include(route_failures: 4, threads_alive: 1)
    end

    it "closes a connection whose block hangs past route_timeout, and the next one is still served" do
      started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      expect(exchange("HANG\n")).to eq("")
      expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - started).to be < 2
      expect(log.wait_for(/routing block failed/)).to include("did not answer within")
      # The one thread is stuck in `sleep 30`: the watcher gives its slot to
      # a new thread, which serves this connection.
      expect(exchange("PING b\n")).to eq("b\nPING b\n")
      expect(log.wait_for(/past route_timeout/)).to include("thread replaced")
      expect(machine.stats[:threads_replaced]).to eq(1)
    end
  end

  it "serves 500 concurrent connections", timeout: 120 do
    sockets = Array.new(500) do |i|
      socket = connect
      socket.write("PING #{i.even? ? "a" : "b"} #{i}\n")
      socket
    end
    sockets.each_with_index do |socket, i|
      name = i.even? ? "a" : "b"
      expected = "#{name}\nPING #{name} #{i}\n"
      expect(read_exactly(socket, expected.bytesize, 30)).to eq(expected)
    end
    expect(machine.stats[:open]).to eq(500)
    sockets.each(&:close)
    expect(machine.wait_idle(20)).to be(true)
    expect(machine.stats).to include(routed: 500, open: 0)
  end

  it "stops accepting on stop and lets open connections finish within the timeout" do
    socket = connect
    socket.write("PING a\n")
    expect(read_exactly(socket, 9)).to eq("a\nPING a\n")
    port = machine.port
    stopper = Thread.new { machine.stop(10) }
    # Refused once the listener is closed (stop_accepting comes first).
    expect(ConnectRetry.until_refused(port, timeout: 5)).to be(true), "port #{port} still accepted 5 s after #stop"
    socket.write("more")
    expect(read_exactly(socket, 4)).to eq("more")
    socket.close_write
    expect(read_all(socket)).to eq("")
    expect(stopper.value).to be(true)
  ensure
    socket&.close
  end

  it "counts what it did in #stats and in the Prometheus exposition" do
    expect(exchange("PING a\n")).to eq("a\nPING a\n")
    expect(exchange("BYE\n")).to eq("GOODBYE\n")
    socket = connect
    socket.write("PING b\n")
    expect(read_exactly(socket, 9)).to eq("b\nPING b\n")
    # Splice counts a piece once its syscall returns, which can be after
    # the client has read it: wait for the last 9 bytes to be counted
    # (9 + 8 + 9 reached clients), so the two readings below agree.
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 5
    sleep 0.01 until machine.stats[:bytes_to_client] == 26 || Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline
    stats = machine.stats
    expect(stats).to include(accepted: 3, routed: 2, closed_by_block: 1, open: 1, route_calls: 3, bytes_to_client: 26)
    expect(stats[:route_seconds]).to be > 0
    text = ThreadedProxy::Metrics.text
    pid = Process.pid
    expect(text).to include("# TYPE threaded_proxy_machine_open gauge",
                            %(threaded_proxy_machine_open{pid="#{pid}"} 1),
                            %(threaded_proxy_machine_routed_total{pid="#{pid}"} 2),
                            %(threaded_proxy_machine_closed_by_block_total{pid="#{pid}"} 1),
                            %(threaded_proxy_machine_bytes_to_client_total{pid="#{pid}"} #{stats[:bytes_to_client]}))
    expect(text).to match(/^threaded_proxy_machine_route_seconds_total\{pid="#{pid}"\} \d/)
    socket.close
    machine.stop(5)
    expect(ThreadedProxy::Metrics.text).not_to include("threaded_proxy_machine_")
  ensure
    socket&.close
  end

  it "refuses bad options before listening" do
    expect { described_class.new(port: 0) }.to raise_error(ArgumentError, /block/)
    expect { described_class.new(port: 70_000) { nil } }.to raise_error(ArgumentError, /port/)
    expect { described_class.new(port: 0, max_route_bytes: 0) { nil } }.to raise_error(ArgumentError)
    expect { described_class.new(port: 0, route_timeout: -1) { nil } }.to raise_error(ArgumentError)
  end
end
