//! What an exchange asks of the origin, borrowed from its spec (the body
//! goes separately: it is moved, and may be sent twice), and the request
//! as hyper sends it.

use std::time::Duration;

use bytes::Bytes;
use http::Method;

use super::body::{BodySource, RequestBody};
use super::tls::TlsSettings;
use crate::errors::ProxyError;
use crate::headers::{self, HeaderList};
use crate::origin_url::Target;

/// One request to an origin, whichever client sends it. Fields, not the
/// exchange's spec: a future holding `&ExchangeSpec` would need the spec to
/// be `Sync`, and its body source is not.
pub struct Request<'a> {
    /// Where it goes, parsed once (`origin_url::check`).
    pub target: &'a Target,
    pub method: &'a Method,
    /// The client's headers; hop-by-hop ones are dropped on the way out.
    pub headers: &'a HeaderList,
    /// The client's Upgrade protocol: sent with `Connection: upgrade`, and
    /// the origin's 101 is then an answer, not an error.
    pub upgrade: Option<&'a Bytes>,
    pub tls: &'a TlsSettings,
    /// TCP connect to the origin.
    pub connect_timeout: Duration,
    /// From sending the request to the response head, every try included
    /// (DNS and TLS as well).
    pub header_timeout: Duration,
}

impl Request<'_> {
    /// The request as hyper sends it, with `body`.
    pub fn to_hyper(&self, body: BodySource) -> Result<http::Request<RequestBody>, ProxyError> {
        let mut builder = http::Request::builder()
            .method(self.method.clone())
            .uri(self.target.uri().clone());
        let to_origin = headers::to_origin(self.headers).map_err(|message| ProxyError::InvalidHeader {
            url: self.target.url(),
            message,
        })?;
        for (name, value) in to_origin {
            builder = builder.header(name.as_str(), value.as_ref());
        }
        if let Some(protocol) = self.upgrade {
            builder = builder
                .header(http::header::UPGRADE, protocol.as_ref())
                .header(http::header::CONNECTION, "upgrade");
        }
        let body = body.into_body().map_err(|e| ProxyError::Internal {
            message: format!("cannot read the request body: {e}"),
        })?;
        builder.body(body).map_err(|e| ProxyError::InvalidHeader {
            url: self.target.url(),
            message: e.to_string(),
        })
    }
}
