//! The gem's own HTTP/1.1 client for plain `http://` origins, used for
//! requests without a body (GET, HEAD, OPTIONS, DELETE: most proxied
//! traffic). Requests with a body, upgrades and https stay on hyper.
//!
//! Why not hyper here: a hyper client connection holds ~33 KiB whatever its
//! traffic (two dispatch-channel blocks, an 8 KiB write buffer, an 8 KiB read
//! buffer), which was most of an idle SSE stream's memory; and it keeps the
//! socket to itself, so a body could not be spliced (see `splice`). This
//! connection holds no buffer while it waits: the read buffer exists only
//! while bytes are in flight.
//!
//! Framing follows RFC 9112 §6.3: no body for HEAD, 1xx, 204 and 304;
//! chunked when it is the last transfer coding; else Content-Length (one
//! valid value); else until the origin closes. The exchange refuses any
//! transfer coding but a lone chunked, as it does for hyper's responses
//! (`headers::unsupported_transfer_coding`), and the start of a chunked
//! body is checked before the head is handed over (`check_start`). A
//! connection goes back to the pool only after a complete body with
//! nothing left over.
//!
//! `pool` keeps idle connections, `codec` writes the request head and
//! parses the response head and chunk-size lines, `body` reads the
//! response body off the socket.

mod body;
mod codec;
mod pool;

use std::time::Duration;

use bytes::BytesMut;
use http::Method;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

pub use body::PlainBody;
pub use codec::ResponseHead;
pub use pool::Http1Pool;

use crate::errors::ProxyError;
use crate::headers::HeaderList;
use crate::origin_url::{Scheme, Target};
use codec::{read_head, request_head, upstream, upstream_io, HeadError};

/// True when this client serves the request: plain http, no body, no
/// upgrade, and a method that may be retried on a fresh connection when a
/// pooled one turns out closed.
pub fn serves(target: &Target, method: &Method, has_body: bool, upgrade: bool) -> bool {
    !has_body
        && !upgrade
        && target.scheme() == Scheme::Http
        && matches!(
            *method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE
        )
}

impl Http1Pool {
    /// Sends a bodiless request and reads the response head.
    ///
    /// A pooled connection can turn out closed by the origin while it sat
    /// idle (a stale keep-alive): the write fails, or the origin closes or
    /// resets before any response byte. Only then, and only for an
    /// idempotent method, the request goes once more, on a new connection,
    /// never on another pooled one: an origin that drops every request
    /// (say, one that crashes the worker handling it) must see it at most
    /// twice, not once per pooled connection. A failure on a new connection
    /// is final: the origin may have processed the request.
    pub async fn send(
        &self,
        target: &Target,
        method: &Method,
        request_headers: &HeaderList,
        connect_timeout: Duration,
    ) -> Result<(ResponseHead, PlainBody), ProxyError> {
        let url = &*target.url();
        let request = request_head(url, method, target, request_headers)?;
        let mut first_try = true;
        loop {
            let pooled = if first_try {
                self.shared.take(&target.address())
            } else {
                None
            };
            let reused = pooled.is_some();
            let mut stream = match pooled {
                Some(stream) => stream,
                None => connect(target, connect_timeout).await?,
            };
            let failure = match stream.write_all(&request).await {
                Err(e) => upstream_io(url, "sending the request", &e),
                Ok(()) => {
                    let mut buf = BytesMut::new();
                    match read_head(&mut stream, &mut buf).await {
                        Ok(head) => {
                            let mut body =
                                PlainBody::new(stream, buf, method, &head, &self.shared, target.address())
                                    .map_err(|message| upstream(url, message))?;
                            body.check_start()
                                .await
                                .map_err(|message| upstream(url, message))?;
                            return Ok((head, body));
                        }
                        Err(HeadError::ClosedEarly) => HeadError::ClosedEarly.into_proxy_error(url),
                        Err(e) => return Err(e.into_proxy_error(url)),
                    }
                }
            };
            if !(first_try && reused && method.is_idempotent()) {
                return Err(failure);
            }
            // The one retry, on a new connection.
            first_try = false;
        }
    }
}

async fn connect(target: &Target, timeout: Duration) -> Result<TcpStream, ProxyError> {
    let url = &*target.url();
    let timed_out = || ProxyError::Timeout {
        url: url.to_owned(),
        phase: "connecting",
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let lookup = tokio::net::lookup_host((target.host(), target.port()));
    let addrs = match tokio::time::timeout_at(deadline, lookup).await {
        Err(_) => return Err(timed_out()),
        Ok(Err(e)) => {
            return Err(ProxyError::Connect {
                url: url.to_owned(),
                message: format!("dns error: {e}"),
                errno: None,
            })
        }
        Ok(Ok(addrs)) => addrs,
    };
    let mut last_error = None;
    for addr in addrs {
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Err(_) => return Err(timed_out()),
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => last_error = Some(e),
        }
    }
    Err(match last_error {
        Some(e) => ProxyError::Connect {
            url: url.to_owned(),
            message: format!("tcp connect error: {e}"),
            errno: e.raw_os_error(),
        },
        None => ProxyError::Connect {
            url: url.to_owned(),
            message: "dns error: no addresses".to_owned(),
            errno: None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::origin_url::{self, Kind};

    fn target(url: &str) -> Target {
        origin_url::check(url, Kind::Http).unwrap()
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_pool_timeout() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let origin = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            assert!(conn.read(&mut buf).await.unwrap() > 0);
            conn.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await.unwrap();
            // Returns when the proxy closes the pooled connection.
            while conn.read(&mut buf).await.unwrap() > 0 {}
        });
        let pool = Http1Pool::new(Duration::from_millis(100), 4);
        let (head, _body) = pool
            .send(&target(&url), &Method::GET, &Vec::new(), Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(head.status, 204);
        assert_eq!(
            pool.idle_count(),
            1,
            "a bodiless answer pools its connection at once"
        );
        tokio::time::timeout(Duration::from_secs(5), origin)
            .await
            .expect("the idle connection was never closed")
            .unwrap();
        assert_eq!(pool.idle_count(), 0);
    }

    #[test]
    fn only_bodiless_idempotent_plain_http_requests_are_served_here() {
        assert!(serves(&target("http://a/"), &Method::GET, false, false));
        assert!(serves(&target("HTTP://a/"), &Method::HEAD, false, false));
        assert!(!serves(&target("https://a/"), &Method::GET, false, false));
        assert!(!serves(&target("http://a/"), &Method::POST, false, false));
        assert!(!serves(&target("http://a/"), &Method::GET, true, false));
        assert!(!serves(&target("http://a/"), &Method::GET, false, true));
    }
}
