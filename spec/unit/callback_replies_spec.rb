# frozen_string_literal: true

require "threaded_proxy"

# The callback protocol between the dispatcher and Rust's jobs: kinds are
# Symbols listed once (Rust's callbacks::KINDS, read as
# Native::Job::CALLBACKS) and every answer is a named reply (issue 16 item 2).
RSpec.describe "callback jobs and their named replies" do
  # Plays Native::Job (which Ruby cannot build): the same readers, and each
  # reply recorded in order.
  class RecordingJob
    attr_reader :exchange_id, :kind, :status, :reason, :headers, :error, :summary, :replies

    def initialize(kind, status: 200, headers: [], error: nil, summary: nil)
      @exchange_id = 1
      @kind = kind
      @status = status
      @reason = nil
      @headers = headers
      @error = error
      @summary = summary
      @replies = []
    end

    def answered? = !@replies.empty?
    def pass = (@replies << [:pass]) && true
    def amend(status, reason, headers) = (@replies << [:amend, status, reason, headers]) && true
    def render(status, headers, body) = (@replies << [:render, status, headers, body]) && true
    def render_file(status, headers, fd) = (@replies << [:render_file, status, headers, fd]) && true
    def fail(message) = (@replies << [:fail, message]) && true
  end

  let(:dispatcher) { ThreadedProxy::Dispatcher.new }
  let(:callbacks) { ThreadedProxy::Callbacks.new }

  def run(job)
    record = ThreadedProxy::Dispatcher::Record.new(callbacks: callbacks, method: "GET", url: "http://o.test/")
    dispatcher.instance_variable_get(:@records)[job.exchange_id] = record
    allow(dispatcher).to receive(:log_line) # a failing callback logs; not under test here
    dispatcher.send(:handle, job)
    job.replies
  end

  it "names each job kind once, on the Rust side, with the callback it runs" do
    expect(ThreadedProxy::Native::Job::CALLBACKS)
      .to eq(headers: "on_headers", response: "on_response", error: "on_error", finished: "on_complete")
    expect(ThreadedProxy::Native::Job::CALLBACKS).to be_frozen
    ThreadedProxy::Native::Job::CALLBACKS.each_value do |callback|
      expect(ThreadedProxy::Dispatcher.private_method_defined?(callback)).to be(true), callback
    end
  end

  it "gives the job named replies and no positional continue" do
    expect(ThreadedProxy::Native::Job.public_instance_methods(false))
      .to include(:pass, :amend, :render, :render_file, :fail)
    expect(ThreadedProxy::Native::Job.public_instance_methods(false)).not_to include(:continue)
  end

  it "amends the head with what on_headers changed" do
    callbacks.on_headers do |response|
      response["x-added"] = "1"
      response.status = 203
    end
    replies = run(RecordingJob.new(:headers, headers: [%w[content-type text/plain]]))
    expect(replies).to eq([[:amend, 203, nil, [%w[content-type text/plain], %w[x-added 1]]]])
  end

  it "amends with the head unchanged when on_response neither changes nor renders" do
    callbacks.on_response { |_response, _responder| nil }
    expect(run(RecordingJob.new(:response, headers: [%w[a 1]]))).to eq([[:amend, 200, nil, [%w[a 1]]]])
  end

  it "passes (the default error answer) when on_error renders nothing, renders when it does" do
    error = ThreadedProxy::ConnectError.new("refused", url: "http://o.test/", kind: "connect")
    callbacks.on_error { |_error, _responder| nil }
    expect(run(RecordingJob.new(:error, error: error))).to eq([[:pass]])

    callbacks.on_error { |_error, responder| responder.render(status: 503, text: "down") }
    expect(run(RecordingJob.new(:error, error: error)))
      .to eq([[:render, 503, [["content-type", "text/plain; charset=utf-8"]], "down"]])
  end

  it "fails the job, naming the callback, when it raises" do
    callbacks.on_headers { |_response| raise "boom" }
    expect(run(RecordingJob.new(:headers))).to eq([[:fail, "on_headers raised RuntimeError: boom"]])
  end

  it "runs on_complete for a finished job and sends no reply" do
    completed = []
    callbacks.on_complete { |response| completed << response.status }
    summary = { status: 200, error: nil, method: "GET", url: "http://o.test/", total_time: 0.0 }
    expect(run(RecordingJob.new(:finished, summary: summary))).to eq([])
    expect(completed).to eq([200])
  end
end
