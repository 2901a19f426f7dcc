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

  homepage = "https://github.com/threaded-proxy/threaded-proxy"
  spec.homepage = homepage
  spec.metadata = {
    "homepage_uri" => homepage,
    "source_code_uri" => homepage,
    "changelog_uri" => "#{homepage}/blob/main/CHANGELOG.md"
  }

  spec.required_ruby_version = ">= 3.1"

  # The source gem: the Ruby layer and the Rust crate alone (its own cargo
  # workspace, with its Cargo.lock); `gem install` compiles it with cargo.
  # `rake gem:native` builds the platform gem from this spec (no ext/, one
  # library per Ruby ABI under lib/threaded_proxy/<major.minor>/).
  spec.files = Dir.chdir(__dir__) do
    Dir[
      "lib/**/*.rb",
      "exe/*",
      "ext/threaded_proxy/{Cargo.toml,Cargo.lock,extconf.rb}",
      "ext/threaded_proxy/src/**/*.rs",
      "README.md",
      "CHANGELOG.md"
    ].sort
  end
  spec.require_paths = ["lib"]
  # The TCP router (ProxyMachine's command line): ThreadedProxy::MachineCLI.
  spec.bindir = "exe"
  spec.executables = ["threaded-proxy-machine"]
  spec.extensions = ["ext/threaded_proxy/extconf.rb"]

  spec.add_dependency "rack", ">= 2.2", "< 4"
end
