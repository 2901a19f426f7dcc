//! threaded-proxy's Rust core.
//!
//! A Ruby action hands over the client socket (a duplicated fd) and a plain
//! description of the exchange; a tokio task fetches the origin and writes
//! the response straight to the client. Ruby code runs only in callbacks,
//! on Ruby threads the gem owns, reached through a queue.
//!
//! # Layout
//! - `exchange`: one exchange from admission to summary (the orchestration).
//! - `upstream`: pooled hyper-util clients, TLS, request bodies, error mapping.
//! - `origin_url`: the one check and canonical form of an origin URL.
//! - `http1_origin`: the gem's own HTTP/1.1 client for bodiless plain-http
//!   requests (small idle footprint, and the socket stays ours for splice).
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
//! - `limits`, `stats`, `errors`: admission caps, counters, the error type.
//! - `metrics`: the Prometheus text exposition and latency histograms.
//! - `ruby` (feature `ruby`): the magnus bindings, the only Ruby-aware code.

pub mod callbacks;
pub mod delivery;
pub mod errors;
pub mod exchange;
pub mod handoff;
pub mod headers;
pub mod http1_origin;
pub mod limits;
pub mod metrics;
pub mod origin_url;
pub mod relay;
pub mod runtime;
pub mod splice;
pub mod stats;
pub mod tunnel;
pub mod upstream;

#[cfg(feature = "ruby")]
mod ruby;

#[cfg(feature = "ruby")]
#[magnus::init]
fn init(ruby: &magnus::Ruby) -> Result<(), magnus::Error> {
    ruby::init(ruby)
}
