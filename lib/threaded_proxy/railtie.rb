# frozen_string_literal: true

module ThreadedProxy
  # config.threaded_proxy.max_connections = 2_000 (any Configuration setting)
  # in config/application.rb or an environment file.
  class Railtie < ::Rails::Railtie
    config.threaded_proxy = ActiveSupport::OrderedOptions.new

    initializer "threaded_proxy.configure" do |app|
      ThreadedProxy.configure do |c|
        app.config.threaded_proxy.each do |name, value|
          setter = "#{name}="
          raise ArgumentError, "unknown threaded_proxy setting #{name.inspect}" unless c.respond_to?(setter)

          c.public_send(setter, value)
        end
        c.logger ||= Rails.logger
      end
    end
  end
end
