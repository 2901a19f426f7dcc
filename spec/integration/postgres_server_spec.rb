# frozen_string_literal: true

require "socket"

# PostgreSQL cannot bind port 0, so PostgresServer picks its port first
# (FreePort) and must survive another process taking that port before the
# server binds it.
RSpec.describe PostgresServer do
  it "starts on another port when the one it picked was taken in the meantime" do
    taken = TCPServer.new("127.0.0.1", 0)
    free = TCPServer.new("127.0.0.1", 0).then { |s| s.addr[1].tap { s.close } }
    allow(FreePort).to receive(:take).and_return(taken.addr[1], free)
    # Not binding after a retry is the failure this example is for.
    server = described_class.start_or_skip(self, never_skip: "could not bind")
    expect(server.port).to eq(free)
    expect(server.psql("postgres", "SELECT 1")).to eq([["1"]])
    expect(server.log).to include("could not bind")
  ensure
    server&.stop
    taken&.close
  end
end
