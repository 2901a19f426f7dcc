# frozen_string_literal: true

require "logger"

module ThreadedProxy
  # A ProxyMachine configuration file, loaded unchanged:
  #
  #   proxy do |data| … end                     # the routing block
  #   proxy_connect_error { |remote| … }
  #   proxy_inactivity_error { |remote| … }
  #   LOGGER = Logger.new("log/proxy.log")      # optional, as in ProxyMachine
  #
  # Like ProxyMachine, `proxy` and friends are Kernel methods and LOGGER is
  # a top-level constant (a Logger on stdout until the file assigns its
  # own): only the executable loads this, in a process of its own.
  class MachineConfig
    attr_reader :path, :router, :connect_error, :inactivity_error

    def self.load(path)
      new(path).tap(&:load!)
    end

    def initialize(path)
      @path = File.expand_path(path)
      raise ArgumentError, "config file #{path} does not exist" unless File.file?(@path)
    end

    def load!
      install_dsl
      Object.const_set(:LOGGER, Logger.new($stdout)) unless Object.const_defined?(:LOGGER)
      Kernel.load(@path)
      raise ArgumentError, "#{@path} defines no `proxy do |data| … end` block" unless @router

      self
    end

    # The LOGGER the file left (its own, or the default).
    def logger
      Object.const_get(:LOGGER)
    end

    def router=(block)
      @router = block
    end

    def connect_error=(block)
      @connect_error = block
    end

    def inactivity_error=(block)
      @inactivity_error = block
    end

    private

    def install_dsl
      config = self
      Kernel.module_eval do
        define_method(:proxy) { |&block| config.router = block }
        define_method(:proxy_connect_error) { |&block| config.connect_error = block }
        define_method(:proxy_inactivity_error) { |&block| config.inactivity_error = block }
        private :proxy, :proxy_connect_error, :proxy_inactivity_error
      end
    end
  end
end
