# frozen_string_literal: true

module ThreadedProxy
  class Exchange
    # The body of a refused exchange in the request thread; closable like
    # the streaming body a started one returns.
    class RefusedBody
      def initialize(chunks)
        @chunks = chunks
      end

      def each(&block)
        @chunks.each(&block)
      end

      def close; end
    end
  end
end
