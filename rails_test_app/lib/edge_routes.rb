# frozen_string_literal: true

# The router of the ThreadedProxy::Middleware that sits at the head of this
# app's middleware stack (config/application.rb): hot proxy routes answered
# before Rails' 23 default middlewares, the router and a controller run,
# which cost a Puma thread 0.55 ms per request in process and 1.5–2 ms under
# a burst here (bench/RESULTS.md).
#
#   /bench/edge/*path  the benchmark's lean path (`rake bench`): ORIGIN_URL/path,
#                      no authentication, like BenchController#proxy
#   /edge/*path        only with the app's signed `user` cookie (set by
#                      GET /edge_login?user=NAME): ORIGIN_URL/path with the
#                      client's method, body and headers and X-User: NAME;
#                      401 without ever reaching Rails
#
# Anything else returns nil: the request goes on to Rails.
class EdgeRoutes
  BENCH_PREFIX = "/bench/edge/"
  USER_PREFIX = "/edge/"
  UNAUTHORIZED_BODY = "sign in first"
  UNAUTHORIZED = [401, { "content-type" => "text/plain", "content-length" => UNAUTHORIZED_BODY.bytesize.to_s },
                  [UNAUTHORIZED_BODY]].freeze

  def initialize(origin)
    @origin = origin.chomp("/")
  end

  def call(env)
    path = env["PATH_INFO"].to_s
    if path.start_with?(BENCH_PREFIX)
      origin_url(env, path.delete_prefix(BENCH_PREFIX))
    elsif path.start_with?(USER_PREFIX)
      # Rails merged its secrets into env before the stack runs, so the
      # app's signed (or encrypted) cookies can be read here already.
      user = ActionDispatch::Request.new(env).cookie_jar.signed[:user]
      return UNAUTHORIZED unless user

      # Passed through as the middleware passes a URL it is given, plus
      # who the app says the user is.
      options = ThreadedProxy.forwarding_options(env)
      options[:headers] = options[:headers].merge("X-User" => user)
      ThreadedProxy.call(env, origin_url(env, path.delete_prefix(USER_PREFIX)), **options)
    end
  end

  private

  def origin_url(env, rest)
    query = env["QUERY_STRING"].to_s
    query.empty? ? "#{@origin}/#{rest}" : "#{@origin}/#{rest}?#{query}"
  end
end
