# frozen_string_literal: true

require "rack/test"
require "threaded_proxy"

# Without rack.hijack (rack-test, as a request spec runs), stream_events
# returns a streaming body that ends after `heartbeat` seconds without an
# event, so a test reads what was published meanwhile.
RSpec.describe "event streams under rack-test (no hijack)" do
  include Rack::Test::Methods

  def app
    ->(env) { ThreadedProxy.stream_events(env, "rack-test", heartbeat: 0.5, retry: 1000) }
  end

  def wait_for_subscriber(channel, timeout: 5)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    until ThreadedProxy.subscribers(channel) == 1
      raise "no subscriber on #{channel} within #{timeout}s" if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

      sleep 0.01
    end
  end

  it "returns the events published while it streams, then ends after heartbeat seconds of silence" do
    publisher = Thread.new do
      wait_for_subscriber("rack-test")
      [ThreadedProxy.publish("rack-test", "one"),
       ThreadedProxy.publish("rack-test", { "n" => 2 }, event: "two", id: "2")]
    end
    started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    get "/events"
    elapsed = Process.clock_gettime(Process::CLOCK_MONOTONIC) - started
    expect(publisher.join(5)&.value).to eq([1, 1])
    expect(last_response.status).to eq(200)
    expect(last_response.headers["content-type"]).to eq("text/event-stream")
    expect(last_response.headers["cache-control"]).to eq("no-cache")
    expect(last_response.body).to eq("retry: 1000\n\ndata: one\n\nevent: two\nid: 2\ndata: {\"n\":2}\n\n")
    expect(elapsed).to be_between(0.45, 5)
    expect(ThreadedProxy.subscribers("rack-test")).to eq(0)
  end

  it "raises ArgumentError for bad arguments in the request thread" do
    expect { ThreadedProxy.stream_events({}, heartbeat: 1) }.to raise_error(ArgumentError, /at least one channel/)
    expect { ThreadedProxy.publish("c", "x", id: "1\n2") }.to raise_error(ArgumentError, /id: must not contain/)
    expect { ThreadedProxy.publish(:"a\nb", "x") }.to raise_error(ArgumentError, /CR, LF or NUL/)
    expect { ThreadedProxy.publish(nil, "x") }.to raise_error(ArgumentError, /String or a Symbol/)
  end
end
