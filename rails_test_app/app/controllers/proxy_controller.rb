# frozen_string_literal: true

# Shows every part of the ThreadedProxy::Controller API. Each action proxies to
# ORIGIN plus the rest of its own path and the original query string, so the
# specs drive the origin's behaviour through the URL they request here.
class ProxyController < ApplicationController
  include ThreadedProxy::Controller

  ORIGIN = ENV.fetch("ORIGIN_URL", "http://127.0.0.1:9292")

  # match "/proxy/*path" (any verb); ?method=post overrides the verb.
  def fetch
    proxy_fetch origin_url, method: proxy_method, headers: { "X-From-Proxy" => "1" }
  end

  def with_headers
    proxy_fetch origin_url, method: proxy_method, headers: { "X-From-Proxy" => "1" } do |config|
      config.on_headers do |response|
        response["x-proxied-by"] = "threaded-proxy"
        response.delete("x-remove-me")
        response["content-security-policy"] = "sandbox;"
      end
    end
  end

  def raising
    proxy_fetch origin_url do |config|
      config.on_headers { |_response| raise "boom" }
    end
  end

  # Tags the response with the pid of the process that ran on_headers (the
  # Puma worker), so cluster-mode specs can see which worker proxied.
  def with_pid
    proxy_fetch origin_url do |config|
      config.on_headers { |response| response["x-worker-pid"] = Process.pid.to_s }
    end
  end

  # Like fetch, to ORIGIN2_URL: per-origin limits need two origins.
  def second_origin
    proxy_fetch origin_url(ENV.fetch("ORIGIN2_URL"))
  end

  # What operators see, plus this process's open descriptors (leak specs).
  def stats
    render json: ThreadedProxy.stats.merge(
      pid: Process.pid,
      open_fds: Dir.children("/proc/self/fd").size,
      rss_kb: File.read("/proc/self/status")[/VmRSS:\s+(\d+)/, 1].to_i
    )
  end

  # Joins the client to a raw TCP service on 127.0.0.1:<port>.
  def tunnel
    options = params[:idle_timeout] ? { idle_timeout: Float(params[:idle_timeout]) } : {}
    proxy_tunnel "tcp://127.0.0.1:#{Integer(params[:port])}", **options
  end

  def inline
    render plain: "inline ok"
  end

  # Signs the user in for /edge/* (lib/edge_routes.rb checks the cookie).
  def edge_login
    cookies.signed[:user] = params.require(:user)
    head :no_content
  end

  def reverse
    path = request.fullpath.delete_prefix("/reverse")
    reverse_proxy ORIGIN, path: path.start_with?("/") ? path : "/#{path}"
  end

  def with_response
    proxy_fetch origin_url do |config|
      config.on_response do |response, responder|
        body = response.body
        responder.render(status: response.status, headers: { "x-on-response" => "1" }, text: body.upcase)
      end
    end
  end

  def with_error
    proxy_fetch origin_url do |config|
      config.on_error do |error, responder|
        responder.render(status: 599, text: "custom error #{error.class}")
      end
    end
  end

  def with_complete
    url = origin_url
    proxy_fetch url do |config|
      config.on_complete do |response|
        Rails.logger.info("[threaded-proxy] on_complete status=#{response.status} url=#{url}")
      end
    end
  end

  private

  # The origin URL for this request: ORIGIN + the path after the route's first
  # segment (taken from the raw path so percent-encoding survives) + the query.
  def origin_url(base = ORIGIN)
    url = "#{base}/#{request.path.split('/', 3)[2]}"
    request.query_string.empty? ? url : "#{url}?#{request.query_string}"
  end

  def proxy_method
    (params[:method] || request.request_method).downcase.to_sym
  end
end
