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
  match "/proxy2/*path", to: "proxy#second_origin", via: :all, format: false
  get "/stats", to: "proxy#stats"
  mount ThreadedProxy::Metrics, at: "/metrics"
  get "/edge_login", to: "proxy#edge_login" # the cookie lib/edge_routes.rb checks
  match "/tunnel/:port", to: "proxy#tunnel", via: %i[get connect]

  # contract specs (spec/integration/contract_spec.rb)
  scope "/contract", controller: :contract, format: false do
    %i[fetch string_body file_body rack_body unknown_option header_option_crlf allowed_hosts allowed_hosts_restored
       on_response_render on_response_pass on_response_unrendered on_response_redirect
       on_response_too_large on_complete on_error on_headers_crlf].each do |name|
      match name.to_s, action: name, via: :all
    end
    match "reverse/*path", action: :reverse, via: :all
    match "fetch_rescued", action: :fetch_rescued, via: :all
  end
  # end contract specs

  # async specs (spec/integration/async_spec.rb)
  scope "/async", controller: :async, format: false do
    post "deliver/*path", action: :deliver
    post "deliver_string/*path", action: :deliver_string
    get "stats", action: :stats
    get "dead", action: :dead
    post "requeue", action: :requeue
  end
  # end async specs

  # fault specs (spec/integration/faults_spec.rb)
  scope "/faults", controller: :faults, format: false do
    get "report", action: :report
    get "status", action: :status
    get ":callback/:fault", action: :fault
  end
  # end fault specs

  # event stream specs (spec/integration/events_spec.rb)
  scope "/events", controller: :events, format: false do
    get "stream", action: :stream
    post "publish", action: :publish
    get "subscribers", action: :subscribers
    get "bad/:case", action: :bad
  end
  # end event stream specs

  # the event-stream demo page (rake demo)
  get "/tasks/:id", to: "tasks#show"
  get "/tasks/:id/progress", to: "tasks#progress"
  post "/tasks/:id/start", to: "tasks#start"

  # bench routes (bench/, rakelib/bench.rake)
  get "/bench/inline_1k", to: "bench#inline_1k"
  get "/bench/proxy/*path", to: "bench#proxy", format: false
  # end bench routes
end
