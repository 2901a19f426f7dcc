# frozen_string_literal: true

# Loads the Rust extension: from lib/threaded_proxy/ after `rake compile`,
# from the gem's extension directory after `gem install`.
begin
  require_relative "threaded_proxy.so"
rescue LoadError
  require "threaded_proxy/threaded_proxy"
end
