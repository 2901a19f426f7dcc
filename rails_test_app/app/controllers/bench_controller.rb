# frozen_string_literal: true

# Actions for the benchmarks (bench/, `rake bench`); nothing else uses them.
#
#   GET /bench/inline_1k          1 KiB rendered by the action itself: what the
#                                 same Puma costs without proxying
#   GET /bench/proxy/*path?query  plain proxy_fetch of ORIGIN_URL/path?query,
#                                 no options, no callbacks
class BenchController < ApplicationController
  include ThreadedProxy::Controller

  ORIGIN = ENV.fetch("ORIGIN_URL", "http://127.0.0.1:9292")
  INLINE_1K = ("x" * 1024).freeze

  def inline_1k
    render plain: INLINE_1K
  end

  def proxy
    url = "#{ORIGIN}/#{request.path.delete_prefix("/bench/proxy/")}"
    url = "#{url}?#{request.query_string}" unless request.query_string.empty?
    proxy_fetch url
  end
end
