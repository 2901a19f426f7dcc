//! What the black-box tests share: a plain GET exchange to vary with
//! struct-update syntax.

use std::time::Duration;

use threaded_proxy::exchange::{CallbackSet, ExchangeSpec, Timeouts};
use threaded_proxy::headers::ClientRequest;
use threaded_proxy::origin::{BodySource, TlsSettings};
use threaded_proxy::origin_url::{self, Kind};

/// A GET of `url` for an HTTP/1.1 client: no headers, no callbacks,
/// 2 s to connect, 5 s for the head and between reads.
pub fn get(id: u64, url: &str) -> ExchangeSpec {
    ExchangeSpec {
        id,
        method: http::Method::GET,
        target: origin_url::check(url, Kind::Http).expect("a valid test URL"),
        headers: vec![],
        body: BodySource::Empty,
        client: ClientRequest {
            head_only: false,
            http10: false,
        },
        callbacks: CallbackSet::default(),
        timeouts: Timeouts {
            connect: Duration::from_secs(2),
            header: Duration::from_secs(5),
            idle: Duration::from_secs(5),
        },
        tls: TlsSettings::default(),
        max_buffered_body: 1 << 20,
        upgrade: None,
        tunnel: None,
    }
}
