# frozen_string_literal: true

# What a request costs in each layer of rails_test_app, in process (no
# sockets, no Puma): CPU time of the calling thread and objects allocated per
# request, for GET /bench/inline_1k through
#   - the whole app (Rails.application.call),
#   - its middleware stack in front of a bare Rack lambda,
#   - the router and BenchController alone.
# bench/RESULTS.md quotes it for the thread-freedom analysis.
#
#   bundle exec ruby bench/rails_layers.rb [requests]
ENV["RAILS_ENV"] = "production"
ENV["RAILS_LOG_LEVEL"] = "warn"
require_relative "../rails_test_app/config/environment"
require "rack/mock"

requests = Integer(ARGV.fetch(0, "4000"))
env = Rack::MockRequest.env_for("http://127.0.0.1:3000/bench/inline_1k")
body = ("x" * 1024).freeze
bare = ->(_env) { [200, { "content-type" => "text/plain", "content-length" => "1024" }, [body]] }
app = Rails.application
# Built lazily, in this order: building a second middleware stack rewires
# the app's own (ActiveSupport's LocalCache middleware is one shared object
# whose `new` sets its next app), so the whole app is measured before.
layers = {
  "whole app (#{app.middleware.size} middlewares + router + controller)" => -> { app },
  "router + BenchController#inline_1k" => -> { app.routes },
  "middleware stack + a bare lambda" => -> { app.middleware.build(bare) }
}

call = lambda do |rack_app, count|
  count.times do
    response = rack_app.call(env.dup)
    response[2].close if response[2].respond_to?(:close)
  end
end

puts "| layer | CPU µs per request | objects per request |", "|---|---:|---:|"
layers.each do |label, build|
  rack_app = build.call
  call.call(rack_app, requests / 4) # warm-up
  GC.start
  allocated = GC.stat(:total_allocated_objects)
  started = Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID)
  call.call(rack_app, requests)
  cpu = Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID) - started
  puts format("| %s | %.0f | %d |", label, cpu * 1e6 / requests, (GC.stat(:total_allocated_objects) - allocated) / requests)
end
