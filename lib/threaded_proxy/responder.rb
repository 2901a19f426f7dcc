# frozen_string_literal: true

require "json"

module ThreadedProxy
  # Lets on_response and on_error answer the client themselves.
  class Responder
    def initialize(job)
      @job = job
      @closed = false
    end

    # render(status: 200, headers: {}, body: String | IO)
    # render(text: "…") / render(json: object)
    def render(status: 200, headers: {}, body: nil, text: nil, json: nil)
      raise Error, "this response was already rendered" if @closed
      given = [body, text, json].count { |v| !v.nil? }
      raise ArgumentError, "render takes one of body:, text: or json:" if given > 1

      pairs = header_pairs(headers)
      if text
        body = text.to_s
        pairs << %w[content-type text/plain;\ charset=utf-8] unless pairs.any? { |n, _| n.casecmp?("content-type") }
      elsif !json.nil?
        body = json.is_a?(String) ? json : JSON.generate(json)
        pairs << %w[content-type application/json] unless pairs.any? { |n, _| n.casecmp?("content-type") }
      end
      status = Integer(status)
      unless Response::FINAL_STATUS.cover?(status)
        raise ArgumentError, "status must be a final HTTP status (200..599), got #{status}"
      end

      deliver(status, pairs, body || "")
      @closed = true
      self
    end

    def redirect_to(url, status: 302)
      Options.check_header!("location", url)
      render(status: status, headers: { "location" => url.to_s }, body: "")
    end

    def closed?
      @closed
    end

    private

    def header_pairs(headers)
      headers.each_with_object([]) do |(name, value), list|
        Array(value).each do |v|
          Options.check_header!(name, v)
          list << [name.to_s, v.to_s]
        end
      end
    end

    def deliver(status, pairs, body)
      case body
      when String
        @job.render(status, pairs, body.b)
      when File
        @job.render_file(status, pairs, body.fileno)
      else
        if body.respond_to?(:to_path) && File.file?(body.to_path)
          File.open(body.to_path, "rb") { |file| @job.render_file(status, pairs, file.fileno) }
        elsif body.respond_to?(:read)
          @job.render(status, pairs, body.read.to_s.b)
        else
          raise ArgumentError, "body must be a String or an IO, got #{body.class}"
        end
      end
    end
  end
end
