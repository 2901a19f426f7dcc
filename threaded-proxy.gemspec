# frozen_string_literal: true

require_relative "lib/threaded_proxy/version"

Gem::Specification.new do |spec|
  spec.name = "threaded-proxy"
  spec.version = ThreadedProxy::VERSION
  spec.authors = ["threaded-proxy contributors"]
  spec.license = "MIT"

  spec.summary = "Proxy HTTP requests from Rails/Rack without holding an app-server thread."
  spec.description = <<~DESC
    threaded-proxy lets a Rails controller (or any Rack app) proxy a request to
    an origin server by hijacking the client's socket and handing it to a Rust
    (tokio/hyper) runtime, so the Puma thread is free for the next request while
    the response streams from the origin straight to the client.
  DESC

  spec.required_ruby_version = ">= 3.1"

  spec.files = Dir[
    "lib/**/*.rb",
    "ext/**/*.{rs,rb,toml}",
    "Cargo.toml",
    "Cargo.lock",
    "README.md"
  ]
  spec.require_paths = ["lib"]
  spec.extensions = ["ext/threaded_proxy/extconf.rb"]

  spec.add_dependency "rack", ">= 2.2"
end
