//! Admission: the permit (connection caps, descriptor budget) an exchange
//! must hold before it touches the origin, and what running out of
//! descriptors means.

use std::sync::atomic::Ordering::Relaxed;

use super::ExchangeSpec;
use crate::errors::ProxyError;
use crate::limits::{self, Permit};
use crate::origin::BodySource;
use crate::runtime::Proxy;

/// Descriptors the exchange holds from its start: the client's duplicate,
/// the origin socket, and a request body file if it streams one.
pub fn exchange_fds(spec: &ExchangeSpec) -> usize {
    limits::EXCHANGE_FDS + usize::from(matches!(spec.body, BodySource::File { .. }))
}

/// Admission for an exchange that has not started: a permit, or the
/// overload error to answer with.
pub fn admit(proxy: &'static Proxy, spec: &ExchangeSpec) -> Result<Permit<'static>, ProxyError> {
    if !proxy.accepting() {
        return Err(ProxyError::Overload {
            url: spec.target.url(),
            message: "shutting down".to_owned(),
        });
    }
    proxy
        .limits
        .try_acquire(&spec.target.origin_key(), exchange_fds(spec))
        .map_err(|message| {
            proxy.stats.rejected.fetch_add(1, Relaxed);
            ProxyError::Overload {
                url: spec.target.url(),
                message: message.to_owned(),
            }
        })
}

/// No descriptor left for the origin socket: an overload of this process
/// (503 with Retry-After), not a fault of the origin (502).
pub(super) fn fds_exhausted(err: ProxyError) -> ProxyError {
    if !limits::out_of_fds(err.errno()) {
        return err;
    }
    ProxyError::Overload {
        url: err.url().unwrap_or_default().to_owned(),
        message: format!("out of file descriptors: {err}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_descriptors_at_the_origin_is_an_overload_not_a_bad_gateway() {
        let emfile = fds_exhausted(ProxyError::Connect {
            url: "http://a.test/".into(),
            message: "Too many open files".into(),
            errno: Some(libc::EMFILE),
        });
        assert_eq!((emfile.status(), emfile.url()), (503, Some("http://a.test/")));
        let refused = fds_exhausted(ProxyError::Connect {
            url: "u".into(),
            message: "refused".into(),
            errno: Some(libc::ECONNREFUSED),
        });
        assert_eq!(refused.status(), 502);
    }
}
