//! The origin side of an exchange: one [`Upstream::send`] that picks the
//! client (the gem's own HTTP/1.1 client for bodiless plain-http requests,
//! pooled hyper-util clients for everything else) and returns one
//! [`Response`] type whichever answered.
//!
//! Modules (none imports this parent, so there is no import cycle; the
//! response types live here because they join the two clients):
//! - `request`: what the exchange asks for, and its hyper form.
//! - `hyper_client`: the pooled hyper-util clients and their retry.
//! - `tls`: TLS settings and the rustls config (and the accept-any verifier).
//! - `http1`: the gem's own HTTP/1.1 client (`pool`, `codec`, `body`).
//! - `body`: request-body sources and the body type both clients send.
//! - `error`: what a hyper error means (kind, status, retry).

pub mod body;
pub mod error;
pub mod http1;
pub mod hyper_client;
pub mod request;
pub mod tls;

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame, SizeHint};

pub use body::{BodySource, BoxError, ChunkReader, RequestBody};
pub use http1::PlainBody;
pub use request::Request;
pub use tls::TlsSettings;

use crate::errors::ProxyError;
use http1::Http1Pool;
use hyper_client::HyperClients;

/// The process's origin clients and their pools.
pub struct Upstream {
    /// hyper-util clients, one per TLS settings and connect timeout.
    pub hyper: HyperClients,
    /// The gem's own HTTP/1.1 pool for bodiless plain-http requests.
    pub http1: Http1Pool,
}

impl Upstream {
    /// Empty pools; hyper clients are built on first use.
    pub fn new(pool_idle_timeout: Duration, pool_max_idle_per_host: usize) -> Self {
        Upstream {
            hyper: HyperClients::new(pool_idle_timeout, pool_max_idle_per_host),
            http1: Http1Pool::new(pool_idle_timeout, pool_max_idle_per_host),
        }
    }

    /// Sends the request and waits for the origin's final response head
    /// (within the header timeout): on the gem's own HTTP/1.1 connection
    /// when it serves the request (`http1::serves`), else through hyper.
    /// A status above 599, and a 101 nobody asked for, are a 502 from
    /// either client.
    pub async fn send(&self, request: &Request<'_>, body: BodySource) -> Result<Response, ProxyError> {
        let (target, url) = (request.target, &*request.target.url());
        if http1::serves(
            target,
            request.method,
            !body.is_empty(),
            request.upgrade.is_some(),
        ) {
            let send = self
                .http1
                .send(target, request.method, request.headers, request.connect_timeout);
            let (head, body) = tokio::time::timeout(request.header_timeout, send)
                .await
                .map_err(|_| error::waiting_for_headers(url))??;
            return Ok(Response {
                status: head.status,
                reason: head.reason,
                headers: head.headers,
                body: OriginBody::Plain(body),
                upgrade: None,
            });
        }
        let mut response = self.hyper.send(request, body).await?;
        let status = response.status();
        let invalid = |message: String| ProxyError::Upstream {
            url: url.to_owned(),
            message,
            errno: None,
        };
        if status.as_u16() > 599 {
            // hyper takes up to 999; the gem's own client refuses these too.
            return Err(invalid(format!("invalid status code {}", status.as_u16())));
        }
        let upgrade = if status == StatusCode::SWITCHING_PROTOCOLS {
            if request.upgrade.is_none() {
                // The gem's own client refuses it too (`http1::codec`).
                return Err(invalid(
                    "101 Switching Protocols without an upgrade request".to_owned(),
                ));
            }
            Some(hyper::upgrade::on(&mut response))
        } else {
            None
        };
        let (parts, body) = response.into_parts();
        let reason = parts
            .extensions
            .get::<hyper::ext::ReasonPhrase>()
            .filter(|_| upgrade.is_none())
            .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned());
        Ok(Response {
            status: parts.status,
            reason,
            headers: parts.headers,
            body: OriginBody::Hyper(body),
            upgrade,
        })
    }
}

/// The origin's final answer, from either client.
pub struct Response {
    pub status: StatusCode,
    /// The reason phrase, when the origin sent one (the gem's own client
    /// keeps it only when it differs from the canonical one).
    pub reason: Option<String>,
    /// As received, hop-by-hop headers included.
    pub headers: HeaderMap,
    pub body: OriginBody,
    /// A 101 to the client's upgrade: the origin connection, once hyper
    /// hands it over, for the tunnel.
    pub upgrade: Option<hyper::upgrade::OnUpgrade>,
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
