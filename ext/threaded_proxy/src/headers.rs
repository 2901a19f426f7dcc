//! Header rules shared by both directions: hop-by-hop filtering, validation,
//! framing decisions and writing the response head the client receives.

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, StatusCode};

/// A header as it crosses the Ruby boundary: a name and raw value bytes.
/// A list (not a map) so repeated headers such as Set-Cookie stay separate.
pub type HeaderList = Vec<(String, Bytes)>;

/// Headers that describe one connection, never the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "trailer",
    "proxy-authenticate",
    "proxy-authorization",
];

/// The list itself (lowercase), for Ruby, which leaves the same headers
/// out of the client request headers it forwards (`Native.hop_by_hop_headers`).
pub fn hop_by_hop() -> &'static [&'static str] {
    &HOP_BY_HOP
}

pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// Names listed in `Connection` headers: those are hop-by-hop too.
fn connection_tokens(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// The end-to-end headers of an origin response, in order, repeated ones kept.
pub fn end_to_end(headers: &HeaderMap) -> HeaderList {
    let named = connection_tokens(headers);
    headers
        .iter()
        .filter(|(name, _)| {
            let name = name.as_str();
            !is_hop_by_hop(name) && !named.iter().any(|n| n == name)
        })
        .map(|(name, value)| (name.as_str().to_owned(), Bytes::copy_from_slice(value.as_bytes())))
        .collect()
}

/// Refuses names that are not HTTP tokens and values with CR, LF or NUL, so
/// nothing a callback or an option supplies can split a message.
pub fn validate(name: &str, value: &[u8]) -> Result<(), String> {
    if name.is_empty() || !name.bytes().all(is_token_byte) {
        return Err(format!("header name {name:?} is not a valid HTTP token"));
    }
    if let Some(bad) = value.iter().find(|b| matches!(b, b'\r' | b'\n' | b'\0')) {
        return Err(format!(
            "header {name} has a forbidden byte 0x{bad:02x} in its value"
        ));
    }
    Ok(())
}

/// Checks every header of a list; the error names the first bad one.
pub fn validate_all(list: &HeaderList) -> Result<(), String> {
    list.iter().try_for_each(|(name, value)| validate(name, value))
}

/// The caller's request headers that go to the origin, once all are
/// checked: framing and hop-by-hop ones are left out (the body decides the
/// framing; connection headers are the proxy's), and so is `Expect`: the
/// app server has already answered the client's `100-continue` and read
/// the body, and neither origin client waits for a 100 before sending it,
/// so a strict origin would answer 417 to a forwarded one. The one place
/// every request's headers pass, whoever supplied them (forward_headers,
/// reverse_proxy, the headers option).
pub fn to_origin(list: &HeaderList) -> Result<impl Iterator<Item = &(String, Bytes)>, String> {
    validate_all(list)?;
    Ok(list
        .iter()
        .filter(|(name, _)| !is_framing_header(name) && !name.eq_ignore_ascii_case("expect")))
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// How the body reaches the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body at all (HEAD, 1xx, 204, 304).
    None,
    /// Exactly this many bytes, announced by Content-Length.
    Length(u64),
    /// Chunked transfer coding (HTTP/1.1 clients, length unknown).
    Chunked,
    /// The body ends when the connection closes (HTTP/1.0 clients).
    Close,
}

/// What the client asked, needed to frame the answer.
#[derive(Debug, Clone, Copy)]
pub struct ClientRequest {
    pub head_only: bool,
    pub http10: bool,
}

/// Chooses the framing for a response body of `length` (None = unknown).
pub fn framing(status: u16, client: ClientRequest, length: Option<u64>) -> Framing {
    if client.head_only || (100..200).contains(&status) || status == 204 || status == 304 {
        return Framing::None;
    }
    match length {
        Some(n) => Framing::Length(n),
        None if client.http10 => Framing::Close,
        None => Framing::Chunked,
    }
}

/// True for headers the proxy owns on the client side: the caller's values
/// are replaced by the proxy's own framing.
fn is_framing_header(name: &str) -> bool {
    name.eq_ignore_ascii_case("content-length") || is_hop_by_hop(name)
}

/// Writes `HTTP/1.1 <status> <reason>`, the headers, framing and
/// `Connection: close`. `head_length` is the Content-Length kept for bodiless
/// HEAD and 304 answers.
pub fn write_head(
    buf: &mut BytesMut,
    status: u16,
    reason: Option<&str>,
    headers: &HeaderList,
    framing: Framing,
    head_length: Option<u64>,
) {
    let reason = reason
        .filter(|r| !r.is_empty() && r.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)))
        .or_else(|| {
            StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
        })
        .unwrap_or("Unknown");
    buf.reserve(256 + headers.iter().map(|(n, v)| n.len() + v.len() + 4).sum::<usize>());
    buf.put_slice(b"HTTP/1.1 ");
    buf.put_slice(status.to_string().as_bytes());
    buf.put_u8(b' ');
    buf.put_slice(reason.as_bytes());
    buf.put_slice(b"\r\n");
    put_headers(buf, headers);
    match framing {
        Framing::Length(n) => {
            buf.put_slice(b"content-length: ");
            buf.put_slice(n.to_string().as_bytes());
            buf.put_slice(b"\r\n");
        }
        Framing::Chunked => buf.put_slice(b"transfer-encoding: chunked\r\n"),
        Framing::None => {
            if let Some(n) = head_length {
                if status != 204 && !(100..200).contains(&status) {
                    buf.put_slice(b"content-length: ");
                    buf.put_slice(n.to_string().as_bytes());
                    buf.put_slice(b"\r\n");
                }
            }
        }
        Framing::Close => {}
    }
    buf.put_slice(b"connection: close\r\n\r\n");
}

/// Writes `name: value` lines, leaving out the headers the proxy owns.
fn put_headers(buf: &mut BytesMut, headers: &HeaderList) {
    for (name, value) in headers {
        if is_framing_header(name) {
            continue;
        }
        buf.put_slice(name.as_bytes());
        buf.put_slice(b": ");
        buf.put_slice(value);
        buf.put_slice(b"\r\n");
    }
}

/// The head of a `101 Switching Protocols` (or `200` for CONNECT) that
/// starts a tunnel: the given headers minus hop-by-hop ones, then the
/// Upgrade and `Connection: upgrade` pair when switching protocols.
pub fn write_switch_head(buf: &mut BytesMut, status: u16, headers: &HeaderList, upgrade: Option<&[u8]>) {
    let reason = StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Switching Protocols");
    buf.put_slice(format!("HTTP/1.1 {status} {reason}\r\n").as_bytes());
    put_headers(buf, headers);
    if let Some(protocol) = upgrade {
        buf.put_slice(b"upgrade: ");
        buf.put_slice(protocol);
        buf.put_slice(b"\r\nconnection: upgrade\r\n");
    }
    buf.put_slice(b"\r\n");
}

/// Origin responses whose framing is ambiguous are refused (request
/// smuggling): both Content-Length and Transfer-Encoding.
pub fn ambiguous_framing(headers: &HeaderMap) -> bool {
    headers.contains_key(http::header::CONTENT_LENGTH)
        && headers.contains_key(http::header::TRANSFER_ENCODING)
}

/// Transfer codings other than one final `chunked` (RFC 9112 §6.3): with
/// chunked not final the body would run until close, still encoded, and
/// no coding but chunked is decoded here; the client would get the raw
/// framing as the body. Such a response is refused by both origin clients.
pub fn unsupported_transfer_coding(headers: &HeaderMap) -> bool {
    let mut codings = headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|c| c.trim_ascii())
        .filter(|c| !c.is_empty());
    match (codings.next(), codings.next()) {
        (None, _) => headers.contains_key(http::header::TRANSFER_ENCODING),
        (Some(only), None) => !only.eq_ignore_ascii_case(b"chunked"),
        (Some(_), Some(_)) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn list(pairs: &[(&str, &str)]) -> HeaderList {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), Bytes::copy_from_slice(v.as_bytes())))
            .collect()
    }

    fn head(
        status: u16,
        reason: Option<&str>,
        headers: &HeaderList,
        framing: Framing,
        len: Option<u64>,
    ) -> String {
        let mut buf = BytesMut::new();
        write_head(&mut buf, status, reason, headers, framing, len);
        String::from_utf8(buf.to_vec()).unwrap()
    }

    #[test]
    fn end_to_end_drops_hop_by_hop_and_connection_named_headers() {
        let mut map = HeaderMap::new();
        map.append("content-type", HeaderValue::from_static("text/plain"));
        map.append("connection", HeaderValue::from_static("keep-alive, X-Secret"));
        map.append("keep-alive", HeaderValue::from_static("timeout=5"));
        map.append("transfer-encoding", HeaderValue::from_static("chunked"));
        map.append("x-secret", HeaderValue::from_static("1"));
        map.append("set-cookie", HeaderValue::from_static("a=1"));
        map.append("set-cookie", HeaderValue::from_static("b=2"));
        let kept = end_to_end(&map);
        let names: Vec<&str> = kept.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["content-type", "set-cookie", "set-cookie"]);
        assert_eq!(kept[1].1, "a=1");
        assert_eq!(kept[2].1, "b=2");
    }

    #[test]
    fn to_origin_leaves_out_framing_hop_by_hop_and_expect() {
        let given = list(&[
            ("Accept", "*/*"),
            ("Expect", "100-continue"),
            ("content-length", "5"),
            ("Transfer-Encoding", "chunked"),
            ("Connection", "close"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Proxy-Authorization", "Basic x"),
            ("X-Mine", "1"),
        ]);
        let sent: Vec<&str> = to_origin(&given).unwrap().map(|(n, _)| n.as_str()).collect();
        assert_eq!(sent, ["Accept", "X-Mine"]);
    }

    #[test]
    fn validate_refuses_crlf_nul_and_bad_names() {
        assert!(validate("X-Ok", b"fine value\t1").is_ok());
        assert!(validate("X-Bad", b"a\r\nInjected: 1").is_err());
        assert!(validate("X-Bad", b"a\nb").is_err());
        assert!(validate("X-Bad", b"a\0b").is_err());
        assert!(validate("Bad Name", b"x").is_err());
        assert!(validate("Bad:Name", b"x").is_err());
        assert!(validate("", b"x").is_err());
    }

    #[test]
    fn framing_follows_method_status_and_length() {
        let get11 = ClientRequest {
            head_only: false,
            http10: false,
        };
        let get10 = ClientRequest {
            head_only: false,
            http10: true,
        };
        let head = ClientRequest {
            head_only: true,
            http10: false,
        };
        assert_eq!(framing(200, get11, Some(5)), Framing::Length(5));
        assert_eq!(framing(200, get11, None), Framing::Chunked);
        assert_eq!(framing(200, get10, None), Framing::Close);
        assert_eq!(framing(200, head, Some(5)), Framing::None);
        assert_eq!(framing(204, get11, None), Framing::None);
        assert_eq!(framing(304, get11, Some(9)), Framing::None);
        assert_eq!(framing(101, get11, None), Framing::None);
    }

    #[test]
    fn head_has_status_line_headers_framing_and_close() {
        let h = list(&[
            ("Content-Type", "text/plain"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("Content-Length", "99"),
            ("Connection", "keep-alive"),
        ]);
        assert_eq!(
            head(200, None, &h, Framing::Length(5), None),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\ncontent-length: 5\r\nconnection: close\r\n\r\n"
        );
        assert_eq!(
            head(404, Some("Nope"), &list(&[]), Framing::Chunked, None),
            "HTTP/1.1 404 Nope\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        );
    }

    #[test]
    fn head_keeps_length_for_head_and_304_but_not_204() {
        assert!(head(200, None, &list(&[]), Framing::None, Some(7)).contains("content-length: 7\r\n"));
        assert!(head(304, None, &list(&[]), Framing::None, Some(7)).contains("content-length: 7\r\n"));
        assert!(!head(204, None, &list(&[]), Framing::None, Some(7)).contains("content-length"));
    }

    #[test]
    fn head_replaces_unsafe_or_missing_reasons() {
        assert!(head(599, None, &list(&[]), Framing::None, None).starts_with("HTTP/1.1 599 Unknown\r\n"));
        assert!(head(502, Some("bad\r\nX: y"), &list(&[]), Framing::None, None)
            .starts_with("HTTP/1.1 502 Bad Gateway\r\n"));
        assert!(head(200, Some("Fine Thanks"), &list(&[]), Framing::None, None)
            .starts_with("HTTP/1.1 200 Fine Thanks\r\n"));
    }

    #[test]
    fn switch_head_names_the_protocol_and_drops_hop_by_hop() {
        let mut buf = BytesMut::new();
        let h = list(&[
            ("Sec-WebSocket-Accept", "abc"),
            ("Connection", "close"),
            ("Upgrade", "h2c"),
        ]);
        write_switch_head(&mut buf, 101, &h, Some(b"websocket"));
        assert_eq!(
            String::from_utf8(buf.to_vec()).unwrap(),
            "HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: abc\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
        );
        let mut buf = BytesMut::new();
        write_switch_head(&mut buf, 200, &list(&[]), None);
        assert_eq!(&buf[..], b"HTTP/1.1 200 OK\r\n\r\n");
    }

    #[test]
    fn only_a_lone_chunked_transfer_coding_is_relayed() {
        let te = |values: &[&'static str]| {
            let mut map = HeaderMap::new();
            for v in values {
                map.append("transfer-encoding", HeaderValue::from_static(v));
            }
            unsupported_transfer_coding(&map)
        };
        assert!(!te(&[]));
        assert!(!te(&["chunked"]));
        assert!(!te(&["Chunked "]));
        for bad in [
            &["chunked, identity"][..],
            &["gzip, chunked"],
            &["gzip"],
            &["chunked", "chunked"],
            &["identity"],
            &[""],
        ] {
            assert!(te(bad), "{bad:?}");
        }
    }

    #[test]
    fn ambiguous_framing_is_detected() {
        let mut map = HeaderMap::new();
        map.append("content-length", HeaderValue::from_static("5"));
        assert!(!ambiguous_framing(&map));
        map.append("transfer-encoding", HeaderValue::from_static("chunked"));
        assert!(ambiguous_framing(&map));
    }
}
