# frozen_string_literal: true

require_relative "boot"

require "rails"
require "active_support/railtie"
require "action_controller/railtie"

require "threaded_proxy"
require_relative "../lib/edge_routes"

module RailsTestApp
  # A minimal Rails app (no database, no views) served by Puma: used by the
  # integration specs and the demo to exercise ThreadedProxy::Controller.
  class Application < Rails::Application
    config.load_defaults 6.1

    config.eager_load = false
    config.secret_key_base = "threaded-proxy-rails-test-app-secret-key-base-not-secret"
    config.hosts.clear

    # Hot proxy routes ahead of the whole stack (lib/edge_routes.rb).
    config.middleware.insert_before 0, ThreadedProxy::Middleware,
                                    &EdgeRoutes.new(ENV.fetch("ORIGIN_URL", "http://127.0.0.1:9292")).method(:call)

    config.logger = ActiveSupport::TaggedLogging.new(ActiveSupport::Logger.new($stdout))
    config.log_level = ENV.fetch("RAILS_LOG_LEVEL", "info").to_sym

    # THREADED_PROXY_<SETTING>=value sets config.threaded_proxy.<setting>
    # (the Railtie hands them to ThreadedProxy.configure), e.g.
    # THREADED_PROXY_MAX_CONNECTIONS=3 for the limit specs; a list of
    # statuses as "409,500..599".
    setting_value = lambda do |value|
      if value.include?(",") then value.split(",").map(&setting_value)
      elsif value.include?("..") then Range.new(*value.split("..", 2).map { |bound| Integer(bound) })
      elsif value.match?(/\A\d+\z/) then Integer(value)
      else Float(value, exception: false) || value # a host name
      end
    end
    ENV.each do |name, value|
      # THREADED_PROXY_ZERO_COPY is read by the gem itself (the Rust settings).
      next unless (setting = name[/\ATHREADED_PROXY_(?!START\z|ZERO_COPY\z)(\w+)\z/, 1])

      config.threaded_proxy[setting.downcase] = setting_value.call(value)
    end
  end
end
