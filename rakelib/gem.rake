# frozen_string_literal: true

# Gems, built into pkg/ (README "Install"; bin/fresh-app-test installs both):
#
#   rake gem:source   pkg/threaded-proxy-VERSION.gem: the Ruby layer and the
#                     Rust crate; `gem install` compiles it (cargo, libclang).
#   rake gem:native   pkg/threaded-proxy-VERSION-x86_64-linux.gem: no
#                     extension, one library per Ruby ABI under
#                     lib/threaded_proxy/<major.minor>/threaded_proxy.so: the
#                     host Ruby's (built here by `rake compile`) and every
#                     tmp/native/<major.minor>/threaded_proxy.so found (built
#                     by the matrix run in other Debian releases).
#
# Both fail on any warning of `gem build`. gem:native prints, per library,
# the newest glibc symbol version it needs (objdump -T): the oldest glibc the
# platform gem runs on.
require "fileutils"
require "rbconfig"
require "rubygems/package"

ROOT = File.expand_path("..", __dir__) unless defined?(ROOT)

module GemTasks
  module_function

  PKG = File.join(ROOT, "pkg")
  ABI = /\A\d+\.\d+\z/.freeze

  # A copy: Gem::Specification.load caches by path, and gem:native changes
  # its spec.
  def spec
    loaded = Dir.chdir(ROOT) { Gem::Specification.load("threaded-proxy.gemspec") }
    raise "cannot load threaded-proxy.gemspec" unless loaded

    loaded.dup
  end

  def host_abi
    "#{RbConfig::CONFIG.fetch("MAJOR")}.#{RbConfig::CONFIG.fetch("MINOR")}"
  end

  # ABI => library: the host's own build first, then tmp/native/*/.
  def native_libraries
    libraries = { host_abi => File.join(ROOT, "lib", "threaded_proxy", "threaded_proxy.so") }
    Dir[File.join(ROOT, "tmp", "native", "*", "threaded_proxy.so")].sort.each do |path|
      abi = File.basename(File.dirname(path))
      raise "#{path}: the directory must name a Ruby ABI (major.minor)" unless abi.match?(ABI)

      libraries[abi] ||= path
    end
    libraries.each { |abi, path| raise "no library for Ruby #{abi}: #{path} is missing" unless File.file?(path) }
    libraries.sort_by { |abi, _| Gem::Version.new(abi) }.to_h
  end

  # The newest GLIBC_x.y symbol version the library needs.
  def newest_glibc(path)
    out = IO.popen(["objdump", "-T", path], err: File::NULL, &:read)
    raise "objdump -T #{path} failed (binutils installed?)" unless $?.success?

    out.scan(/GLIBC_(\d+(?:\.\d+)+)/).flatten.uniq.max_by { |v| Gem::Version.new(v) } || "none"
  end

  # Runs `gem build` on a gemspec and fails on any warning it prints.
  def build(dir, gemspec, output)
    FileUtils.mkdir_p(PKG)
    out = IO.popen(["gem", "build", gemspec, "--output", output, { chdir: dir, err: %i[child out] }], &:read)
    puts out
    raise "gem build failed" unless $?.success?
    raise "gem build printed warnings (see above)" if out.match?(/WARN/i)

    output
  end
end

namespace :gem do
  desc "Source gem pkg/threaded-proxy-VERSION.gem (gem install compiles the Rust crate)"
  task :source do
    spec = GemTasks.spec
    GemTasks.build(ROOT, "threaded-proxy.gemspec", File.join(GemTasks::PKG, "#{spec.full_name}.gem"))
  end

  desc "Precompiled gem pkg/threaded-proxy-VERSION-x86_64-linux.gem (host Ruby + tmp/native/<abi>/ libraries)"
  task native: :compile do
    spec = GemTasks.spec
    libraries = GemTasks.native_libraries
    stage = File.join(ROOT, "tmp", "gem-native")
    FileUtils.rm_rf(stage)
    ruby_files = spec.files.reject { |f| f.start_with?("ext/") }
    ruby_files.each do |file|
      FileUtils.mkdir_p(File.join(stage, File.dirname(file)))
      FileUtils.cp(File.join(ROOT, file), File.join(stage, file))
    end
    puts "native libraries (newest glibc symbol each needs):"
    so_files = libraries.map do |abi, path|
      file = "lib/threaded_proxy/#{abi}/threaded_proxy.so"
      FileUtils.mkdir_p(File.join(stage, File.dirname(file)))
      # Line tables stay in the clone's build (debug = 1); the gem ships the
      # code only (about a fifth of the size).
      sh "strip", "--strip-debug", "-o", File.join(stage, file), path, verbose: false
      puts format("  Ruby %-4s %-40s GLIBC_%s  (%.1f MiB)", abi, file, GemTasks.newest_glibc(path),
                  File.size(File.join(stage, file)) / 1048576.0)
      file
    end
    spec.files = (ruby_files + so_files).sort
    spec.extensions = []
    spec.platform = Gem::Platform.new("x86_64-linux")
    # Only the Rubies it has a library for (a gap, say 3.2 between 3.1 and
    # 3.3, gets the loader's LoadError naming the source gem).
    first, last = libraries.keys.map { |abi| Gem::Version.new(abi) }.minmax
    major, minor = last.segments
    spec.required_ruby_version = [">= #{first}", "< #{major}.#{minor + 1}.dev"]
    File.write(File.join(stage, "threaded-proxy.gemspec"), spec.to_ruby)
    GemTasks.build(stage, "threaded-proxy.gemspec", File.join(GemTasks::PKG, "#{spec.full_name}.gem"))
  end

  desc "Both gems (gem:source, gem:native)"
  task all: %i[source native]
end
