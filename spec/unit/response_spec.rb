# frozen_string_literal: true

require "threaded_proxy"

RSpec.describe ThreadedProxy::Response do
  subject(:response) do
    described_class.new(200, nil, [%w[Content-Type text/html], %w[Set-Cookie a=1], %w[Set-Cookie b=2]])
  end

  it "exposes status, code and the standard message" do
    expect(response.status).to eq(200)
    expect(response.code).to eq("200")
    expect(response.message).to eq("OK")
    expect(described_class.new(418, "Short And Stout", []).message).to eq("Short And Stout")
  end

  it "looks headers up case-insensitively and joins repeats" do
    expect(response["content-type"]).to eq("text/html")
    expect(response["SET-COOKIE"]).to eq("a=1, b=2")
    expect(response.get_all("set-cookie")).to eq(%w[a=1 b=2])
    expect(response["x-missing"]).to be_nil
    expect(response.key?("Content-Type")).to be(true)
  end

  it "replaces, adds and deletes headers, keeping repeated lines apart" do
    response["content-type"] = "application/json"
    response.add("Set-Cookie", "c=3")
    expect(response.header_pairs).to eq([%w[Set-Cookie a=1], %w[Set-Cookie b=2], %w[content-type application/json], %w[Set-Cookie c=3]])
    expect(response.delete("set-cookie")).to eq("a=1, b=2, c=3")
    expect(response.key?("set-cookie")).to be(false)
    response["x-gone"] = "1"
    response["x-gone"] = nil
    expect(response.key?("x-gone")).to be(false)
    expect(response.to_hash).to eq("content-type" => ["application/json"])
  end

  it "refuses header values with CR, LF or NUL and bad names" do
    expect { response["x-evil"] = "a\r\nInjected: 1" }.to raise_error(ThreadedProxy::InvalidHeaderError)
    expect { response["x-evil"] = "a\0" }.to raise_error(ThreadedProxy::InvalidHeaderError)
    expect { response["bad name"] = "1" }.to raise_error(ThreadedProxy::InvalidHeaderError)
    expect(response.key?("x-evil")).to be(false)
  end

  it "validates status changes and drops a reason that no longer fits" do
    r = described_class.new(404, "Nope", [])
    r.status = 410
    expect(r.message).to eq("Gone")
    expect(r.reason_if_changed).to be_nil
    expect { r.status = 42 }.to raise_error(ArgumentError)
  end

  # issue 15 item 8: a 1xx set here went out as an interim answer and the
  # client never got a final one.
  it "refuses interim (1xx) and out-of-range statuses, keeps the status it had" do
    r = described_class.new(200, nil, [])
    [100, 101, 103, 199, 600, 999].each do |status|
      expect { r.status = status }.to raise_error(ArgumentError, /final HTTP status \(200\.\.599\), got #{status}/)
    end
    expect(r.status).to eq(200)
    r.status = 599
    expect(r.status).to eq(599)
  end

  it "has no body outside on_response" do
    expect { response.body }.to raise_error(ThreadedProxy::Error, /only available inside on_response/)
  end

  it "yields each header line" do
    expect(response.each_header.to_a).to eq([%w[Content-Type text/html], %w[Set-Cookie a=1], %w[Set-Cookie b=2]])
  end
end
