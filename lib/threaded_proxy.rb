# frozen_string_literal: true

require_relative "threaded_proxy/version"
require_relative "threaded_proxy/errors"
require_relative "threaded_proxy/native"
require_relative "threaded_proxy/configuration"
require_relative "threaded_proxy/options"
require_relative "threaded_proxy/tunnel_options"
require_relative "threaded_proxy/request_body"
require_relative "threaded_proxy/exchange_spec"
require_relative "threaded_proxy/callbacks"
require_relative "threaded_proxy/response"
require_relative "threaded_proxy/responder"
require_relative "threaded_proxy/job_threads"
require_relative "threaded_proxy/dispatcher"
require_relative "threaded_proxy/response_reader"
require_relative "threaded_proxy/response_reader/body"
require_relative "threaded_proxy/hijack"
require_relative "threaded_proxy/exchange"
require_relative "threaded_proxy/events"
require_relative "threaded_proxy/event_stream"
require_relative "threaded_proxy/exchange/refused_body"
require_relative "threaded_proxy/async"
require_relative "threaded_proxy/async/controller"
require_relative "threaded_proxy/async/shutdown"
require_relative "threaded_proxy/metrics"
require_relative "threaded_proxy/forwarding"
require_relative "threaded_proxy/middleware"
require_relative "threaded_proxy/machine"
require_relative "threaded_proxy/controller"
require_relative "threaded_proxy/railtie" if defined?(Rails::Railtie)

# Proxy HTTP requests from Rails or Rack without holding an app-server
# thread: the client socket goes to a Rust runtime that streams the origin's
# response to it; Ruby runs only the callbacks you give.
module ThreadedProxy
  class << self
    # ThreadedProxy.shutdown stops deferred delivery too.
    prepend Async::Shutdown

    def configuration
      @configuration ||= Configuration.new
    end

    # Hands the configuration to Rust once, before the first exchange, so
    # its documented defaults apply even if `configure` was never called.
    def ensure_configured
      return if @configured

      configuration.apply!
      @configured = true
    end

    # ThreadedProxy.configure { |c| c.max_connections = 2_000 }
    def configure
      yield configuration
      configuration.apply!
      @configured = true
      configuration
    end

    # Counters of this process (active, started, completed, failed_*, …),
    # with callback_jobs_queued (jobs waiting for a callback thread),
    # callback_jobs_expired (dropped unrun: their exchange had failed),
    # callback_threads_alive, callback_threads_replaced (threads a callback
    # ended or held past callback_timeout, each replaced) and
    # callback_threads_stuck (replaced ones still in their callback).
    def stats
      Native.stats.merge!(Dispatcher.instance.thread_stats).merge!(Native.event_stats)
    end

    # Streams Server-Sent Events from `channels` to the client of `env` (a
    # plain Rack app; controllers call stream_events); returns the Rack
    # response to return.
    def stream_events(env, *channels, **options)
      EventStream.new(env, channels, **options).start
    end

    # Queues an event for every subscriber of `channel` in this process;
    # returns how many (see Events.publish).
    def publish(channel, data, event: nil, id: nil)
      Events.publish(channel, data, event:, id:)
    end

    # Subscribers of `channel` in this process now.
    def subscribers(channel)
      Events.subscribers(channel)
    end

    # Starts the runtime and the callback threads now instead of on the first
    # exchange. Safe before fork: a forked child builds its own.
    def start
      ensure_configured
      Native.start_runtime
      Dispatcher.instance.start
      self
    end

    # Proxies the request in `env` to `url`; returns the Rack response to
    # return from the app (a hijack marker under Puma).
    def call(env, url, **options, &config)
      Exchange.new(env, url, options, &config).start
    end

    # Joins the client to a raw TCP service (tcp://host:port) after
    # answering its Upgrade (101) or CONNECT (200); returns the Rack response.
    def tunnel(env, target, **options)
      Exchange.new(env, target, options, tunnel: true).start
    end

    # Stops taking exchanges, lets running ones finish for up to `timeout`
    # seconds, then cuts the rest. Safe to call more than once.
    def shutdown(timeout = configuration.shutdown_timeout)
      return true unless Native.runtime_pid == Process.pid

      Native.stop_accepting
      drained = wait_idle(timeout.to_f)
      unless drained
        Native.cut
        wait_idle(1.0)
      end
      Dispatcher.instance.stop
      drained
    end

    # Calls the block (a native wait taking the seconds left) until it
    # answers true or the monotonic `deadline` passes. Native waits return
    # early when Ruby has an interrupt pending (as it often does at exit,
    # after a signal): Ruby handles it, then we wait again.
    def wait_interruptibly(deadline)
      loop do
        left = deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC)
        return true if yield([left, 0].max)
        return false if left <= 0

        sleep 0.01
      end
    end

    # The options reverse_proxy and the middleware use to pass a request
    # through: same method and body, client headers, X-Forwarded-*.
    def forwarding_options(env)
      Forwarding.options(env)
    end

    def forwarded_for_headers(env)
      Forwarding.forwarded_for_headers(env)
    end

    # Starts deferred delivery in this process now (else on first use).
    def async_start
      Async.start
    end

    # Machine-wide counts: { queued:, in_flight:, delivered:, retrying:, dead: }
    # (plus running_here: attempts running in this process).
    def async_stats
      Async.start
      Native.async_stats
    end

    # Requests that will not be tried again: [{ id:, method:, url:, attempts:, last_error: }].
    def async_dead(limit: 1000)
      Async.start
      Native.async_dead(Integer(limit))
    end

    # Puts a dead request (by id) or all of them (:all) back in the queue
    # with a fresh attempt count; the number requeued.
    def async_requeue(id_or_all)
      Async.start
      Native.async_requeue(id_or_all == :all ? nil : Integer(id_or_all))
    end

    private

    def wait_idle(seconds)
      wait_interruptibly(Process.clock_gettime(Process::CLOCK_MONOTONIC) + seconds) { |left| Native.wait_idle(left) }
    end
  end
end

at_exit { ThreadedProxy.shutdown }
