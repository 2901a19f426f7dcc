# frozen_string_literal: true

Rails.application.routes.draw do
  # Every glob route passes the rest of the path (and the query string) on to
  # the origin; `format: false` keeps extensions such as "/proxy/bytes.txt".
  match "/proxy/*path", to: "proxy#fetch", via: :all, format: false
  match "/headers_proxy/*path", to: "proxy#with_headers", via: :all, format: false
  match "/raising/*path", to: "proxy#raising", via: :all, format: false
  match "/on_response/*path", to: "proxy#with_response", via: :all, format: false
  match "/on_error/*path", to: "proxy#with_error", via: :all, format: false
  match "/on_complete/*path", to: "proxy#with_complete", via: :all, format: false
  match "/reverse", to: "proxy#reverse", via: :all
  match "/reverse/*path", to: "proxy#reverse", via: :all, format: false
  get "/inline", to: "proxy#inline"
  match "/pid_proxy/*path", to: "proxy#with_pid", via: :all, format: false
end
