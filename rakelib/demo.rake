# frozen_string_literal: true

desc "Run rails_test_app under Puma in front of a built-in origin (demo[--once] prints and exits)"
task :demo, [:mode] do |_t, args|
  $LOAD_PATH.unshift(File.expand_path("../spec/support", __dir__))
  require "origin_server"
  require "puma_server"

  origin = OriginServer.new.start
  puma = PumaServer.new(env: { "ORIGIN_URL" => origin.url }, threads: "2:2").start
  begin
    puts "origin: #{origin.url}   rails_test_app (Puma): #{puma.url}", ""
    show = lambda do |path|
      url = "#{puma.url}#{path}"
      puts "$ curl -si '#{url}'"
      output = IO.popen(["curl", "-si", "--max-time", "10", url], &:read)
      puts output.byteslice(0, 600).scrub, ""
      # bin/test runs `demo[--once]` too: an answer that is not HTTP fails it.
      raise "demo: no HTTP answer from #{url}" unless output.start_with?("HTTP/1.1 ")
    end
    show.call("/headers_proxy/headers?h=Set-Cookie:a=1&h=Set-Cookie:b=2&h=X-Remove-Me:gone")
    show.call("/proxy/echo?hello=world")
    show.call("/proxy/status?code=404&reason=Not+Here")
    # Event streams: a task publishes its progress from a background
    # thread; curl follows the EventSource the /tasks/1 page opens.
    puts "$ curl -sN '#{puma.url}/tasks/1/progress'   (while a task publishes its progress)"
    stream = IO.popen(["curl", "-sN", "--max-time", "3", "#{puma.url}/tasks/1/progress"])
    IO.popen(["curl", "-s", "-X", "POST", "#{puma.url}/tasks/1/start?steps=4&interval=0.3"], &:read)
    events = stream.read
    stream.close
    puts events, ""
    raise "demo: no events from /tasks/1/progress" unless events.include?("event: taskProgress")
    unless args[:mode] == "--once"
      puts "Try: curl -i #{puma.url}/proxy/bytes?n=100   curl -N #{puma.url}/proxy/drip?n=5&interval=1"
      puts "     open #{puma.url}/tasks/7 in a browser (EventSource progress bar)"
      puts "Ctrl-C stops the demo."
      sleep
    end
  rescue Interrupt
    puts
  ensure
    puma.stop
    origin.stop
  end
end
