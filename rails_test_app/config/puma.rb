# frozen_string_literal: true

# PORT (3000), PUMA_THREADS ("min:max", 5:5), WEB_CONCURRENCY (0 = single
# mode) and PUMA_PRELOAD=1 (preload_app!) tune this server from the outside.
port_number = Integer(ENV.fetch("PORT", "3000"))
bind "tcp://127.0.0.1:#{port_number}"

min_threads, max_threads = ENV.fetch("PUMA_THREADS", "5:5").split(":").map { |n| Integer(n) }
threads min_threads, max_threads || min_threads

workers Integer(ENV.fetch("WEB_CONCURRENCY", "0"))
# Explicit either way: Puma 5.6 preloads by default when workers > 1.
preload_app!(ENV["PUMA_PRELOAD"] == "1")

environment ENV.fetch("RAILS_ENV", "development")

# Puma 6+ answers methods outside its default list (CONNECT among them) with
# 501 before the app runs: proxy_tunnel's CONNECT needs them let through.
# Puma 5.6 has no such check (nor the setting).
supported_http_methods :any if respond_to?(:supported_http_methods)
