# frozen_string_literal: true

require "threaded_proxy"

RSpec.describe ThreadedProxy::Callbacks do
  it "keeps one block per callback and refuses a missing block" do
    config = described_class.new
    expect(config.any?).to be(false)
    handler = proc {}
    config.on_headers(&handler)
    expect(config[:on_headers]).to be(handler)
    expect(config.any?).to be(true)
    expect { config.on_error }.to raise_error(ArgumentError, /on_error needs a block/)
  end
end
