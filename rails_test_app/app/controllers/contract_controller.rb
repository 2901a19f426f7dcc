# frozen_string_literal: true

require "digest"
require "json"
require "net/http"
require "stringio"

# One small action per feature of the proxy_fetch / reverse_proxy contract
# (DESIGN.md), driven by spec/integration/contract_spec.rb through the query:
#
#   origin=  where to proxy to (default ORIGIN_URL): a TLS origin, a port
#            nobody listens on, ...
#   path=    the path (and query) to ask the origin for (default /echo)
#   url=     the whole URL instead, verbatim (malformed ones, other schemes)
#   method=, header_timeout=, idle_timeout=, connect_timeout=,
#   verify_tls=true|false, ignore_ssl_errors=true|false, ca_file=1 (the
#   CA_FILE env) or a path, forward=true|false|Name,Name, max_buffered_body=
#
# Every finished exchange is logged by the threaded_proxy.fetch subscriber
# below as one "[contract-event] {json}" line. When the proxied URL carries
# notify=TAG, the subscriber (and on_complete, with tag=TAG) also requests
# ORIGIN_URL/echo?ping=... so the specs can wait for it on the origin instead
# of polling the log.
class ContractController < ApplicationController
  include ThreadedProxy::Controller

  ORIGIN = ENV.fetch("ORIGIN_URL", "http://127.0.0.1:9292")
  EVENT_PREFIX = "[contract-event]"
  ALLOWED_HOSTS_LOCK = Mutex.new

  def self.ping_origin(query)
    Net::HTTP.get_response(URI("#{ORIGIN}/echo?#{URI.encode_www_form(query)}"))
  rescue StandardError => e
    Rails.logger.error("[contract] ping failed: #{e.class}: #{e.message}")
  end

  def self.record_event(payload)
    error = payload[:error]
    line = {
      method: payload[:method], url: payload[:url], status: payload[:status],
      bytes_to_client: payload[:bytes_to_client], bytes_from_origin: payload[:bytes_from_origin],
      time_to_first_byte: payload[:time_to_first_byte], total_time: payload[:total_time],
      error: error && "#{error.class}: #{error.message}"
    }
    Rails.logger.info("#{EVENT_PREFIX} #{JSON.generate(line)}")
    tag = payload[:url].to_s[/[?&]notify=([^&]+)/, 1]
    ping_origin("event" => tag) if tag
  end

  # Subscribed once, when the class loads (cache_classes: true in test);
  # not in production, where `rake bench` measures proxy_fetch as an app
  # without a threaded_proxy.fetch subscriber runs it (eager loading would
  # otherwise subscribe this at boot and report every exchange to Ruby).
  unless Rails.env.production?
    ActiveSupport::Notifications.subscribe("threaded_proxy.fetch") do |_name, _start, _finish, _id, payload|
      ContractController.record_event(payload)
    end
  end

  # ---------------------------------------------------------------- requests

  # Every option from the query; the client's own method unless ?method=.
  def fetch
    proxy_fetch target_url, fetch_options
  end

  # body: a String (?data=..., sent as is, bytes included).
  def string_body
    proxy_fetch target_url, fetch_options.merge(method: params[:method] || :post, body: params.fetch(:data))
  end

  # body: an IO (a File the spec wrote, ?file=path).
  def file_body
    File.open(params.fetch(:file), "rb") do |file|
      proxy_fetch target_url, fetch_options.merge(method: params[:method] || :put, body: file)
    end
  end

  # body: :rack, the client's own body (and Content-Type).
  def rack_body
    proxy_fetch target_url, fetch_options.merge(body: :rack)
  end

  # reverse_proxy: /contract/reverse/<path>?<query> goes to ORIGIN/<path>?<query>.
  def reverse
    reverse_proxy ORIGIN, path: request.fullpath.delete_prefix("/contract/reverse")
  end

  # Mistakes caught in the action (ArgumentError, Rails' 500 page).
  def unknown_option
    proxy_fetch target_url, no_such_option: true
  end

  def header_option_crlf
    proxy_fetch target_url, headers: { "X-Injected" => "a\r\nX-Evil: 1" }
  end

  # The action rescues a bad URL and renders its own page (422): the
  # ArgumentError comes before the socket is taken, so it can.
  def fetch_rescued
    proxy_fetch target_url, fetch_options
  rescue ArgumentError => e
    render plain: "own page: #{e.message}", status: 422
  end

  # allowed_hosts: ["localhost", /\Aallowed-\d+\.test\z/] for this call only.
  def allowed_hosts
    ALLOWED_HOSTS_LOCK.synchronize do
      previous = ThreadedProxy.configuration.allowed_hosts
      begin
        ThreadedProxy.configuration.allowed_hosts = ["localhost", /\Aallowed-\d+\.test\z/]
        proxy_fetch target_url
      ensure
        ThreadedProxy.configuration.allowed_hosts = previous
      end
    end
  end

  # The allowed_hosts setting once no allowed_hosts call holds it: Rust
  # may answer that call's client before its `ensure` put the setting back.
  def allowed_hosts_restored
    ALLOWED_HOSTS_LOCK.synchronize { render plain: ThreadedProxy.configuration.allowed_hosts.inspect }
  end

  # ---------------------------------------------------------------- callbacks

  # on_response reads the body, then renders it as ?as=text|json|string|io|file.
  def on_response_render
    file = params[:file]
    proxy_fetch target_url, fetch_options do |config|
      config.on_response do |response, responder|
        body = response.body
        summary = { "status" => response.status, "bytes" => body.bytesize,
                    "sha256" => Digest::SHA256.hexdigest(body) }
        case params.fetch(:as)
        when "text" then responder.render(status: 201, text: "#{summary["status"]} #{summary["bytes"]} #{summary["sha256"]}")
        when "json" then responder.render(status: 202, headers: { "x-rendered" => "json" }, json: summary)
        when "string"
          responder.render(status: 203, headers: { "content-type" => "application/octet-stream" }, body: body)
        when "io" then responder.render(body: StringIO.new(body))
        when "file"
          File.open(file, "rb") { |io| responder.render(headers: { "content-type" => "application/x-file" }, body: io) }
        end
      end
    end
  end

  # on_response neither reads nor renders: the origin's response goes on,
  # with a header changed.
  def on_response_pass
    proxy_fetch target_url, fetch_options do |config|
      config.on_response do |response, _responder|
        response["x-on-response"] = "seen #{response.status}"
      end
    end
  end

  # on_response reads the body and renders nothing (a bug: 500).
  def on_response_unrendered
    proxy_fetch target_url, fetch_options do |config|
      config.on_response { |response, _responder| response.body }
    end
  end

  # on_response redirects (?to=, ?status=).
  def on_response_redirect
    proxy_fetch target_url, fetch_options do |config|
      config.on_response do |_response, responder|
        if params[:status]
          responder.redirect_to(params.fetch(:to), status: Integer(params[:status]))
        else
          responder.redirect_to(params.fetch(:to))
        end
      end
    end
  end

  # on_response reads a body past max_buffered_body; ?rescue=1 adds an
  # on_error that answers 413 itself.
  def on_response_too_large
    proxy_fetch target_url, fetch_options do |config|
      config.on_response do |response, responder|
        responder.render(text: "read #{response.body.bytesize} bytes")
      end
      if params[:rescue]
        config.on_error do |error, responder|
          responder.render(status: 413, text: "on_error: #{error.class}: #{error.message}")
        end
      end
    end
  end

  # on_complete logs a line and pings the origin with ?tag=.
  def on_complete
    tag = params.fetch(:tag)
    proxy_fetch target_url, fetch_options do |config|
      config.on_complete do |response|
        Rails.logger.info("[contract-on-complete] tag=#{tag} status=#{response.status}")
        ContractController.ping_origin("on_complete" => tag, "status" => response.status)
      end
    end
  end

  # on_error renders its own answer (599, with the error's class and url).
  def on_error
    proxy_fetch target_url, fetch_options do |config|
      config.on_error do |error, responder|
        responder.render(status: 599, headers: { "x-error-class" => error.class.name, "x-error-url" => error.url.to_s },
                         text: "on_error: #{error.class}")
      end
    end
  end

  # on_headers tries to put CR/LF into a header value.
  def on_headers_crlf
    proxy_fetch target_url, fetch_options do |config|
      config.on_headers { |response| response["x-bad"] = "a\r\nb" }
    end
  end

  private

  def target_url
    return params[:url] if params[:url]

    "#{params[:origin] || ORIGIN}#{params[:path] || "/echo"}"
  end

  def fetch_options
    options = { method: (params[:method] || request.request_method).downcase.to_sym }
    %i[header_timeout idle_timeout connect_timeout].each do |name|
      options[name] = Float(params[name]) if params[name]
    end
    options[:max_buffered_body] = Integer(params[:max_buffered_body]) if params[:max_buffered_body]
    options[:verify_tls] = params[:verify_tls] == "true" if params[:verify_tls]
    options[:ignore_ssl_errors] = params[:ignore_ssl_errors] == "true" if params[:ignore_ssl_errors]
    options[:ca_file] = params[:ca_file] == "1" ? ENV.fetch("CA_FILE") : params[:ca_file] if params[:ca_file]
    options[:forward_headers] = forward_option(params[:forward]) if params[:forward]
    options
  end

  def forward_option(value)
    case value
    when "true" then true
    when "false" then false
    else value.split(",")
    end
  end
end
