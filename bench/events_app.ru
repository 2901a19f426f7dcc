# frozen_string_literal: true

# The events scenario's app (bench/events_scenario.rb): the same job, SSE
# subscribers on one channel fed by publishes, done three ways, plus the
# inline action probed while events flow. Plain Rack routing in front of
# Rails controllers (no Rails application: nothing else in the way).
#
#   GET /bench/inline_1k               1 KiB, answered inline
#   GET /bench/events/ROW/stream       subscribe (ROW: gem, live, hijack)
#   GET /bench/events/ROW/publish      ?seq=S&count=C (PublishEndpoint)
#   GET /bench/events/ROW/check        200, or 501 with what ROW lacks
#
# THREADED_PROXY_MAX_CONNECTIONS, _FD_BUDGET, _SHUTDOWN_TIMEOUT and
# _EVENTS_URL configure the gem (as rails_test_app's application.rb does).
require "bundler/setup"
require "action_controller"
require "threaded_proxy"
require_relative "events/event_hub"
require_relative "events/publish_endpoint"
require_relative "events/gem_events_controller"
require_relative "events/live_events_controller"
require_relative "events/hijack_events"

ThreadedProxy.configure do |c|
  { "MAX_CONNECTIONS" => :Integer, "FD_BUDGET" => :Integer, "SHUTDOWN_TIMEOUT" => :Float,
    "EVENTS_URL" => :String }.each do |name, type|
    next unless (value = ENV["THREADED_PROXY_#{name}"])

    setter = "#{name.downcase}="
    c.public_send(setter, Kernel.public_send(type, value)) if c.respond_to?(setter) # else: GemEventsController.missing
  end
end

INLINE_1K = ("x" * 1024).freeze
# One fan-out per Ruby row (a Puma serves one row per run; separate hubs
# keep a stray client of one row from receiving the other's events).
LIVE_HUB = BenchEvents::EventHub.new
HIJACK_HUB = BenchEvents::EventHub.new
BenchEvents::LiveEventsController.hub = LIVE_HUB

text = ->(status, body) { [status, { "content-type" => "text/plain", "content-length" => body.bytesize.to_s }, [body]] }
gem_publish = BenchEvents::PublishEndpoint.new { |data| BenchEvents::GemEventsController.publish(data) }
gem_check = lambda do |_env|
  missing = BenchEvents::GemEventsController.missing
  missing ? text.call(501, "#{missing}\n") : text.call(200, "ok\n")
end
routes = {
  "/bench/inline_1k" => ->(_env) { text.call(200, INLINE_1K) },
  "/bench/events/gem/stream" => BenchEvents::GemEventsController.action(:stream),
  "/bench/events/gem/publish" => ->(env) { BenchEvents::GemEventsController.missing ? gem_check.call(env) : gem_publish.call(env) },
  "/bench/events/gem/check" => gem_check,
  "/bench/events/live/stream" => BenchEvents::LiveEventsController.action(:stream),
  "/bench/events/live/publish" => BenchEvents::PublishEndpoint.new { |data| LIVE_HUB.publish(data) },
  "/bench/events/live/check" => ->(_env) { text.call(200, "ok\n") },
  "/bench/events/hijack/stream" => BenchEvents::HijackEvents.new(HIJACK_HUB),
  "/bench/events/hijack/publish" => BenchEvents::PublishEndpoint.new { |data| HIJACK_HUB.publish(data) },
  "/bench/events/hijack/check" => ->(_env) { text.call(200, "ok\n") }
}.freeze

run ->(env) { (routes[env["PATH_INFO"]] || ->(_) { text.call(404, "not found\n") }).call(env) }
