# frozen_string_literal: true

module ThreadedProxy
  # Prometheus exposition as a Rack app: every value of ThreadedProxy.stats
  # and (when deferred delivery runs here) async_stats, as counters or gauges
  # by name, and the histograms of time to first byte and total time per
  # exchange, labelled by origin host (c.metrics_hosts, else "other") and by
  # the pid of the process that answered.
  #
  #   # config/routes.rb
  #   mount ThreadedProxy::Metrics, at: "/metrics"
  #   # config.ru of a plain Rack app
  #   map("/metrics") { run ThreadedProxy::Metrics }
  #
  # The text is written in Rust by the prometheus-client crate (OpenMetrics
  # text format); the histograms are recorded there when an exchange ends.
  module Metrics
    CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"

    class << self
      def call(_env)
        [200, { "content-type" => CONTENT_TYPE, "cache-control" => "no-store" }, [text]]
      end

      # The exposition text of this process.
      def text
        ThreadedProxy.ensure_configured
        Native.metrics_text(values)
      end

      # [name, number] pairs: the stats as they are, async ones prefixed.
      def values
        pairs = numeric(ThreadedProxy.stats)
        pairs.concat(numeric(Native.async_stats).map { |name, value| ["async_#{name}", value] }) if Native.async_running?
        pairs.concat(Machine.metric_values)
        pairs
      end

      private

      def numeric(hash)
        hash.filter_map { |name, value| [name.to_s, value] if value.is_a?(Numeric) }
      end
    end
  end
end
