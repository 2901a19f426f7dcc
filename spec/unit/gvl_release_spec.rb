# frozen_string_literal: true

require "threaded_proxy"
require "tmpdir"

# Every call into Rust that releases the GVL must run even when an
# interrupt is pending at that moment (a signal to trap, the timer that
# shares the GVL between threads): rb_thread_call_without_gvl2 refuses to
# run the function then. The extension runs the interrupts and tries again
# instead of failing the call.
RSpec.describe "Releasing the GVL" do
  around do |example|
    Dir.mktmpdir("threaded-proxy-gvl") do |dir|
      saved = ThreadedProxy.configuration.async_queue_path
      ThreadedProxy.configuration.async_queue_path = File.join(dir, "queue.sqlite3")
      example.run
    ensure
      ThreadedProxy.configuration.async_queue_path = saved
    end
  end

  it "runs the call when a signal is pending, and the trap handler too" do
    ThreadedProxy.async_start
    trapped = 0
    previous = trap("USR2") { trapped += 1 }
    parent = Process.pid
    # A second process keeps signals coming while this one calls into Rust
    # for two seconds (thousands of calls, hundreds of them with a signal
    # pending as they start).
    sender = fork do
      loop do
        Process.kill("USR2", parent)
        sleep 0.0002
      end
    rescue Errno::ESRCH
      exit!(0)
    end
    calls = 0
    failures = Hash.new(0)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 2
    while Process.clock_gettime(Process::CLOCK_MONOTONIC) < deadline
      calls += 1
      begin
        ThreadedProxy.async_stats
      rescue Interrupt, StandardError => e
        failures[e.message] += 1
      end
    end
    expect(failures).to eq({})
    expect(calls).to be > 1_000
    expect(trapped).to be > 100
  ensure
    if sender
      Process.kill("KILL", sender)
      Process.wait(sender)
    end
    trap("USR2", previous || "DEFAULT")
  end

  it "still lets Thread#raise interrupt a wait without the GVL" do
    waiter = Thread.new do
      ThreadedProxy::Native.next_job(30) # the callback queue: nothing comes
      :not_interrupted
    rescue RuntimeError => e
      e.message
    end
    sleep 0.01 until waiter.status == "sleep" # blocked without the GVL
    started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    waiter.raise(RuntimeError, "stop waiting")
    expect(waiter.value).to eq("stop waiting")
    expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - started).to be < 5
  end
end
