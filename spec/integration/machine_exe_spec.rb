# frozen_string_literal: true

require "fileutils"
require "rbconfig"
require "socket"
require "tmpdir"

# exe/threaded-proxy-machine as a process of its own, running a
# ProxyMachine configuration file, against backend processes.
RSpec.describe "exe/threaded-proxy-machine" do
  EXE = File.expand_path("../../exe/threaded-proxy-machine", __dir__)

  before(:all) do
    @backend = MachineBackend.new("a").start
    @dir = Dir.mktmpdir("machine-exe")
    @config = File.join(@dir, "config.rb")
    File.write(@config, <<~RUBY)
      LOGGER = Logger.new($stdout)
      proxy do |data|
        if data =~ /\\APING/
          { remote: "#{@backend.address}", reply: "pid=\#{Process.pid}\\n" }
        elsif data =~ /\\ANOWHERE (\\d+)/
          { remote: "127.0.0.1:\#{$1}" }
        else
          { noop: true }
        end
      end
      proxy_connect_error { |remote| LOGGER.error("connect error: \#{remote}") }
      proxy_inactivity_error { |remote| LOGGER.error("inactive: \#{remote}") }
    RUBY
  end

  after(:all) do
    @backend&.stop
    FileUtils.rm_rf(@dir) if @dir
  end

  after do
    if @pid
      begin
        Process.kill("KILL", @pid)
        Process.wait(@pid)
      rescue Errno::ESRCH, Errno::ECHILD
        nil
      end
    end
    @out&.close
  end

  # Starts the executable; returns once it logged `ready` (10 s at most).
  def start(*args, ready: /listening on/)
    @port = FreePort.take
    reader, writer = IO.pipe
    @pid = Process.spawn(RbConfig.ruby, EXE, "-c", @config, "-h", "127.0.0.1", "-p", @port.to_s, *args,
                         out: writer, err: writer, in: File::NULL)
    writer.close
    @out = reader
    @lines = []
    wait_line(ready)
  end

  # The next output line matching `pattern`, within `timeout` seconds.
  def wait_line(pattern, timeout = 10)
    Timeout.timeout(timeout) do
      loop do
        line = @out.gets or raise "the machine exited; it wrote:\n#{@lines.join}"
        @lines << line
        return line if line.match?(pattern)
      end
    end
  end

  def exited(timeout = 20)
    Timeout.timeout(timeout) { Process.wait2(@pid) }.last.tap { @pid = nil }
  end

  def connect
    TCPSocket.new("127.0.0.1", @port)
  end

  it "runs a ProxyMachine config file unchanged, with its LOGGER and error callbacks" do
    start
    socket = connect
    socket.write("PING x\n")
    socket.close_write
    expect(Timeout.timeout(10) { socket.read }).to eq("pid=#{@pid}\na\nPING x\n")
    socket.close
    dead = FreePort.take
    socket = connect
    socket.write("NOWHERE #{dead}\n")
    expect(Timeout.timeout(10) { socket.read }).to eq("")
    expect(wait_line(/connect error:/)).to include("127.0.0.1:#{dead}")
  ensure
    socket&.close
  end

  it "on QUIT stops accepting and waits for every open connection" do
    start
    socket = connect
    socket.write("PING x\n")
    expect(Timeout.timeout(10) { socket.readpartial(100) }).to start_with("pid=")
    Process.kill("QUIT", @pid)
    wait_line(/Received QUIT signal/)
    wait_line(/Waiting for 1 connections/)
    expect { TCPSocket.new("127.0.0.1", @port).close }.to raise_error(Errno::ECONNREFUSED)
    # Still joined: bytes keep flowing until the client is done.
    socket.write("still here")
    got = +""
    Timeout.timeout(10) { got << socket.readpartial(100) until got.include?("still here") }
    socket.close_write
    Timeout.timeout(10) { socket.read }
    wait_line(/All connections finished/)
    expect(exited.exitstatus).to eq(0)
  ensure
    socket&.close
  end

  it "on TERM waits at most 10 s, then closes the connections left", timeout: 60 do
    start
    socket = connect
    socket.write("PING x\n")
    expect(Timeout.timeout(10) { socket.readpartial(100) }).to start_with("pid=")
    started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    Process.kill("TERM", @pid)
    wait_line(/Received TERM signal/)
    # The client never finishes: the machine closes it after 10 s.
    Timeout.timeout(20) { socket.read }
    expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - started).to be_between(9.5, 15)
    wait_line(/Closed the connections left/)
    expect(exited.exitstatus).to eq(0)
  ensure
    socket&.close
  end

  it "with -w 2 serves from two processes on one port, and QUIT stops both", timeout: 60 do
    start("-w", "2", ready: /master \d+: 2 workers/)
    (2 - @lines.grep(/listening on/).size).times { wait_line(/listening on/) }
    pids = Array.new(200) do
      socket = connect
      socket.write("PING x\n")
      socket.close_write
      Timeout.timeout(10) { socket.read }[/\Apid=(\d+)/, 1]
    ensure
      socket&.close
    end
    expect(pids.uniq.size).to eq(2)
    expect(pids.uniq).not_to include(@pid.to_s)
    Process.kill("QUIT", @pid)
    expect(exited.exitstatus).to eq(0)
    pids.uniq.each { |pid| expect { Process.kill(0, Integer(pid)) }.to raise_error(Errno::ESRCH) }
  end

  it "serves the Prometheus exposition on --metrics" do
    metrics_port = FreePort.take
    start("--metrics", "127.0.0.1:#{metrics_port}")
    socket = connect
    socket.write("PING x\n")
    socket.close_write
    Timeout.timeout(10) { socket.read }
    socket.close
    scrape = TCPSocket.new("127.0.0.1", metrics_port)
    scrape.write("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    response = Timeout.timeout(10) { scrape.read }
    expect(response).to start_with("HTTP/1.1 200 OK")
    expect(response).to include(%(threaded_proxy_machine_routed_total{pid="#{@pid}"} 1))
  ensure
    scrape&.close
  end

  it "exits 1 with a message when the config is missing" do
    out = IO.popen([RbConfig.ruby, EXE, "-c", File.join(@dir, "nope.rb"), "-p", "0"], err: %i[child out], &:read)
    expect($?.exitstatus).to eq(1)
    expect(out).to include("does not exist")
  end
end
