# frozen_string_literal: true

module ThreadedProxy
  module Async
    # include ThreadedProxy::Async::Controller (ThreadedProxy::Controller
    # includes it) for proxy_async.
    module Controller
      # Stores this request for `url` and answers `respond_with` (an empty
      # body) once it is on disk; returns the queue id.
      #
      #   proxy_async "http://hooks.internal/events", headers: { "Authorization" => token }
      def proxy_async(url, **options)
        id, status = Async.enqueue(request.env, url, options)
        head status
        id
      end
    end
  end
end
