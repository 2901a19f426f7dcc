# frozen_string_literal: true

module ThreadedProxy
  # Checks proxy_tunnel's arguments: a tcp://host:port target (subject to
  # allowed_hosts like any URL) and the few options a tunnel has.
  class TunnelOptions
    KNOWN = %i[connect_timeout idle_timeout].freeze

    attr_reader :url, :address, :connect_timeout, :idle_timeout

    def initialize(target, options, configuration = ThreadedProxy.configuration)
      raise ArgumentError, "options must be a Hash, got #{options.class}" unless options.is_a?(Hash)

      options = options.transform_keys(&:to_sym)
      unknown = options.keys - KNOWN
      raise ArgumentError, "unknown proxy_tunnel option#{"s" if unknown.size > 1} #{unknown.map(&:inspect).join(", ")} (known: #{KNOWN.join(", ")})" if unknown.any?

      @url, @address = check_target(target, configuration)
      @connect_timeout = seconds(options, :connect_timeout, configuration.connect_timeout)
      @idle_timeout = seconds(options, :idle_timeout, configuration.idle_timeout)
    end

    private

    # Judged by the Rust parser, like proxy_fetch's URL: "tcp://host:port"
    # with a port of 1 to 65535, nothing after it.
    def check_target(target, configuration)
      target = target.to_s
      raise ArgumentError, "malformed proxy_tunnel target #{target.inspect}: not ASCII" unless target.ascii_only?

      url, host, address = Native.check_url(target, true)
      Options.check_allowed_host!(host, configuration.allowed_hosts) if configuration.allowed_hosts
      [url, address]
    end

    def seconds(options, name, default)
      Options.seconds!(options, name, default)
    end
  end
end
