# frozen_string_literal: true

module ThreadedProxy
  class ResponseReader
    # Streams the body in its framing; raises when it was cut short, so the
    # server aborts rather than ending it cleanly.
    #
    # Rack 3's body contract on both Rack versions, with the socket read once:
    # `each` with a block streams; `each` without one is a caller that wants
    # the whole body up front (Rails 7.2's response buffer answers Rack::ETag's
    # `to_ary` with it): the rest is read into memory once, the socket closed,
    # and the Enumerator returned, like any later `each`, replays what was
    # read. No `to_ary` of its own, so a server that prefers one (Puma) still
    # streams instead of buffering the whole body.
    class Body
      def initialize(reader, framing)
        @reader = reader
        @framing = framing
        @parts = nil
      end

      def each(&block)
        return buffered.each unless block
        return @parts.each(&block) if @parts

        @reader.each_body_chunk(@framing, &block)
      end

      def close
        @reader.close
      end

      private

      def buffered
        @parts ||= begin
          parts = []
          @reader.each_body_chunk(@framing) { |data| parts << data }
          parts
        ensure
          close
        end
      end
    end
  end
end
