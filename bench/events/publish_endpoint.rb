# frozen_string_literal: true

require "rack/utils"

module BenchEvents
  # GET ...?seq=S&count=C: publishes C events numbered S, S+1, … through the
  # row's publish (a block returning the subscriber count), each carrying
  # "<seq> <CLOCK_MONOTONIC ns when published>" so the load driver, on the
  # same machine and clock, measures publish-to-receive at every client.
  class PublishEndpoint
    def initialize(&publish)
      @publish = publish
    end

    def call(env)
      params = Rack::Utils.parse_query(env["QUERY_STRING"].to_s)
      seq = Integer(params.fetch("seq"))
      count = Integer(params.fetch("count", "1"))
      reached = 0
      count.times do |i|
        reached = @publish.call("#{seq + i} #{Process.clock_gettime(Process::CLOCK_MONOTONIC, :nanosecond)}")
      end
      text(200, "published #{count}, last to #{reached} subscribers\n")
    rescue KeyError, ArgumentError => e
      text(400, "#{e.message}\n")
    end

    private

    def text(status, body)
      [status, { "content-type" => "text/plain", "content-length" => body.bytesize.to_s }, [body]]
    end
  end
end
