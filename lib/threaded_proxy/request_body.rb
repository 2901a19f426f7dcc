# frozen_string_literal: true

module ThreadedProxy
  # The request body as Rust wants it, taken while the action runs (Puma
  # closes and unlinks rack.input's Tempfile once it returns): a file goes
  # as its fd for Rust to stream, anything else is read into a String.
  # Returns the body fields of an ExchangeSpec.
  module RequestBody
    module_function

    # `body` is nil, a String, an IO or :rack (the incoming body in `env`).
    def fields(env, body)
      rack_input = body == :rack
      body = env["rack.input"] if rack_input
      case body
      when nil then {}
      when String then { body: body.b }
      else io_fields(body, rack_input: rack_input)
      end
    end

    def io_fields(io, rack_input:)
      file = file_of(io)
      if file
        # Puma may have left the offset anywhere; a rack body starts at 0.
        { body_fd: file.fileno, body_offset: rack_input ? 0 : file.pos }
      else
        io.rewind if rack_input && io.respond_to?(:rewind)
        data = io.read
        data.nil? || data.empty? ? {} : { body: data.b }
      end
    end

    def file_of(io)
      return io if io.is_a?(File)
      return io.__getobj__ if defined?(Tempfile) && io.is_a?(Tempfile) && io.__getobj__.is_a?(File)

      nil
    end
  end
end
