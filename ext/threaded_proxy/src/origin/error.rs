//! What a hyper client error means: the `ProxyError` kind the user sees
//! (502 family or 504), and whether an HTTP/2 origin refused a request
//! unprocessed so it may go again.

use std::error::Error as StdError;

use crate::errors::ProxyError;

/// True when the origin certainly did not process the request, so it may
/// go again whatever its method (RFC 9113 §8.7): the stream was above the
/// last-stream-id of the origin's GOAWAY (h2 gives those streams, and
/// streams opened after it, the GOAWAY as their error; a stream the origin
/// had accepted gets a broken pipe instead when the connection ends), or
/// the origin reset it with REFUSED_STREAM. hyper-util retries on its own
/// only a request it never handed to a connection.
pub fn refused_unprocessed(err: &hyper_util::client::legacy::Error) -> bool {
    let mut source: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_remote()
                && (h2.is_go_away() || (h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM)));
        }
        source = e.source();
    }
    false
}

/// Maps a client error to the kind the user sees (502 family or 504).
pub fn classify(err: &hyper_util::client::legacy::Error, url: &str) -> ProxyError {
    let url = url.to_owned();
    let mut errno = None;
    let mut source: Option<&(dyn StdError + 'static)> = Some(err);
    let mut timed_out = false;
    let mut tls: Option<String> = None;
    let mut dns = false;
    while let Some(e) = source {
        // io::Error hides what it wraps from source(): hyper-rustls wraps
        // tokio-rustls's io::Error (holding the rustls::Error) in another.
        let mut wrapped: Option<&(dyn StdError + 'static)> = Some(e);
        while let Some(io) = wrapped.and_then(|w| w.downcast_ref::<std::io::Error>()) {
            errno = errno.or(io.raw_os_error());
            timed_out |= io.kind() == std::io::ErrorKind::TimedOut;
            wrapped = io.get_ref().map(|inner| inner as &(dyn StdError + 'static));
            if let Some(rustls_err) = wrapped.and_then(|w| w.downcast_ref::<rustls::Error>()) {
                tls = Some(rustls_err.to_string());
            }
        }
        if let Some(rustls_err) = e.downcast_ref::<rustls::Error>() {
            tls = Some(rustls_err.to_string());
        }
        dns |= e.to_string().contains("dns error");
        source = e.source();
    }
    let message = error_chain(err);
    if timed_out {
        return ProxyError::Timeout {
            url,
            phase: "connecting",
        };
    }
    if let Some(message) = tls {
        return ProxyError::Tls { url, message };
    }
    if err.is_connect() || dns {
        return ProxyError::Connect { url, message, errno };
    }
    ProxyError::Upstream { url, message, errno }
}

/// "a: b: c" from an error and its sources, without repeats.
pub fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut source = Some(err);
    while let Some(e) = source {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = e.source();
    }
    parts.join(": ")
}

/// No response head within the header timeout (either client).
pub fn waiting_for_headers(url: &str) -> ProxyError {
    ProxyError::Timeout {
        url: url.to_owned(),
        phase: "waiting for the response headers",
    }
}
