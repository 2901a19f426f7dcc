# frozen_string_literal: true

module ThreadedProxy
  VERSION = "0.1.0"
end
