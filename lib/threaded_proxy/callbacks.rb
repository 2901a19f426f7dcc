# frozen_string_literal: true

module ThreadedProxy
  # The callbacks of one proxy_fetch call (per call; the process-wide
  # settings are Configuration), set in its block:
  #   proxy_fetch(url) { |config| config.on_headers { |response| … } }
  class Callbacks
    CALLBACKS = %i[on_headers on_response on_complete on_error].freeze

    CALLBACKS.each do |name|
      define_method(name) do |&block|
        raise ArgumentError, "#{name} needs a block" unless block

        callbacks[name] = block
        self
      end
    end

    def callbacks
      @callbacks ||= {}
    end

    def [](name)
      callbacks[name]
    end

    def any?
      !callbacks.empty?
    end
  end
end
