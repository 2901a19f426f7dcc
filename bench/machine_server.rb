# frozen_string_literal: true

# The machine row of scenario 6 (bench/machine_scenario.rb), in its own
# process: ThreadedProxy::Machine on BENCH_MACHINE_LISTEN, a Ruby block
# routing each connection by its first bytes to BENCH_MACHINE_SINK. USR1
# writes Machine#stats as JSON to BENCH_MACHINE_STATS (the scenario reads
# the block's cost per call from it).
$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
require "json"
require "threaded_proxy"

$stdout.sync = true
sink = { remote: ENV.fetch("BENCH_MACHINE_SINK") }
machine = ThreadedProxy::Machine.new(port: Integer(ENV.fetch("BENCH_MACHINE_LISTEN")), threads: 2) do |data|
  if data.start_with?("GO") then sink
  elsif data.bytesize < 2 then { noop: true }
  else { close: true }
  end
end.start
stats_path = ENV.fetch("BENCH_MACHINE_STATS")
# The trap only wakes this thread: Machine#stats takes a mutex, which a
# trap context may not.
wake = Queue.new
Thread.new do
  loop do
    wake.pop
    File.write("#{stats_path}.tmp", JSON.generate(machine.stats))
    File.rename("#{stats_path}.tmp", stats_path)
  end
end
trap("USR1") { wake << true }
trap("TERM") { exit }
puts "machine listening on #{machine.port}"
sleep
