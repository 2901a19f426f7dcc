# frozen_string_literal: true

require "threaded_proxy"

# The event-stream settings and publish's argument checks (no server).
RSpec.describe "event stream settings and publish arguments" do
  it "has the documented defaults" do
    config = ThreadedProxy::Configuration.new
    expect([config.event_replay, config.event_queue_bytes, config.events_url]).to eq([100, 1024 * 1024, nil])
  end

  it "refuses bad settings with ArgumentError" do
    {
      event_replay: -1, event_queue_bytes: 0, events_url: "mysql://x"
    }.each do |name, value|
      config = ThreadedProxy::Configuration.new
      config.public_send("#{name}=", value)
      expect { config.apply! }.to raise_error(ArgumentError, /#{name}/), name.to_s
    end
  end

  it "publishes a String as is and anything else as JSON, to nobody here" do
    expect(ThreadedProxy.publish("unit:none", "x")).to eq(0)
    expect(ThreadedProxy.publish(:"unit:none", { a: [1, nil] }, event: :e, id: 3)).to eq(0)
    expect(ThreadedProxy.subscribers("unit:none")).to eq(0)
  end

  it "refuses CR, LF or NUL in event, id and channel, and channels that are not String or Symbol" do
    ["a\nb", "a\rb", "a\0b"].each do |bad|
      expect { ThreadedProxy.publish("c", "x", event: bad) }.to raise_error(ArgumentError, /event: must not/)
      expect { ThreadedProxy.publish("c", "x", id: bad) }.to raise_error(ArgumentError, /id: must not/)
      expect { ThreadedProxy.publish(bad, "x") }.to raise_error(ArgumentError, /channel must not/)
    end
    expect { ThreadedProxy.publish("c", "x", event: 1.5) }.to raise_error(ArgumentError, /String, Symbol or Integer/)
    expect { ThreadedProxy.publish(42, "x") }.to raise_error(ArgumentError, /String or a Symbol/)
    expect { ThreadedProxy.publish("", "x") }.to raise_error(ArgumentError, /must not be empty/)
    expect { ThreadedProxy.subscribers(nil) }.to raise_error(ArgumentError)
  end
end
