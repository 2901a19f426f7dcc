//! threaded-proxy's Rust core.
//!
//! A Ruby action hands over the client socket (a duplicated fd) and a plain
//! description of the exchange; a tokio task fetches the origin and writes
//! the response straight to the client. Ruby code runs only in callbacks,
//! on Ruby threads the gem owns, reached through a queue.
//!
//! # Layout
//! In the order a response's bytes go:
//! - `handoff`: the hijacked fd → a tokio stream.
//! - `exchange`: one exchange from admission to summary; `exchange/mod.rs`
//!   holds the spec, the task and the steps, in order.
//!   - `exchange::admission`: the permit (caps, descriptor budget).
//!   - `exchange::hooks`: the user's callbacks on the way: on_headers (one
//!     helper for every path, the 101 included), on_response, on_error.
//!   - `exchange::body`: the origin's body to the client, spliced or copied.
//!   - `exchange::upgrade`: a 101 from the origin, and `proxy_tunnel`.
//!   - `exchange::render`: answers the proxy writes itself (a callback's
//!     rendering, the default answer to an error).
//! - `origin`: fetching the origin: one `Upstream::send` that picks the
//!   client and returns one `origin::Response`.
//!   - `origin::request`: what the exchange asks for, and its hyper form.
//!   - `origin::hyper_client`: pooled hyper-util clients (HTTP/1.1, HTTP/2).
//!   - `origin::tls`: TLS settings, the rustls config, the accept-any verifier.
//!   - `origin::http1`: the gem's own HTTP/1.1 client for bodiless plain-http
//!     requests (small idle footprint, and the socket stays ours for splice):
//!     `pool` (idle connections, reaper), `codec` (request head, response
//!     head, chunk-size lines), `body` (the response body off the socket).
//!   - `origin::body`: request-body sources.
//!   - `origin::error`: what a hyper error means (kind, retry).
//! - `origin_url`: the one check and canonical form of an origin URL, parsed
//!   once into the `Target` (the `http::Uri`; host, port, pool and limit
//!   keys, path derived from it) that the origin clients, the limits, the
//!   metrics and the delivery worker use.
//! - `relay`: the client writer: chooses the framing, encodes the head,
//!   frames the body, bounds every write, finishes or aborts.
//! - `splice`: Content-Length bodies moved socket to socket in the kernel.
//! - `tunnel`: two-way byte copy after a 101 or for `proxy_tunnel`.
//! - `headers`: hop-by-hop rules, validation, the head's encoding.
//! - `callbacks`: the queue between tokio tasks and Ruby callback threads.
//! - `delivery`: `proxy_async`: the background worker (`delivery::worker`)
//!   and the durable queue (`delivery::store`: the trait, the SQLite and
//!   PostgreSQL backends, the header codec).
//! - `runtime`: the per-process runtime, rebuilt after fork; settings.
//! - `limits`: admission caps and the descriptor budget.
//! - `stats`: the process-wide counters, and the per-exchange `Meter` that
//!   the client writer, the splice and the tunnel count bytes through.
//! - `errors`: the error type and what Ruby gets of it.
//! - `events`: `stream_events`/`publish`: SSE streams fed from Ruby; the
//!   hub (channel → subscribers) in `events/mod.rs`.
//!   - `events::encode`: the SSE wire format, encoded once per event.
//!   - `events::replay`: the per-channel ring for `Last-Event-ID`.
//!   - `events::subscriber`: one subscriber's bounded queue.
//!   - `events::stream`: one task per stream (head, events, heartbeat, EOF).
//!   - `events::postgres`: `events_url`: NOTIFY out, LISTEN in, catch-up.
//! - `machine`: the ProxyMachine-style TCP router (`route`: buffer and ask
//!   the block; `join`: connect and join both ways).
//! - `metrics`: the Prometheus text exposition and latency histograms.
//! - `ruby` (feature `ruby`): the magnus bindings, the only Ruby-aware code.

pub mod callbacks;
pub mod delivery;
pub mod errors;
pub mod events;
pub mod exchange;
pub mod handoff;
pub mod headers;
pub mod limits;
pub mod machine;
pub mod metrics;
pub mod origin;
pub mod origin_url;
pub mod relay;
pub mod runtime;
pub mod splice;
pub mod stats;
pub mod tunnel;

#[cfg(feature = "ruby")]
mod ruby;

#[cfg(feature = "ruby")]
#[magnus::init]
fn init(ruby: &magnus::Ruby) -> Result<(), magnus::Error> {
    ruby::init(ruby)
}
