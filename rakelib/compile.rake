# frozen_string_literal: true

require "fileutils"
require "rbconfig"

ROOT = File.expand_path("..", __dir__) unless defined?(ROOT)

desc "Build the Rust extension the way a gem install does, into lib/threaded_proxy/"
task :compile do
  build_dir = File.join(ROOT, "tmp", "ext")
  FileUtils.mkdir_p(build_dir)
  Dir.chdir(build_dir) do
    sh RbConfig.ruby, File.join(ROOT, "ext", "threaded_proxy", "extconf.rb")
    sh "make", "install", "RUBYARCHDIR=#{File.join(ROOT, "lib", "threaded_proxy")}"
  end
end

desc "cargo fmt --check, clippy -D warnings (the gem's crate with and without the Ruby bindings, the bench tools)"
task :lint do
  crate = "--manifest-path ext/threaded_proxy/Cargo.toml"
  sh "cargo fmt --all #{crate} -- --check"
  sh "cargo fmt --all -- --check"
  sh "cargo clippy #{crate} --all-targets -- -D warnings"
  sh({ "RUBY" => RbConfig.ruby }, "cargo clippy #{crate} --features ruby --all-targets -- -D warnings")
  sh "cargo clippy --workspace --all-targets -- -D warnings"
end
