# frozen_string_literal: true

module ThreadedProxy
  # Base of every error the gem raises or hands to on_error. Carries the
  # origin URL and, where the system gave one, the errno.
  #
  # Keep in sync with ext/threaded_proxy/src/errors.rs (ErrorKind) and
  # src/ruby/errors.rs (class_name).
  class Error < StandardError
    attr_reader :url, :errno, :kind

    def initialize(message = nil, url: nil, errno: nil, kind: nil)
      super(message)
      @url = url
      @errno = errno
      @kind = kind
    end
  end

  # Refused, unreachable, DNS failure (502).
  class ConnectError < Error; end
  # No connection, headers or body byte in time (504 before headers).
  class TimeoutError < Error; end
  # Handshake or certificate failure (502).
  class TLSError < Error; end
  # Protocol violation, reset, garbage from the origin (502).
  class UpstreamError < Error; end
  # A limit was reached or the process is shutting down (503).
  class OverloadError < Error; end
  # A header name or value that would corrupt the message.
  class InvalidHeaderError < Error; end
  # response.body past max_buffered_body.
  class BodyTooLargeError < Error; end
  # on_response read the body but rendered nothing.
  class ResponseBodyAlreadyConsumedError < Error; end

  # A callback failed. What on_error gets when an earlier callback of the
  # same exchange raised something that is not a ThreadedProxy::Error:
  # `cause` is the exception object it raised (class, message, backtrace);
  # `callback` names the callback ("on_headers", …). Also what on_error gets,
  # without a cause, when a callback did not answer within callback_timeout
  # or ended its own thread.
  class CallbackError < Error
    attr_reader :callback

    def initialize(message = nil, callback: nil, **options)
      super(message, **options)
      @callback = callback
    end
  end
end
