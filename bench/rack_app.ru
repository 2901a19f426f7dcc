# frozen_string_literal: true

# The benchmark's two endpoints as a plain Rack app (no Rails), served by the
# same Puma configuration: diagnostic rows in `rake bench` that split the
# per-request cost of proxy_fetch under Rails into Rails' share and the gem's.
#
#   GET /bench/inline_1k          1 KiB, answered by the lambda
#   GET /bench/proxy/*path?query  ThreadedProxy.call to ORIGIN_URL/path?query
require "bundler/setup"
require "threaded_proxy"

ORIGIN = ENV.fetch("ORIGIN_URL")
INLINE_1K = ("x" * 1024).freeze
PROXY_PREFIX = "/bench/proxy/"

run lambda { |env|
  path = env["PATH_INFO"]
  if path == "/bench/inline_1k"
    [200, { "content-type" => "text/plain", "content-length" => INLINE_1K.bytesize.to_s }, [INLINE_1K]]
  elsif path.start_with?(PROXY_PREFIX)
    query = env["QUERY_STRING"].to_s
    url = "#{ORIGIN}/#{path.delete_prefix(PROXY_PREFIX)}"
    ThreadedProxy.call(env, query.empty? ? url : "#{url}?#{query}")
  else
    [404, { "content-type" => "text/plain" }, ["not found\n"]]
  end
}
