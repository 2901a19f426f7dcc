//! The origin side of an exchange: the two clients that fetch it (the
//! gem's own HTTP/1.1 client for bodiless plain-http requests, pooled
//! hyper-util clients for everything else) and the response body type
//! both hand back.
//!
//! Module map (each imports only modules below it, never its parent):
//! - `hyper_client`: the pooled hyper-util clients.
//! - `tls`: TLS settings and the rustls config (and the accept-any verifier).
//! - `http1`: the gem's own HTTP/1.1 client (pool, codec, body).
//! - `body`: request-body sources and the body type both clients send.
//! - `error`: what a hyper error means (kind, status, retry).

pub mod body;
pub mod error;
pub mod http1;
pub mod hyper_client;
pub mod tls;

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

pub use body::{BodySource, BoxError, ChunkReader, RequestBody};
pub use http1::PlainBody;
pub use tls::TlsSettings;

use http1::Http1Pool;
use hyper_client::HyperClients;

/// The process's origin clients and their pools.
pub struct Clients {
    /// hyper-util clients, one per TLS settings and connect timeout.
    pub hyper: HyperClients,
    /// The gem's own HTTP/1.1 pool for bodiless plain-http requests.
    pub http1: Http1Pool,
}

impl Clients {
    pub fn new(pool_idle_timeout: Duration, pool_max_idle_per_host: usize) -> Self {
        Clients {
            hyper: HyperClients::new(pool_idle_timeout, pool_max_idle_per_host),
            http1: Http1Pool::new(pool_idle_timeout, pool_max_idle_per_host),
        }
    }
}

/// An origin's response body, from hyper or from the gem's own HTTP/1.1
/// connection.
pub enum OriginBody {
    Hyper(hyper::body::Incoming),
    Plain(PlainBody),
}

impl Body for OriginBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            OriginBody::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            OriginBody::Plain(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            OriginBody::Hyper(body) => body.is_end_stream(),
            OriginBody::Plain(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            OriginBody::Hyper(body) => body.size_hint(),
            OriginBody::Plain(body) => body.size_hint(),
        }
    }
}
