# frozen_string_literal: true

Rails.application.configure do
  config.cache_classes = true
  config.eager_load = true
  config.consider_all_requests_local = false
  # As `rails new` writes it: in production the web server in front serves
  # public/, so Rails does not look for a file on every request.
  config.public_file_server.enabled = ENV["RAILS_SERVE_STATIC_FILES"].present?
end
