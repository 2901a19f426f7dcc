# frozen_string_literal: true

module ThreadedProxy
  # Rack middleware that proxies the requests a router picks, in the spirit
  # of ProxyMachine:
  #
  #   use ThreadedProxy::Middleware, "/api" => "http://api.internal:8080"
  #   use ThreadedProxy::Middleware do |env|
  #     "http://files.internal#{env["PATH_INFO"]}" if env["PATH_INFO"].start_with?("/files/")
  #   end
  #
  # The block returns an origin URL (proxy it), nil (pass to the app) or a
  # Rack response (answer directly). Proxied requests keep their method,
  # body and headers, like reverse_proxy. proxy_fetch options go in a second
  # Hash: `use ThreadedProxy::Middleware, { "/api" => url }, header_timeout: 5`.
  class Middleware
    # No **options: a brace-less routes Hash with String keys would be taken
    # for keywords.
    def initialize(app, routes = nil, options = {}, &router)
      raise ArgumentError, "give a routes Hash or a block, not both" if routes && router
      raise ArgumentError, "give a routes Hash or a block" unless routes || router

      @app = app
      @routes = routes&.map { |prefix, origin| [prefix.to_s, origin.to_s.chomp("/")] }&.sort_by { |p, _| -p.size }
      @router = router
      @options = options.transform_keys(&:to_sym)
    end

    def call(env)
      target = @router ? @router.call(env) : route(env)
      case target
      when nil then @app.call(env)
      when Array then target
      else ThreadedProxy.call(env, target.to_s, **pass_through_options(env))
      end
    end

    private

    def route(env)
      path = env["PATH_INFO"].to_s
      @routes.each do |prefix, origin|
        next unless path == prefix || path.start_with?(prefix.end_with?("/") ? prefix : "#{prefix}/")

        query = env["QUERY_STRING"].to_s
        return "#{origin}#{path}#{"?#{query}" unless query.empty?}"
      end
      nil
    end

    def pass_through_options(env)
      Forwarding.options(env).merge(@options) do |key, ours, theirs|
        key == :headers ? ours.merge(theirs) : theirs
      end
    end
  end
end
