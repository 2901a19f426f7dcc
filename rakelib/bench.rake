# frozen_string_literal: true

# `rake bench` / `rake bench[download|threads|sse|small|events|machine]` (or 1-6): see the
# "Benchmarks" section of README.md and bench/RESULTS.md.
desc "Benchmarks: proxy_fetch under Puma vs nginx vs direct (bench[scenario] runs one: download, threads, sse, small, events, machine)"
task :bench, [:scenario] do |_t, args|
  # The extension is rebuilt first so the numbers are for the current code;
  # BENCH_SKIP_COMPILE=1 skips that. A compile racing another one in the
  # same tree (they share tmp/ext) can fail spuriously: one retry.
  unless ENV["BENCH_SKIP_COMPILE"] == "1"
    begin
      Rake::Task[:compile].invoke
    rescue RuntimeError => e
      warn "bench: compile failed (#{e.message.lines.first.strip}); retrying once"
      Rake::Task[:compile].reenable
      Rake::Task[:compile].invoke
    end
  end
  sh "cargo build --release -p bench-origin -p bench-loadgen"
  require_relative "../bench/runner"
  command = "bundle exec rake bench#{"[#{args[:scenario]}]" if args[:scenario]}"
  Bench.run(only: args[:scenario], command: command)
end
