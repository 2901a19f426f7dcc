# frozen_string_literal: true

# Event streams (spec/integration/events_spec.rb): stream_events and publish
# driven through the URL, so the specs talk to a real Puma over raw sockets.
class EventsController < ApplicationController
  include ThreadedProxy::Controller

  # GET /events/stream?channels=a,b&retry=3000&heartbeat=1&replay=0
  # (every parameter but channels optional; x-pid tells the worker apart).
  def stream
    options = { headers: { "x-pid" => Process.pid.to_s } }
    options[:retry] = Integer(params[:retry]) if params[:retry]
    options[:heartbeat] = Float(params[:heartbeat]) if params[:heartbeat]
    options[:replay] = params[:replay] != "0"
    stream_events(*params.fetch(:channels).split(","), **options)
  end

  # POST /events/publish?channel=c&data=…&event=…&id=…; json=1 publishes
  # data parsed as JSON (a Hash, say) to be encoded as JSON again.
  def publish
    data = params[:json] == "1" ? JSON.parse(params[:data]) : params[:data].to_s
    count = ThreadedProxy.publish(params[:channel], data, event: params[:event], id: params[:id])
    render json: { count:, pid: Process.pid }
  rescue ArgumentError => e
    render status: 422, json: { error: e.message }
  end

  # GET /events/subscribers?channel=c
  def subscribers
    render json: { count: ThreadedProxy.subscribers(params[:channel]), pid: Process.pid }
  end

  # GET /events/bad/:case: a stream_events call with bad arguments. The
  # ArgumentError is rescued and answered through Puma: proof the socket was
  # not taken before the check.
  BAD = {
    "no_channel" => -> { [[], {}] },
    "integer_channel" => -> { [[42], {}] },
    "nil_channel" => -> { [[nil], {}] },
    "retry" => -> { [["c"], { retry: -1 }] },
    "retry_float" => -> { [["c"], { retry: 1.5 }] },
    "heartbeat" => -> { [["c"], { heartbeat: 0 }] },
    "headers" => -> { [["c"], { headers: "x" }] },
    "header_crlf" => -> { [["c"], { headers: { "x-a" => "1\r\nx-b: 2" } }] },
    "header_name" => -> { [["c"], { headers: { "x a" => "1" } }] },
    "header_reserved" => -> { [["c"], { headers: { "Content-Type" => "text/plain" } }] },
    "replay" => -> { [["c"], { replay: "yes" }] },
    "unknown" => -> { [["c"], { nope: 1 }] }
  }.freeze

  def bad
    channels, options = BAD.fetch(params[:case]).call
    stream_events(*channels, **options)
  rescue ArgumentError => e
    render status: 422, plain: "#{e.class}: #{e.message}"
  end
end
