//! The HTTP/1.1 wire format on the origin side: the request head written,
//! the response head parsed (interim answers skipped), the framing headers
//! read, a chunk-size line parsed.

use bytes::{Buf, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use tokio::net::TcpStream;

use crate::errors::ProxyError;
use crate::headers::{self, HeaderList};
use crate::origin_url::Target;

/// Largest response head accepted (hyper's limit in `hyper_client` is the same).
const MAX_HEAD: usize = 256 * 1024;
/// Most header lines in a response head (hyper's default).
const MAX_HEADERS: usize = 100;

/// The origin's response head, as the exchange needs it.
pub struct ResponseHead {
    pub status: StatusCode,
    /// Only when it differs from the status's canonical reason.
    pub reason: Option<String>,
    pub headers: HeaderMap,
}

/// The request head: the caller's end-to-end headers, a Host header unless
/// the caller sent one, and nothing about a body (there is none).
pub(super) fn request_head(
    url: &str,
    method: &Method,
    target: &Target,
    request_headers: &HeaderList,
) -> Result<Vec<u8>, ProxyError> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.path_and_query().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut has_host = false;
    let to_origin = headers::to_origin(request_headers).map_err(|message| ProxyError::InvalidHeader {
        url: url.to_owned(),
        message,
    })?;
    for (name, value) in to_origin {
        has_host |= name.eq_ignore_ascii_case("host");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if !has_host {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(target.host_header().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(out)
}

pub(super) enum HeadError {
    /// EOF before any byte of a response: a pooled connection the origin
    /// had closed.
    ClosedEarly,
    Io(std::io::Error),
    Bad(String),
}

impl HeadError {
    pub(super) fn into_proxy_error(self, url: &str) -> ProxyError {
        match self {
            HeadError::ClosedEarly => {
                upstream(url, "origin closed the connection before answering".to_owned())
            }
            HeadError::Io(e) => upstream_io(url, "reading the response head", &e),
            HeadError::Bad(message) => upstream(url, message),
        }
    }
}

/// Reads until a final (non-1xx) response head is complete; the bytes after
/// it stay in `buf`.
pub(super) async fn read_head(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<ResponseHead, HeadError> {
    let mut seen_any = false;
    loop {
        if !buf.is_empty() {
            match parse_head(buf)? {
                Parsed::Final(head, length) => {
                    buf.advance(length);
                    return Ok(head);
                }
                // 100 Continue, 103 Early Hints: not for the client here.
                Parsed::Interim(length) => {
                    buf.advance(length);
                    continue;
                }
                Parsed::Partial if buf.len() >= MAX_HEAD => {
                    return Err(HeadError::Bad(format!(
                        "response head larger than {} KiB",
                        MAX_HEAD / 1024
                    )))
                }
                Parsed::Partial => {}
            }
        }
        buf.reserve(4096);
        match tokio::io::AsyncReadExt::read_buf(stream, buf).await {
            Ok(0) if !seen_any => return Err(HeadError::ClosedEarly),
            Ok(0) => {
                return Err(HeadError::Bad(
                    "origin closed the connection in the middle of the response head".to_owned(),
                ))
            }
            Ok(_) => seen_any = true,
            Err(e) if !seen_any && e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err(HeadError::ClosedEarly)
            }
            Err(e) => return Err(HeadError::Io(e)),
        }
    }
}

enum Parsed {
    Final(ResponseHead, usize),
    Interim(usize),
    Partial,
}

/// Parses a head from the start of `buf` (no await: the header array lives
/// on the stack, not in the exchange's future).
fn parse_head(buf: &[u8]) -> Result<Parsed, HeadError> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut storage);
    let length = match response.parse(buf) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::Bad(format!(
                "more than {MAX_HEADERS} response headers"
            )))
        }
        Err(e) => return Err(HeadError::Bad(format!("invalid response head: {e}"))),
    };
    let code = response.code.unwrap_or(0);
    // 100..=599 only (RFC 9110 §15): StatusCode takes up to 999.
    let status = StatusCode::from_u16(code)
        .ok()
        .filter(|_| code <= 599)
        .ok_or_else(|| HeadError::Bad(format!("invalid status code {code}")))?;
    if status.is_informational() {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(HeadError::Bad(
                "101 Switching Protocols without an upgrade request".to_owned(),
            ));
        }
        return Ok(Parsed::Interim(length));
    }
    let mut headers = HeaderMap::with_capacity(response.headers.len());
    for header in response.headers.iter() {
        let name = HeaderName::from_bytes(header.name.as_bytes())
            .map_err(|_| HeadError::Bad(format!("invalid header name {:?}", header.name)))?;
        let value = HeaderValue::from_bytes(header.value)
            .map_err(|_| HeadError::Bad(format!("invalid value for header {}", header.name)))?;
        headers.append(name, value);
    }
    // HTTP/1.0 answers close unless they ask to keep alive.
    if response.version == Some(0) && !has_token(&headers, http::header::CONNECTION, "keep-alive") {
        headers.append(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    let reason = response
        .reason
        .filter(|r| Some(*r) != status.canonical_reason() && !r.is_empty())
        .map(str::to_owned);
    Ok(Parsed::Final(
        ResponseHead {
            status,
            reason,
            headers,
        },
        length,
    ))
}

pub(super) fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

pub(super) fn upstream(url: &str, message: String) -> ProxyError {
    ProxyError::Upstream {
        url: url.to_owned(),
        message,
        errno: None,
    }
}

pub(super) fn upstream_io(url: &str, doing: &str, e: &std::io::Error) -> ProxyError {
    ProxyError::Upstream {
        url: url.to_owned(),
        message: format!("{doing}: {e}"),
        errno: e.raw_os_error(),
    }
}

/// `<hex digits>[SP/HTAB][;extensions]` and the line's CR (the LF is
/// not in `line`). As hyper does, the line must end in CRLF, and a CR
/// inside the extensions is refused (some recipients end lines at a bare
/// CR: a smuggling vector); NUL is refused too.
pub(super) fn parse_chunk_size(line: &[u8]) -> Result<u64, String> {
    let invalid = || format!("invalid chunk size line {:?}", String::from_utf8_lossy(line));
    let Some(line) = line.strip_suffix(b"\r") else {
        return Err(invalid());
    };
    let digits_end = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let rest = &line[digits_end..];
    let after_space = &rest[rest.iter().take_while(|&&b| b == b' ' || b == b'\t').count()..];
    let rest_ok = after_space.is_empty()
        || (after_space[0] == b';' && !after_space.iter().any(|&b| b == b'\r' || b == 0));
    if digits_end == 0 || digits_end > 16 || !rest_ok {
        return Err(invalid());
    }
    let text = std::str::from_utf8(&line[..digits_end]).map_err(|e| e.to_string())?;
    u64::from_str_radix(text, 16).map_err(|e| e.to_string())
}

pub(super) fn last_transfer_coding(headers: &HeaderMap) -> Option<String> {
    let mut last = None;
    for value in headers.get_all(http::header::TRANSFER_ENCODING) {
        let text = String::from_utf8_lossy(value.as_bytes());
        for coding in text.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            last = Some(coding.to_owned());
        }
    }
    last
}

/// The one Content-Length all values agree on.
pub(super) fn content_length(headers: &HeaderMap) -> Result<u64, String> {
    let mut length = None;
    for value in headers.get_all(http::header::CONTENT_LENGTH) {
        for part in value.to_str().unwrap_or("x").split(',') {
            let part = part.trim();
            let n = part
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| part.parse::<u64>().ok())
                .flatten()
                .ok_or_else(|| format!("invalid Content-Length {part:?}"))?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length values".to_owned());
            }
            length = Some(n);
        }
    }
    length.ok_or_else(|| "invalid Content-Length".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn chunk_size_lines() {
        assert_eq!(parse_chunk_size(b"1a\r"), Ok(26));
        assert_eq!(parse_chunk_size(b"0\r"), Ok(0));
        assert_eq!(parse_chunk_size(b"5;name=value\r"), Ok(5));
        assert_eq!(parse_chunk_size(b"5 ;ext\r"), Ok(5));
        assert_eq!(parse_chunk_size(b"5\t;a=\"q\"\r"), Ok(5));
        for bad in [
            &b"\r"[..],
            b"zz\r",
            b"5x\r",
            b"-1\r",
            b"11111111111111111\r",
            // A bare LF ends the line, a CR or NUL inside the extensions,
            // a CR before the extensions.
            b"5",
            b"5;a\rb\r",
            b"5;a\0b\r",
            b"5\r;a\r",
        ] {
            assert!(
                parse_chunk_size(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    pub(super) fn content_length_must_be_one_number() {
        assert_eq!(content_length(&map(&[("content-length", "42")])), Ok(42));
        assert_eq!(
            content_length(&map(&[("content-length", "7"), ("content-length", "7")])),
            Ok(7)
        );
        assert_eq!(content_length(&map(&[("content-length", "7, 7")])), Ok(7));
        for bad in [
            &[("content-length", "7"), ("content-length", "8")][..],
            &[("content-length", "+7")],
            &[("content-length", "")],
        ] {
            assert!(content_length(&map(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_last_transfer_coding_decides_chunked() {
        assert_eq!(
            last_transfer_coding(&map(&[("transfer-encoding", "gzip, chunked")])).as_deref(),
            Some("chunked")
        );
        assert_eq!(
            last_transfer_coding(&map(&[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "gzip")
            ]))
            .as_deref(),
            Some("gzip")
        );
        assert_eq!(last_transfer_coding(&map(&[])), None);
    }

    #[test]
    fn heads_parse_partially_interim_and_final() {
        assert!(matches!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Le"),
            Ok(Parsed::Partial)
        ));
        assert!(matches!(
            parse_head(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1"),
            Ok(Parsed::Interim(25))
        ));
        let Ok(Parsed::Final(head, length)) = parse_head(b"HTTP/1.0 299 Fine\r\nX-A: 1\r\n\r\nbody") else {
            panic!("no final head");
        };
        assert_eq!(
            (head.status.as_u16(), head.reason.as_deref(), length),
            (299, Some("Fine"), 29)
        );
        // HTTP/1.0 without keep-alive: the connection is not reused.
        assert!(has_token(&head.headers, http::header::CONNECTION, "close"));
        let Ok(Parsed::Final(head, _)) = parse_head(b"HTTP/1.1 404 Not Found\r\n\r\n") else {
            panic!("no final head");
        };
        assert_eq!(head.reason, None, "the canonical reason is not kept");
        assert!(parse_head(b"HTTP/1.1 101 Switching Protocols\r\n\r\n").is_err());
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert!(parse_head(format!("HTTP/1.1 200 OK\r\n{many}\r\n").as_bytes()).is_err());
    }
}
