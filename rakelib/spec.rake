# frozen_string_literal: true

desc "Rust unit tests (no Ruby needed): the gem's crate, then the bench tools"
task :cargo_test do
  sh "cargo test --manifest-path ext/threaded_proxy/Cargo.toml"
  sh "cargo test --workspace"
end

desc "RSpec: unit specs of the Ruby layer and integration specs under real Puma"
task spec: :compile do
  sh "bundle exec rspec"
end

desc "Everything CI runs: Rust tests, then the RSpec suite"
task test: %i[cargo_test spec]
