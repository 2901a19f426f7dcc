# frozen_string_literal: true

require "json"

# Callbacks that misbehave on purpose, for spec/integration/faults_spec.rb
# (issue 15 items 1, 2, 3 and 8): each fault must stay inside its own
# exchange while Puma keeps serving.
#
#   GET /faults/:callback/:fault   callback: on_headers | on_response |
#       on_error | on_complete; fault: exit | abort | interrupt | stack |
#       kill | raise | hang | sigterm. Proxies ORIGIN_URL + ?path= (default /echo), or
#       ?origin= (a closed port makes on_error run).
#   GET /faults/report?fault=...   on_headers fails with ?fault= (raise: a
#       FaultsController::Boom caused by an ArgumentError; exit; kill;
#       too_large: on_response reads a body past max_buffered_body; origin:
#       no callback fails, the origin fails: ?origin=, ?path=,
#       ?header_timeout=) and on_error
#       answers 599 with a JSON description of the error it was handed.
#   GET /faults/status?status=N    on_headers sets response.status = N.
class FaultsController < ApplicationController
  include ThreadedProxy::Controller

  ORIGIN = ENV.fetch("ORIGIN_URL", "http://127.0.0.1:9292")

  # A user's own error class, with a cause, raised from a callback.
  class Boom < StandardError; end

  CALLBACKS = %w[on_headers on_response on_error on_complete].freeze

  def fault
    callback = params.fetch(:callback)
    raise ArgumentError, "unknown callback #{callback}" unless CALLBACKS.include?(callback)

    fault = params.fetch(:fault)
    proxy_fetch target_url do |config|
      case callback
      when "on_headers" then config.on_headers { |_response| commit(fault) }
      when "on_response" then config.on_response { |_response, _responder| commit(fault) }
      when "on_error" then config.on_error { |_error, _responder| commit(fault) }
      when "on_complete" then config.on_complete { |_response| commit(fault) }
      end
    end
  end

  def report
    fault = params.fetch(:fault)
    options = fault == "too_large" ? { max_buffered_body: 1000 } : {}
    options[:header_timeout] = Float(params[:header_timeout]) if params[:header_timeout]
    proxy_fetch target_url, **options do |config|
      case fault
      when "too_large" then config.on_response { |response, responder| responder.render(text: response.body) }
      when "origin" then nil
      else config.on_headers { |_response| commit(fault) }
      end
      config.on_error { |error, responder| responder.render(status: 599, json: describe(error)) }
    end
  end

  def status
    value = Integer(params.fetch(:status))
    proxy_fetch target_url do |config|
      config.on_headers { |response| response.status = value }
    end
  end

  private

  def target_url
    "#{params[:origin] || ORIGIN}#{params[:path] || "/echo"}"
  end

  def commit(fault)
    case fault
    when "exit" then exit
    when "abort" then abort("faults: abort from a callback")
    when "interrupt" then raise Interrupt
    when "stack" then recurse(0)
    when "kill" then Thread.current.kill
    when "raise" then raise_with_cause
    when "hang" then sleep 3600 # far past callback_timeout
    when "sigterm" then Process.kill("TERM", Process.pid) # a real signal: Puma must stop
    else raise ArgumentError, "unknown fault #{fault}"
    end
  end

  def recurse(depth)
    recurse(depth + 1) + 1
  end

  def raise_with_cause
    begin
      raise ArgumentError, "the inner reason"
    rescue ArgumentError
      raise Boom, "boom from on_headers"
    end
  end

  def describe(error)
    cause = error.cause
    {
      "class" => error.class.name, "message" => error.message, "message_encoding" => error.message.encoding.name,
      "url" => error.respond_to?(:url) ? error.url : nil,
      "url_encoding" => error.respond_to?(:url) && error.url ? error.url.encoding.name : nil,
      "kind" => error.respond_to?(:kind) ? error.kind : nil,
      "callback" => error.respond_to?(:callback) ? error.callback : nil,
      "threaded_proxy_error" => error.is_a?(ThreadedProxy::Error),
      "cause_class" => cause&.class&.name, "cause_message" => cause&.message,
      "cause_backtrace" => cause&.backtrace&.first(3),
      "cause_cause_class" => cause&.cause&.class&.name
    }
  end
end
