# frozen_string_literal: true

# Loads the Rust extension, the first of:
# 1. lib/threaded_proxy/<major.minor>/threaded_proxy.so: the precompiled
#    platform gem (one library per Ruby ABI, built by `rake gem:native`);
# 2. lib/threaded_proxy/threaded_proxy.so: `rake compile` in a clone, or the
#    copy `gem install` of the source gem puts next to this file;
# 3. threaded_proxy/threaded_proxy in the gem's extension directory.
# A library that is there but fails to load raises its own LoadError.
module ThreadedProxy
  abi = RUBY_VERSION[/\A\d+\.\d+/]
  candidates = [File.join(__dir__, abi, "threaded_proxy.so"), File.join(__dir__, "threaded_proxy.so")]
  found = candidates.find { |path| File.file?(path) }
  if found
    require found
  else
    begin
      require "threaded_proxy/threaded_proxy"
    rescue LoadError => e
      built_for = Dir[File.join(__dir__, "*", "threaded_proxy.so")].map { |p| File.basename(File.dirname(p)) }.sort
      raise e if built_for.empty?

      raise LoadError, "threaded-proxy: this precompiled gem has native libraries for Ruby #{built_for.join(", ")}, " \
                       "not #{abi}; install the source gem instead (gem install threaded-proxy --platform ruby)"
    end
  end
end
