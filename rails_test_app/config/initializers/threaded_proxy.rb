# frozen_string_literal: true

# THREADED_PROXY_START=1 starts the runtime while the app loads: with
# `preload_app!` that happens in the Puma master, before the workers fork,
# which the cluster-mode specs use to prove each worker builds its own.
ThreadedProxy.start if ENV["THREADED_PROXY_START"] == "1"
