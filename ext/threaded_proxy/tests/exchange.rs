//! Black-box tests of whole exchanges without Ruby: a scripted origin on
//! 127.0.0.1 port 0, a Unix socket pair standing in for the hijacked client,
//! and a plain thread standing in for the Ruby callback dispatcher.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use threaded_proxy::callbacks::{CallbackEvent, CallbackReply};
use threaded_proxy::exchange::{self, CallbackSet, ExchangeSpec, Timeouts};
use threaded_proxy::runtime;

/// An origin that answers each connection with `response` (after reading
/// the request head) and reports when the peer closed.
struct Origin {
    url: String,
    closed: mpsc::Receiver<()>,
}

fn origin(response: &'static [u8], hold_open: bool) -> Origin {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (closed_tx, closed) = mpsc::channel();
    thread::spawn(move || {
        for conn in listener.incoming().take(4) {
            let Ok(mut conn) = conn else { return };
            let closed_tx = closed_tx.clone();
            thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 2 {
                    line.clear();
                }
                let _ = conn.write_all(response);
                if hold_open {
                    // Wait for the proxy to go away, then report it.
                    let mut buf = [0u8; 64];
                    while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
                    let _ = closed_tx.send(());
                }
            });
        }
    });
    Origin { url, closed }
}

fn spec(url: &str, callbacks: CallbackSet, header_timeout: Duration) -> ExchangeSpec {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let base = common::get(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed), url);
    ExchangeSpec {
        headers: vec![("x-test".into(), Bytes::from_static(b"1"))],
        callbacks,
        timeouts: Timeouts {
            header: header_timeout,
            idle: Duration::from_secs(2),
            ..base.timeouts
        },
        ..base
    }
}

/// Starts an exchange whose client is one end of a socket pair; returns
/// the other end.
fn start(spec: ExchangeSpec) -> UnixStream {
    let (ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let proxy = runtime::current().unwrap();
    exchange::start(proxy, spec, OwnedFd::from(theirs));
    ours
}

fn read_all(mut client: UnixStream) -> String {
    let mut out = Vec::new();
    let _ = client.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn relays_a_content_length_response_with_connection_close() {
    let origin = origin(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nKeep-Alive: timeout=5\r\nX-Origin: yes\r\n\r\nhello",
        false,
    );
    let out = read_all(start(spec(
        &origin.url,
        CallbackSet::default(),
        Duration::from_secs(5),
    )));
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(out.contains("x-origin: yes\r\n"), "{out}");
    assert!(out.contains("content-length: 5\r\n"), "{out}");
    assert!(out.contains("connection: close\r\n"), "{out}");
    assert!(!out.to_ascii_lowercase().contains("keep-alive"), "{out}");
    assert!(out.ends_with("\r\n\r\nhello"), "{out}");
}

#[test]
fn rechunks_a_chunked_origin_body() {
    let origin = origin(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        false,
    );
    let out = read_all(start(spec(
        &origin.url,
        CallbackSet::default(),
        Duration::from_secs(5),
    )));
    assert!(out.contains("transfer-encoding: chunked\r\n"), "{out}");
    assert!(out.ends_with("0\r\n\r\n"), "{out}");
    let body: String = out
        .split("\r\n\r\n")
        .nth(1)
        .unwrap()
        .split("\r\n")
        .filter(|s| s.chars().all(|c| c.is_ascii_lowercase()))
        .collect();
    assert_eq!(body, "abcde");
}

#[test]
fn a_body_cut_by_the_origin_never_ends_cleanly() {
    let origin = origin(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        false,
    );
    let out = read_all(start(spec(
        &origin.url,
        CallbackSet::default(),
        Duration::from_secs(5),
    )));
    assert!(out.contains("3\r\nabc\r\n"), "{out}");
    assert!(
        !out.ends_with("0\r\n\r\n"),
        "a truncated body got a last chunk: {out}"
    );
}

#[test]
fn refused_connections_answer_502_and_silence_answers_504() {
    let refused = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let out = read_all(start(spec(
        &refused,
        CallbackSet::default(),
        Duration::from_secs(5),
    )));
    assert!(out.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{out}");
    assert!(out.contains("x-threaded-proxy-error: connect"), "{out}");

    // Accepts and reads, never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let out = read_all(start(spec(
        &url,
        CallbackSet::default(),
        Duration::from_millis(200),
    )));
    assert!(out.starts_with("HTTP/1.1 504 Gateway Timeout\r\n"), "{out}");
    drop(silent);
}

#[test]
fn conflicting_framing_is_refused_with_502() {
    let origin = origin(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        false,
    );
    let out = read_all(start(spec(
        &origin.url,
        CallbackSet::default(),
        Duration::from_secs(5),
    )));
    assert!(out.starts_with("HTTP/1.1 502 "), "{out}");
}

#[test]
fn a_client_that_leaves_cancels_the_origin_request() {
    // Headers, then a body that never comes: the exchange waits mid-body.
    let origin = origin(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nab", true);
    let mut client = start(spec(&origin.url, CallbackSet::default(), Duration::from_secs(5)));
    let mut head = [0u8; 16];
    client.read_exact(&mut head).unwrap();
    drop(client);
    origin
        .closed
        .recv_timeout(Duration::from_secs(3))
        .expect("the origin connection was not closed after the client left");
}

#[test]
fn callbacks_change_headers_and_the_finished_event_reports_the_exchange() {
    let origin = origin(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Drop: 1\r\n\r\nok",
        false,
    );
    let callbacks = CallbackSet {
        on_headers: true,
        finished: true,
        ..CallbackSet::default()
    };
    let spec = spec(&origin.url, callbacks, Duration::from_secs(5));
    // Plays the Ruby dispatcher for this exchange's jobs.
    let summaries = common::dispatcher(Some(spec.id), |event| match event {
        CallbackEvent::Headers(mut head) => {
            head.headers.retain(|(n, _)| n != "x-drop");
            head.headers.push(("x-added".into(), Bytes::from_static(b"yes")));
            head.status = 201;
            Some(CallbackReply::Continue(head))
        }
        _ => None,
    });
    let out = read_all(start(spec));
    assert!(out.starts_with("HTTP/1.1 201 Created\r\n"), "{out}");
    assert!(out.contains("x-added: yes\r\n"), "{out}");
    assert!(!out.contains("x-drop"), "{out}");
    let summary = summaries.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(summary.status, Some(201));
    assert!(summary.error.is_none(), "{:?}", summary.error);
    assert_eq!(summary.bytes_from_origin, 2);
    assert_eq!(summary.bytes_to_client as usize, out.len());
}

#[test]
fn the_head_does_not_wait_for_a_slow_first_body_chunk() {
    // The origin sends its head, and its body only once the client has
    // seen that head: a proxy holding the head for the body never gets it.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (head_seen_tx, head_seen) = mpsc::channel::<()>();
    thread::spawn(move || {
        let Ok((mut conn, _)) = listener.accept() else {
            return;
        };
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 2 {
            line.clear();
        }
        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        if head_seen.recv_timeout(Duration::from_secs(10)).is_ok() {
            let _ = conn.write_all(b"5\r\nhello\r\n0\r\n\r\n");
        }
    });
    let mut client = start(spec(&url, CallbackSet::default(), Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match client.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            other => panic!(
                "the head never came ({other:?}); got {:?}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200 OK\r\n"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    head_seen_tx.send(()).unwrap();
    let rest = read_all(client);
    assert_eq!(rest, "5\r\nhello\r\n0\r\n\r\n");
}

/// An origin that reads each request whole (head and Content-Length
/// body), answers `response`, then waits for the proxy to close.
fn canned_origin(response: Vec<u8>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let response = response.clone();
            thread::spawn(move || {
                conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut length = 0;
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 2 {
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    line.clear();
                }
                let mut body = vec![0u8; length];
                if reader.read_exact(&mut body).is_err() || conn.write_all(&response).is_err() {
                    return;
                }
                let mut buf = [0u8; 1024];
                while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    url
}

/// What the client gets for `response` through the gem's own client (a
/// bodiless GET) and through hyper (a POST with a body).
fn through_both_clients(response: &[u8]) -> [(&'static str, String); 2] {
    let url = canned_origin(response.to_vec());
    let get = spec(&url, CallbackSet::default(), Duration::from_secs(5));
    let post = ExchangeSpec {
        method: http::Method::POST,
        body: threaded_proxy::origin::BodySource::Bytes(Bytes::from_static(b"posted")),
        ..spec(&url, CallbackSet::default(), Duration::from_secs(5))
    };
    [
        ("own client", read_all(start(get))),
        ("hyper", read_all(start(post))),
    ]
}

#[test]
fn both_origin_clients_answer_502_before_any_byte_for_unrelayable_heads() {
    for response in [
        // No Upgrade was asked.
        &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n"[..],
        // Chunked not final: the body would be the raw chunk framing.
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        // Outside 100..=599.
        b"HTTP/1.1 600 Beyond\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 999 Beyond\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 099 Below\r\nContent-Length: 2\r\n\r\nok",
    ] {
        for (client, out) in through_both_clients(response) {
            assert!(
                out.starts_with("HTTP/1.1 502 Bad Gateway\r\n"),
                "{client} for {:?} gave {out:?}",
                String::from_utf8_lossy(response)
            );
        }
    }
}

#[test]
fn the_own_client_checks_the_first_chunk_before_the_head_goes_out() {
    let mut huge_trailers = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n".to_vec();
    for i in 0..3000 {
        huge_trailers.extend_from_slice(format!("X-Trailer-{i}: {}\r\n", "t".repeat(20)).as_bytes());
    }
    huge_trailers.extend_from_slice(b"\r\n");
    let mut one_long_trailer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-Long: ".to_vec();
    one_long_trailer.extend(std::iter::repeat_n(b'a', 70 * 1024));
    one_long_trailer.extend_from_slice(b"\r\n\r\n");
    for response in [
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"[..],
        // A CR or NUL inside the extensions, a bare LF after the size.
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;a\rb\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;a\0b\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n",
        &huge_trailers,
        &one_long_trailer,
    ] {
        let url = canned_origin(response.to_vec());
        let out = read_all(start(spec(&url, CallbackSet::default(), Duration::from_secs(5))));
        assert!(
            out.starts_with("HTTP/1.1 502 Bad Gateway\r\n"),
            "{:?} gave {out:?}",
            String::from_utf8_lossy(&response[..response.len().min(120)])
        );
    }
    // Extensions and trailers within bounds still pass, the first chunk
    // decoded ahead included.
    let url = canned_origin(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;a=\"b\"\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n"
            .to_vec(),
    );
    let out = read_all(start(spec(&url, CallbackSet::default(), Duration::from_secs(5))));
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(out.ends_with("\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "{out}");
}
