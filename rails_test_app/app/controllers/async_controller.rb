# frozen_string_literal: true

# proxy_async (deferred delivery): each action stores the request for
# ORIGIN plus the rest of its path and the query string, answers at once,
# and the Rust runtime delivers it in the background. The client's X-Tag
# header goes along so the specs can tell deliveries apart.
class AsyncController < ApplicationController
  include ThreadedProxy::Controller

  ORIGIN = ENV.fetch("ORIGIN_URL", "http://127.0.0.1:9292")

  # match "/async/deliver/*path": the request body (:rack) is stored as is.
  def deliver
    id = proxy_async origin_url, method: :post, headers: tag_header
    response.headers["X-Delivery-Id"] = id.to_s
  end

  # A String body and another status for the client.
  def deliver_string
    proxy_async origin_url, method: :put, headers: tag_header.merge("Content-Type" => "text/plain"),
                            body: "string body #{request.headers["X-Tag"]}", respond_with: 200
  end

  def stats
    render json: ThreadedProxy.async_stats
  end

  def dead
    render json: ThreadedProxy.async_dead
  end

  # POST /async/requeue?id=N, or without id: all of them.
  def requeue
    render json: { requeued: ThreadedProxy.async_requeue(params[:id] ? Integer(params[:id]) : :all) }
  end

  private

  def origin_url
    url = "#{ORIGIN}/#{params[:path]}"
    request.query_string.empty? ? url : "#{url}?#{request.query_string}"
  end

  def tag_header
    tag = request.headers["X-Tag"]
    tag ? { "X-Tag" => tag } : {}
  end
end
