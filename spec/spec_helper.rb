# frozen_string_literal: true

require "rspec"
require "timeout"

Thread.abort_on_exception = true

LIB_DIR = File.expand_path("../lib", __dir__)
$LOAD_PATH.unshift(LIB_DIR) unless $LOAD_PATH.include?(LIB_DIR)

Dir[File.join(__dir__, "support", "*.rb")].sort.each do |file|
  require file unless file.end_with?("_self_check.rb")
end

RSpec.configure do |config|
  config.disable_monkey_patching!
  config.order = :random
  Kernel.srand config.seed

  config.expect_with :rspec do |expectations|
    expectations.include_chain_clauses_in_custom_matcher_descriptions = true
  end
  config.mock_with :rspec do |mocks|
    mocks.verify_partial_doubles = true
  end
  config.shared_context_metadata_behavior = :apply_to_host_groups

  # Every example gets 60 s (`:slow` ones 300 s, `timeout: N` sets N): a hung
  # socket must fail one example, not the whole run.
  config.around do |example|
    seconds = example.metadata[:timeout] || (example.metadata[:slow] ? 300 : 60)
    Timeout.timeout(seconds, Timeout::Error, "example timed out after #{seconds}s") { example.run }
  end
end
