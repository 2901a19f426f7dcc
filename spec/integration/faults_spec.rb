# frozen_string_literal: true

require "json"
require "socket"
require "spec_helper"

# Callbacks that fail in every way Ruby allows (issue 15 items 1, 2, 3, 8),
# under a real Puma (rails_test_app, FaultsController) proxying to a real
# origin: each fault stays inside its own exchange, the same Puma process
# keeps answering, and on_error and the log get the real exception.
module FaultsSpec
  CALLBACK_THREADS = 2
  # Short, so a callback left unanswered (the old behaviour) fails the
  # "answered quickly" expectations well inside the example's time.
  CALLBACK_TIMEOUT = 5
  QUICK = 3.0
end

RSpec.describe "callback faults stay inside their exchange" do
  before(:all) do
    @origin = OriginServer.new.start
    @puma = PumaServer.new(env: { "ORIGIN_URL" => @origin.url,
                                  "THREADED_PROXY_CALLBACK_THREADS" => FaultsSpec::CALLBACK_THREADS,
                                  "THREADED_PROXY_CALLBACK_TIMEOUT" => FaultsSpec::CALLBACK_TIMEOUT },
                           threads: "4:4").start
    @pid = stats_of(@puma)["pid"]
  end

  after(:all) do
    @puma&.stop
    @origin&.stop
  end

  after do
    expect(@origin.errors).to be_empty
    expect(@puma.log).not_to match(/panicked|\[BUG\]/)
  end

  let(:puma) { @puma }

  def monotonic
    Process.clock_gettime(Process::CLOCK_MONOTONIC)
  end

  def get(path, server: puma, read_timeout: 15)
    RawHTTP.request("#{server.url}#{path}", read_timeout: read_timeout)
  end

  # [response, seconds it took]
  def timed_get(path)
    started = monotonic
    response = get(path)
    [response, monotonic - started]
  end

  def stats_of(server)
    JSON.parse(get("/stats", server: server).body)
  end

  def closed_port
    server = TCPServer.new("127.0.0.1", 0)
    server.addr[1]
  ensure
    server&.close
  end

  # The exact bytes Puma wrote for one request, up to its close.
  def wire(path)
    socket = TCPSocket.new("127.0.0.1", puma.port)
    socket.write("GET #{path} HTTP/1.1\r\nHost: 127.0.0.1:#{puma.port}\r\n\r\n")
    data = +"".b
    deadline = monotonic + 10
    loop do
      remaining = deadline - monotonic
      raise "no EOF within 10 s; got #{data.inspect}" unless remaining.positive? && socket.wait_readable(remaining)

      data << socket.readpartial(65_536)
    end
  rescue EOFError, Errno::ECONNRESET
    data
  ensure
    socket&.close
  end

  # The same Puma process still proxies, callbacks included, at once.
  def expect_still_serving
    expect(puma.running?).to be(true), "Puma exited; log:\n#{puma.log[-3000..]}"
    response, took = timed_get("/headers_proxy/echo")
    expect(response.status).to eq(200)
    expect(response["x-proxied-by"]).to eq("threaded-proxy")
    expect(took).to be < FaultsSpec::QUICK
    expect(stats_of(puma)["pid"]).to eq(@pid)
    expect(puma.running?).to be(true)
  end

  # [path of the faulty action, the origin URL it proxies to]
  def fault_target(callback, fault)
    return ["/faults/#{callback}/#{fault}", "#{@origin.url}/echo"] unless callback == "on_error"

    origin = "http://127.0.0.1:#{closed_port}" # refused: on_error runs
    ["/faults/#{callback}/#{fault}?origin=#{origin}", "#{origin}/echo"]
  end

  def fault_path(callback, fault)
    fault_target(callback, fault).first
  end

  describe "exit and exceptions that are not StandardError (item 1)" do
    {
      "exit" => "SystemExit: exit", "abort" => "SystemExit: faults: abort from a callback",
      "interrupt" => "Interrupt: Interrupt", "stack" => "SystemStackError: stack level too deep"
    }.each do |fault, exception|
      %w[on_headers on_response on_error on_complete].each do |callback|
        it "#{fault} in #{callback}: that exchange only, Puma keeps serving, the log names #{callback}" do
          path, url = fault_target(callback, fault)
          response, took = timed_get(path)
          # on_complete runs after the last byte went out: the answer stands.
          expect(response.status).to eq(callback == "on_complete" ? 200 : 500)
          expect(response.complete).to be(true)
          expect(took).to be < FaultsSpec::QUICK
          line = "callback raised in #{callback} for GET #{url}: #{exception}"
          expect(puma.wait_for_log(line)).to be(true), "no #{line.inspect} in the log:\n#{puma.log[-3000..]}"
          expect_still_serving
        end
      end
    end
  end

  # A real signal is not a callback's own exception: it reaches Ruby's main
  # thread, and Puma stops as it should.
  it "a real SIGTERM sent from a callback still stops Puma" do
    server = PumaServer.new(env: { "ORIGIN_URL" => @origin.url }, threads: "2:2").start
    begin
      socket = TCPSocket.new("127.0.0.1", server.port)
      socket.write("GET /faults/on_headers/sigterm HTTP/1.1\r\nHost: x\r\n\r\n")
      deadline = monotonic + 20
      sleep 0.05 while server.running? && monotonic < deadline
      expect(server.running?).to be(false)
      expect(server.log).to match(/Gracefully stopping|Goodbye/)
    ensure
      socket&.close
      server.stop
    end
  end

  describe "a callback that ends its own thread (item 2)" do
    it "Thread.current.kill more times than there are callback threads: each 500 at once, threads replaced" do
      before = stats_of(puma)
      count = FaultsSpec::CALLBACK_THREADS * 2 + 1
      count.times do
        response, took = timed_get("/faults/on_headers/kill")
        expect(response.status).to eq(500)
        expect(response["x-threaded-proxy-error"]).to eq("callback")
        expect(took).to be < FaultsSpec::QUICK
      end
      %w[on_response on_error on_complete].each do |callback|
        response, took = timed_get(fault_path(callback, "kill"))
        expect(response.status).to eq(callback == "on_complete" ? 200 : 500)
        expect(took).to be < FaultsSpec::QUICK
      end
      expect(puma.wait_for_log("on_complete ended its callback thread")).to be(true)
      expect_still_serving
      after = stats_of(puma)
      expect(after["callback_threads_alive"]).to eq(FaultsSpec::CALLBACK_THREADS)
      expect(after["callback_threads_replaced"] - before["callback_threads_replaced"]).to eq(count + 3)
      expect(after["callback_jobs_queued"]).to eq(0)
      expect(puma.log).to include("on_headers ended its callback thread (Thread#kill or similar) for GET")
    end

    it "SystemStackError more times than there are callback threads: each 500 at once" do
      (FaultsSpec::CALLBACK_THREADS * 2 + 1).times do
        response, took = timed_get("/faults/on_headers/stack")
        expect(response.status).to eq(500)
        expect(took).to be < FaultsSpec::QUICK
      end
      expect_still_serving
      expect(stats_of(puma)["callback_threads_alive"]).to eq(FaultsSpec::CALLBACK_THREADS)
    end
  end

  # Standards: a callback that hangs affects its own exchange only.
  describe "a callback that hangs" do
    it "more hung callbacks than callback threads: each exchange fails at callback_timeout, the rest still run" do
      before = stats_of(puma)
      reported = puma.log.scan("past callback_timeout").size
      hung = FaultsSpec::CALLBACK_THREADS + 1
      started = monotonic
      answers = Array.new(hung) { Thread.new { get("/faults/on_headers/hang", read_timeout: 20) } }.map(&:value)
      expect(answers.map(&:status)).to all(eq(500))
      expect(monotonic - started).to be < FaultsSpec::CALLBACK_TIMEOUT + FaultsSpec::QUICK
      expect(puma.wait_for_log("on_headers did not answer within #{FaultsSpec::CALLBACK_TIMEOUT}s")).to be(true)
      # Each hung thread gave its slot away (one log line each); the job
      # queued behind them was dropped unrun once its exchange had failed.
      deadline = monotonic + 10
      sleep 0.05 while puma.log.scan("past callback_timeout").size < reported + FaultsSpec::CALLBACK_THREADS &&
                       monotonic < deadline
      expect(puma.log.scan("past callback_timeout").size).to eq(reported + FaultsSpec::CALLBACK_THREADS)
      expect_still_serving
      after = stats_of(puma)
      expect(after["callback_threads_alive"]).to eq(FaultsSpec::CALLBACK_THREADS)
      expect(after["callback_threads_stuck"] - before["callback_threads_stuck"]).to eq(FaultsSpec::CALLBACK_THREADS)
      expect(after["callback_jobs_expired"] - before["callback_jobs_expired"]).to eq(hung - FaultsSpec::CALLBACK_THREADS)
      expect(puma.log[/past callback_timeout.*?\n(?:  .*\n)+/]).to include("app/controllers/faults_controller.rb")
    end
  end

  describe "on_error gets what the callback raised (item 3)" do
    def report(fault, **query)
      response = get("/faults/report?#{URI.encode_www_form(query.merge(fault: fault))}")
      expect(response.status).to eq(599), "got #{response.status}: #{response.body}"
      JSON.parse(response.body)
    end

    it "a user's exception: a CallbackError whose cause is that very exception" do
      error = report("raise")
      expect(error).to include(
        "class" => "ThreadedProxy::CallbackError", "threaded_proxy_error" => true, "kind" => "callback",
        "callback" => "on_headers", "url" => "#{@origin.url}/echo",
        "message" => "on_headers raised FaultsController::Boom: boom from on_headers",
        "message_encoding" => "UTF-8", "url_encoding" => "UTF-8",
        "cause_class" => "FaultsController::Boom", "cause_message" => "boom from on_headers",
        "cause_cause_class" => "ArgumentError"
      )
      expect(error["cause_backtrace"].first).to include("app/controllers/faults_controller.rb:")
      # The log line carries the backtrace and the cause.
      expect(puma.wait_for_log("callback raised in on_headers for GET #{@origin.url}/echo: " \
                               "FaultsController::Boom: boom from on_headers")).to be(true)
      entry = puma.log[/callback raised in on_headers[^\n]*FaultsController::Boom.*?caused by ArgumentError: the inner reason/m]
      expect(entry).not_to be_nil
      expect(entry).to match(%r{^\s+\S*app/controllers/faults_controller\.rb:\d+:in `raise_with_cause'}m)
    end

    it "exit: a CallbackError whose cause is the SystemExit" do
      error = report("exit")
      expect(error).to include("class" => "ThreadedProxy::CallbackError", "cause_class" => "SystemExit",
                               "message" => "on_headers raised SystemExit: exit")
      expect_still_serving
    end

    it "a thread ended by its callback: a CallbackError naming the callback" do
      error = report("kill")
      expect(error).to include("class" => "ThreadedProxy::CallbackError", "cause_class" => nil,
                               "message" => "on_headers ended its callback thread (Thread#kill or similar)",
                               "message_encoding" => "UTF-8")
    end

    it "the gem's own BodyTooLargeError arrives as itself" do
      error = report("too_large", path: "/bytes?n=5000")
      expect(error).to include("class" => "ThreadedProxy::BodyTooLargeError", "url" => "#{@origin.url}/bytes?n=5000",
                               "message_encoding" => "UTF-8", "url_encoding" => "UTF-8", "cause_class" => nil)
    end

    {
      "refused" => ["ThreadedProxy::ConnectError", ->(spec) { { origin: "http://127.0.0.1:#{spec.closed_port}" } }],
      "garbage" => ["ThreadedProxy::UpstreamError", ->(_) { { path: "/garbage" } }],
      "a timeout" => ["ThreadedProxy::TimeoutError", ->(_) { { path: "/hang", header_timeout: "0.3" } }]
    }.each do |failure, (error_class, query)|
      it "the gem's own #{error_class} (#{failure}) has UTF-8 strings" do
        error = report("origin", **query.call(self))
        expect(error).to include("class" => error_class, "message_encoding" => "UTF-8", "url_encoding" => "UTF-8")
        expect(error["message"]).not_to be_empty
      end
    end
  end

  describe "on_headers setting a status that is not final (item 8)" do
    [100, 101, 103, 199, 600, 999].each do |status|
      it "status = #{status}: one final 500 on the wire, no interim answer" do
        data = wire("/faults/status?status=#{status}")
        expect(data).to start_with("HTTP/1.1 500 ")
        expect(data.scan(%r{HTTP/1\.[01] \d{3}}).size).to eq(1), data
        expect(data).not_to match(%r{HTTP/1\.1 1\d\d})
        expect(puma.wait_for_log("callback raised in on_headers for GET #{@origin.url}/echo: " \
                                 "ArgumentError: status must be a final HTTP status (200..599), " \
                                 "got #{status}")).to be(true)
      end
    end

    it "status = 201 goes out as the final status" do
      data = wire("/faults/status?status=201")
      expect(data).to start_with("HTTP/1.1 201 ")
    end
  end
end
