# frozen_string_literal: true

require "rack/utils"

module ThreadedProxy
  # The origin's response as callbacks see it: status and headers to read
  # and change; the body only inside on_response (buffered on demand).
  # Headers are kept as ordered pairs so repeated ones (Set-Cookie) survive.
  class Response
    # The statuses a callback may give the client (Responder#render too).
    FINAL_STATUS = (200..599).freeze

    attr_reader :status

    def initialize(status, reason, header_pairs, job: nil)
      @status = status
      @reason = reason
      @headers = header_pairs.map { |name, value| [name.dup, value.dup] }
      @job = job
      @body = nil
    end

    def code
      @status.to_s
    end

    def message
      @reason || ::Rack::Utils::HTTP_STATUS_CODES[@status] || ""
    end
    alias reason message

    # The origin's reason phrase while the status is unchanged (nil lets
    # the proxy write the standard phrase for a new status).
    def reason_if_changed
      @reason
    end

    # A final status only (200..599): a 1xx is an interim answer (after
    # `100 Continue` the client would wait for an answer that never comes)
    # and 600 and up are no HTTP status. ArgumentError in the callback (500).
    def status=(value)
      value = Integer(value)
      raise ArgumentError, "status must be a final HTTP status (200..599), got #{value}" unless FINAL_STATUS.cover?(value)

      @reason = nil unless value == @status
      @status = value
    end

    # All values of a header joined with ", " (nil when absent).
    def [](name)
      values = get_all(name)
      values.empty? ? nil : values.join(", ")
    end

    def get_all(name)
      key = name.to_s.downcase
      @headers.filter_map { |n, v| v if n.downcase == key }
    end

    # Replaces a header; an Array sets several lines; nil deletes.
    def []=(name, value)
      delete(name)
      return if value.nil?

      Array(value).each { |v| add(name, v) }
    end

    # Adds one more line for a header (another Set-Cookie, say).
    def add(name, value)
      Options.check_header!(name, value)
      @headers << [name.to_s, value.to_s]
      self
    end

    def delete(name)
      key = name.to_s.downcase
      removed = get_all(name)
      @headers.reject! { |n, _| n.downcase == key }
      removed.empty? ? nil : removed.join(", ")
    end

    def key?(name)
      key = name.to_s.downcase
      @headers.any? { |n, _| n.downcase == key }
    end
    alias include? key?

    # Yields each header line (repeated headers once per line).
    def each_header(&block)
      return enum_for(:each_header) unless block

      @headers.each { |name, value| block.call(name, value) }
    end

    # { "set-cookie" => ["a=1", "b=2"], … } with lowercase names.
    def to_hash
      @headers.each_with_object({}) { |(n, v), h| (h[n.downcase] ||= []) << v }
    end

    def header_pairs
      @headers.map(&:dup)
    end

    # The whole body (on_response only), buffered up to max_buffered_body;
    # raises BodyTooLargeError past it. After reading it, render.
    def body
      return @body if @body
      raise Error, "response.body is only available inside on_response" unless @job

      @body = @job.read_body
    end

    def body_consumed?
      !@body.nil?
    end

    def inspect
      "#<#{self.class.name} #{@status} #{message}>"
    end
  end
end
