# frozen_string_literal: true

module ThreadedProxy
  # How reverse_proxy and the middleware pass a request through: same
  # method and body, the client's headers, X-Forwarded-* added
  # (ThreadedProxy.forwarding_options is the public name).
  module Forwarding
    module_function

    # proxy_fetch options for passing the request in `env` through.
    def options(env)
      method = env["REQUEST_METHOD"]
      has_body = env["CONTENT_LENGTH"].to_i.positive? || env.key?("HTTP_TRANSFER_ENCODING")
      options = { method: method, forward_headers: true, headers: forwarded_for_headers(env) }
      options[:body] = :rack if has_body
      options
    end

    def forwarded_for_headers(env)
      remote = env["REMOTE_ADDR"].to_s
      prior = env["HTTP_X_FORWARDED_FOR"].to_s
      scheme = env["HTTP_X_FORWARDED_PROTO"] || env["rack.url_scheme"] || "http"
      host = env["HTTP_HOST"] || [env["SERVER_NAME"], env["SERVER_PORT"]].compact.join(":")
      {
        "X-Forwarded-For" => prior.empty? ? remote : "#{prior}, #{remote}",
        "X-Forwarded-Proto" => scheme.to_s,
        "X-Forwarded-Host" => host.to_s
      }
    end
  end
end
