# frozen_string_literal: true

require_relative "threaded_proxy"
