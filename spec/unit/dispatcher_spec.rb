# frozen_string_literal: true

require "threaded_proxy"

# Dispatcher.instance under a race (issue 15 item 4): `@instance ||= new`
# let two threads build two dispatchers handing out the same exchange ids.
RSpec.describe ThreadedProxy::Dispatcher do
  around do |example|
    saved = described_class.instance_variable_get(:@instance)
    described_class.instance_variable_set(:@instance, nil)
    example.run
  ensure
    described_class.instance_variable_set(:@instance, saved)
  end

  # Widens the race window the way a busy process does: the thread building
  # a dispatcher gives up the GVL before the dispatcher is stored.
  def slow_new
    built = []
    allow(described_class).to receive(:new).and_wrap_original do |original, *args|
      Thread.pass
      sleep 0.002
      original.call(*args).tap { |dispatcher| built << dispatcher }
    end
    built
  end

  # Starts `count` threads that wait at a gate, then all call the block.
  def race(count, &block)
    gate = Queue.new
    threads = Array.new(count) do
      Thread.new do
        gate.pop
        block.call
      end
    end
    count.times { gate << :go }
    threads.map(&:value)
  end

  it "gives every racing thread the same dispatcher, built once" do
    built = slow_new
    instances = race(16) { described_class.instance }
    expect(instances.uniq(&:object_id).size).to eq(1)
    expect(built.size).to eq(1)
  end

  it "hands racing threads distinct exchange ids" do
    slow_new
    # No callback threads in a unit spec: registering only numbers exchanges.
    allow_any_instance_of(described_class).to receive(:start_threads) # rubocop:disable RSpec/AnyInstance
    ids = race(16) { Array.new(5) { described_class.instance.register(described_class::Record.new) } }.flatten
    expect(ids.size).to eq(80)
    expect(ids.uniq.size).to eq(80)
  end
end
