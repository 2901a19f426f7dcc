# frozen_string_literal: false

# The machine beside HAProxy and direct (issue 18 "Numbers"), one run:
#   bundle exec ruby bench/machine.rb
# A sink process counts what it gets; the client pushes 1 GiB through each
# target, then runs short routed exchanges at concurrency 50 for 5 s, then
# holds 1,000 idle routed connections. Proxy CPU is read from /proc (utime +
# stime of the proxy's process); RSS from VmRSS. HAProxy (Debian's, `mode
# tcp`, routing on req.payload after tcp-request inspect-delay) is skipped
# when not installed. Not yet a `rake bench` scenario: the client and the
# sink are Ruby, so treat the numbers as ratios on one machine.
$stdout.sync = true
$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
require "socket"
require "tmpdir"
def cpu(pid) = File.read("/proc/#{pid}/stat").split(")").last.split.values_at(11, 12).map(&:to_i).sum / 100.0
def rss(pid) = Integer(File.read("/proc/#{pid}/status")[/VmRSS:\s+(\d+)/, 1])
def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
sink_r, sink_w = IO.pipe
sink = fork do
  sink_r.close
  s = TCPServer.new("127.0.0.1", 0); sink_w.puts s.addr[1]; sink_w.close
  loop { c = s.accept; Thread.new(c) { |cc| n = IO.copy_stream(cc, File::NULL); cc.write("OK #{n}\n") rescue nil; cc.close } }
end
sink_w.close
sink_port = Integer(sink_r.gets)
m_r, m_w = IO.pipe
mach = fork do
  m_r.close
  require "threaded_proxy"
  m = ThreadedProxy::Machine.new(port: 0, threads: 2) { |d| d.start_with?("GO") ? { remote: "127.0.0.1:#{sink_port}" } : { noop: true } }.start
  m_w.puts m.port; m_w.close
  trap("USR1") do
    Thread.new do
      s = m.stats
      warn format("machine: routing block %.1f us per call (%d calls)", s[:route_seconds] / s[:route_calls] * 1e6, s[:route_calls])
    end
  end
  sleep
end
m_w.close
mport = Integer(m_r.gets)
hport = TCPServer.open("127.0.0.1", 0) { |s| s.addr[1] }
CFG = File.join(Dir.tmpdir, "threaded-proxy-bench-haproxy.cfg")
File.write(CFG, <<~CONF)
  global
    maxconn 9000
    nbthread 2
  defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
  frontend fe
    bind 127.0.0.1:#{hport}
    tcp-request inspect-delay 5s
    tcp-request content accept if { req.payload(0,2) -m str GO }
    use_backend sink if { req.payload(0,2) -m str GO }
  backend sink
    server s1 127.0.0.1:#{sink_port}
CONF
haproxy = ENV.fetch("PATH", "").split(":").map { |d| File.join(d, "haproxy") }.find { |f| File.executable?(f) }
haproxy ||= ["/usr/sbin/haproxy"].find { |f| File.executable?(f) }
hap = haproxy && Process.spawn(haproxy, "-db", "-f", CFG, out: File::NULL, err: File::NULL)
# Ready when its port takes a connection (5 s at most).
if hap
  deadline = now + 5
  begin
    TCPSocket.new("127.0.0.1", hport).close
  rescue Errno::ECONNREFUSED
    raise "haproxy did not start (haproxy -c -f #{CFG})" if now > deadline

    sleep 0.05
    retry
  end
end
chunk = "x" * (1 << 20)
def push(port, chunk)
  s = TCPSocket.new("127.0.0.1", port); s.write("GO")
  1024.times { s.write(chunk) }; s.close_write; r = s.read; s.close; r
end
at_exit { [sink, mach, hap].compact.each { |p| Process.kill("KILL", p) rescue nil } }
targets = [["direct", sink_port, nil], (["haproxy", hport, hap] if hap), ["machine", mport, mach]].compact
targets.each do |name, port, pid|
  c0 = pid ? cpu(pid) : 0; t0 = now
  r = push(port, chunk)
  t = now - t0; c = pid ? cpu(pid) - c0 : 0
  puts format("%-8s 1 GiB in %.2fs = %5.0f MB/s, proxy CPU %.2fs/GiB (%s)", name, t, 1024 / t, c, r.strip)
end
targets.each do |name, port, pid|
  n = 0; lock = Mutex.new; stop = now + 5; c0 = pid ? cpu(pid) : 0
  50.times.map { Thread.new { until now > stop; s = TCPSocket.new("127.0.0.1", port); s.write("GO"); s.close_write; s.read; s.close; lock.synchronize { n += 1 }; end } }.each(&:join)
  puts format("%-8s short exchanges, c=50, 5 s: %6d (%5.0f/s), proxy CPU %.2fs = %.0f us/exchange", name, n, n / 5.0, (pid ? cpu(pid) - c0 : 0), (pid ? cpu(pid) - c0 : 0) / n * 1e6)
end
targets.drop(1).each do |name, port, pid|
  before = rss(pid)
  idle = Array.new(1000) { s = TCPSocket.new("127.0.0.1", port); s.write("GO"); s }
  sleep 2
  after = rss(pid)
  puts format("%-8s RSS %d -> %d KiB with 1000 idle routed connections: %.1f KiB each", name, before, after, (after - before) / 1000.0)
  idle.each(&:close)
end
Process.kill("USR1", mach)
sleep 0.3 # the machine prints its block's cost on stderr
