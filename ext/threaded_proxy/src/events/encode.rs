//! The Server-Sent Events wire format: the response head, one event, the
//! heartbeat. Pure functions over bytes, so every byte is unit-tested.
//!
//! An event is encoded once per publish and the same buffer goes to every
//! subscriber; nothing here may let a caller's bytes start another field:
//! CR, LF and CRLF inside data end a `data:` line (the next line gets its own
//! `data: ` prefix), and `event`/`id` values with CR, LF or NUL are refused.

use bytes::Bytes;

/// What a stream sends after `heartbeat` seconds without anything else: a
/// comment line (ignored by EventSource, keeps proxies and NAT from timing
/// the connection out, and makes a vanished client's socket error out).
pub const HEARTBEAT: &[u8] = b":\n";

/// The bytes of one event: `event:` and `id:` lines when given, one
/// `data: ` line per line of `data`, and the blank line that dispatches it.
/// Refuses an `event` or `id` holding CR, LF or NUL (the only way a field
/// value could end early or, for `id`, be ignored by the client).
pub fn event(event: Option<&str>, id: Option<&str>, data: &[u8]) -> Result<Bytes, String> {
    let mut out = Vec::with_capacity(data.len() + 16 + event.map_or(0, str::len) + id.map_or(0, str::len));
    for (field, value) in [("event", event), ("id", id)] {
        if let Some(value) = value {
            check_field(field, value)?;
            out.extend_from_slice(field.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.push(b'\n');
        }
    }
    for line in lines(data) {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.push(b'\n');
    Ok(Bytes::from(out))
}

/// Refuses a field value that could end its line or be dropped by the
/// client (EventSource ignores an `id` holding NUL).
pub fn check_field(field: &str, value: &str) -> Result<(), String> {
    if value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
        return Err(format!("{field}: must not contain CR, LF or NUL"));
    }
    Ok(())
}

/// `data` cut at every CRLF, CR or LF (the three line ends of the SSE
/// grammar); always at least one line, so empty data is one empty line.
fn lines(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < data.len() {
        match data[i] {
            b'\r' => {
                out.push(&data[start..i]);
                i += if data.get(i + 1) == Some(&b'\n') { 2 } else { 1 };
                start = i;
            }
            b'\n' => {
                out.push(&data[start..i]);
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    out.push(&data[start..]);
    out
}

/// The response head of a stream: 200, the SSE content type, no caching,
/// no proxy buffering (nginx), `connection: close` (the socket is the
/// stream), the caller's headers (checked by the caller), then the `retry:`
/// line when given.
pub fn head(retry_ms: Option<u64>, headers: &[(String, String)]) -> Bytes {
    let mut out = Vec::with_capacity(192);
    out.extend_from_slice(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
x-accel-buffering: no\r\nconnection: close\r\n",
    );
    for (name, value) in headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if let Some(ms) = retry_ms {
        out.extend_from_slice(format!("retry: {ms}\n\n").as_bytes());
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(b: Bytes) -> String {
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn plain_data_is_one_data_line_and_a_blank_line() {
        assert_eq!(text(event(None, None, b"hello").unwrap()), "data: hello\n\n");
    }

    #[test]
    fn event_and_id_come_first() {
        assert_eq!(
            text(event(Some("taskProgress"), Some("7"), b"{\"progress\":50}").unwrap()),
            "event: taskProgress\nid: 7\ndata: {\"progress\":50}\n\n"
        );
    }

    #[test]
    fn crlf_cr_and_lf_each_end_a_data_line() {
        assert_eq!(
            text(event(None, None, b"a\r\nb\rc\nd").unwrap()),
            "data: a\ndata: b\ndata: c\ndata: d\n\n"
        );
        // A line end at the end keeps the trailing empty line (the client
        // gets "x\n" back); empty data is one empty data line.
        assert_eq!(text(event(None, None, b"x\n").unwrap()), "data: x\ndata: \n\n");
        assert_eq!(text(event(None, None, b"").unwrap()), "data: \n\n");
        assert_eq!(
            text(event(None, None, b"\r\n\r\n").unwrap()),
            "data: \ndata: \ndata: \n\n"
        );
    }

    #[test]
    fn injection_through_data_stays_data() {
        assert_eq!(
            text(event(None, None, b"x\n\nevent: evil\r\nid: 666\rretry: 1").unwrap()),
            "data: x\ndata: \ndata: event: evil\ndata: id: 666\ndata: retry: 1\n\n"
        );
    }

    #[test]
    fn cr_lf_or_nul_in_event_or_id_is_refused() {
        for bad in ["a\nb", "a\rb", "a\r\n", "a\0"] {
            assert!(event(Some(bad), None, b"x").is_err(), "{bad:?}");
            assert!(event(None, Some(bad), b"x").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_head_has_the_sse_headers_then_the_callers_then_retry() {
        assert_eq!(
            text(head(None, &[])),
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
x-accel-buffering: no\r\nconnection: close\r\n\r\n"
        );
        assert_eq!(
            text(head(Some(3000), &[("x-a".into(), "1".into())])),
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
x-accel-buffering: no\r\nconnection: close\r\nx-a: 1\r\n\r\nretry: 3000\n\n"
        );
    }
}
