# frozen_string_literal: true

require "json"

module ThreadedProxy
  # publish and subscribers: the Ruby side of event streams (see
  # EventStream for the streams themselves). Without events_url, events
  # reach the subscribers of this process only (like Action Cable's async
  # adapter); with it, every process's that listens on that database.
  module Events
    FORBIDDEN = /[\r\n\0]/.freeze

    class << self
      # Queues one event for every local subscriber of `channel`; returns
      # how many. A String is sent as is (one `data:` line per line), any
      # other value as JSON.
      def publish(channel, data, event: nil, id: nil)
        channel = check_channel(channel)
        event = check_field("event", event)
        id = check_field("id", id)
        data = data.is_a?(String) ? data : JSON.generate(data)
        url = ThreadedProxy.configuration.events_url
        return Native.publish(channel, data, event, id, Integer(ThreadedProxy.configuration.event_replay)) unless url

        Native.publish_remote(url.to_s, channel, data, event, id)
      end

      # With events_url, starts this process's LISTEN connection (once).
      def listen
        url = ThreadedProxy.configuration.events_url
        Native.events_listen(url.to_s, Integer(ThreadedProxy.configuration.event_replay)) if url
      end

      def subscribers(channel)
        Native.subscribers(check_channel(channel))
      end

      # The channel names of a stream_events call, as Strings.
      def check_channels(channels)
        raise ArgumentError, "stream_events needs at least one channel" if channels.empty?

        channels.map { |channel| check_channel(channel) }.uniq
      end

      private

      def check_channel(channel)
        unless channel.is_a?(String) || channel.is_a?(Symbol)
          raise ArgumentError, "an event channel must be a String or a Symbol, not #{channel.class}"
        end
        raise ArgumentError, "an event channel must not be empty" if channel.empty?
        raise ArgumentError, "an event channel must not contain CR, LF or NUL" if FORBIDDEN.match?(channel)

        channel.to_s
      end

      # event: and id: values: a String, Symbol or Integer without CR, LF
      # or NUL (each would end the field early; the client drops an id with
      # NUL).
      def check_field(name, value)
        return nil if value.nil?
        unless value.is_a?(String) || value.is_a?(Symbol) || value.is_a?(Integer)
          raise ArgumentError, "#{name}: must be a String, Symbol or Integer"
        end

        value = value.to_s
        raise ArgumentError, "#{name}: must not contain CR, LF or NUL" if FORBIDDEN.match?(value)

        value
      end
    end
  end
end
