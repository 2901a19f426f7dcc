# frozen_string_literal: true

module ThreadedProxy
  # include ThreadedProxy::Controller in a Rails controller for proxy_fetch
  # and reverse_proxy.
  module Controller
    include Async::Controller # proxy_async (lib/threaded_proxy/async/controller.rb)
    # Proxies this request to `url` and frees the Puma thread at once:
    #
    #   proxy_fetch "http://files.internal/blobs/1", headers: { "Authorization" => token } do |config|
    #     config.on_headers { |response| response["content-security-policy"] = "sandbox;" }
    #   end
    def proxy_fetch(url, options = {}, &block)
      rack_response = ThreadedProxy.call(request.env, url, **options, &block)
      apply_threaded_proxy_response(rack_response)
    end

    # Passes the request through to `base_url` + `path`: method, query, body
    # and client headers (minus hop-by-hop and Host) plus X-Forwarded-For,
    # -Proto and -Host.
    def reverse_proxy(base_url, path: request.fullpath, headers: {}, **options)
      base = base_url.to_s.chomp("/")
      path = "/#{path}" unless path.to_s.start_with?("/")
      forwarding = ThreadedProxy.forwarding_options(request.env)
      forwarding[:headers] = forwarding[:headers].merge(headers)
      proxy_fetch("#{base}#{path}", forwarding.merge(options))
    end

    # After authorising in the action, joins the client to a raw TCP
    # service: answers its Upgrade with 101 (or CONNECT with 200), then copies
    # bytes both ways until both sides close or idle_timeout passes.
    #
    #   proxy_tunnel "tcp://db-console.internal:5432", idle_timeout: 600
    def proxy_tunnel(target, **options)
      apply_threaded_proxy_response(ThreadedProxy.tunnel(request.env, target, **options))
    end

    # Streams Server-Sent Events published to `channels` (ThreadedProxy.publish)
    # to this client and frees the Puma thread at once:
    #
    #   stream_events "task:#{task.id}", retry: 3_000, heartbeat: 15
    def stream_events(*channels, **options)
      apply_threaded_proxy_response(ThreadedProxy.stream_events(request.env, *channels, **options))
    end

    private

    def apply_threaded_proxy_response(rack_response)
      status, headers, body = rack_response
      if Exchange.hijacked?(rack_response)
        # The socket is gone; Puma ignores this answer. Rails still wants one.
        self.status = status
        self.response_body = []
      else
        self.status = status
        headers.each { |name, value| response.headers[name] = value }
        self.response_body = body
      end
    end
  end
end
