//! threaded-proxy's Rust core.
//!
//! A Ruby action hands over the client socket (a duplicated fd) and a plain
//! description of the exchange; a tokio task fetches the origin and writes
//! the response straight to the client. Ruby code runs only in callbacks,
//! on Ruby threads the gem owns, reached through a queue.
//!
//! # Layout
//! - `exchange`: one exchange from admission to summary (the orchestration).
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
//!   once into the `Target` (host, port, pool and limit keys, path) that
//!   the origin clients, the limits and the metrics use.
//! - `splice`: Content-Length bodies moved socket to socket in the kernel.
//! - `relay`: writing the response to the client (framing, bounds, abort).
//! - `headers`: hop-by-hop rules, validation, the response head.
//! - `handoff`: fd → tokio stream.
//! - `tunnel`: two-way byte copy after a 101 or for `proxy_tunnel`.
//! - `callbacks`: the queue between tokio tasks and Ruby callback threads.
//! - `delivery`: `proxy_async`: the background worker (`delivery::worker`)
//!   and the durable queue (`delivery::store`: the trait, the SQLite and
//!   PostgreSQL backends, the header codec).
//! - `runtime`: the per-process runtime, rebuilt after fork; settings.
//! - `machine`: the ProxyMachine-style TCP router (`route`: buffer and ask
//!   the block; `join`: connect and join both ways).
//! - `limits`, `stats`, `errors`: admission caps, counters, the error type.
//! - `metrics`: the Prometheus text exposition and latency histograms.
//! - `ruby` (feature `ruby`): the magnus bindings, the only Ruby-aware code.

pub mod callbacks;
pub mod delivery;
pub mod errors;
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
