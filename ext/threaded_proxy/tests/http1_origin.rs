//! The gem's own HTTP/1.1 origin connection (bodiless plain-http
//! requests), black-box: keep-alive reuse, a pooled connection the origin
//! closed, interim responses, chunk extensions and trailers, bad framing,
//! and Content-Length bodies moved with splice(2).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use threaded_proxy::errors::ErrorKind;
use threaded_proxy::exchange;
use threaded_proxy::runtime;

/// What the origin does with each request on a connection, in order; after
/// the last step it closes the connection.
#[derive(Clone)]
enum Step {
    Answer(Vec<u8>),
    /// Read the request, then close without answering (a keep-alive
    /// connection the origin timed out just as the proxy reused it).
    CloseAfterReading,
}

struct Origin {
    url: String,
    accepted: Arc<AtomicUsize>,
}

/// An origin on 127.0.0.1 that plays `steps` on every connection.
fn origin(steps: Vec<Step>) -> Origin {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    thread::spawn(move || {
        for conn in listener.incoming().take(8) {
            let Ok(conn) = conn else { return };
            counter.fetch_add(1, Ordering::SeqCst);
            let steps = steps.clone();
            thread::spawn(move || serve(conn, steps));
        }
    });
    Origin { url, accepted }
}

fn serve(mut conn: TcpStream, steps: Vec<Step>) {
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    for step in steps {
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line == "\r\n" => break,
                Ok(_) => {}
            }
        }
        match step {
            Step::Answer(bytes) => {
                if conn.write_all(&bytes).is_err() {
                    return;
                }
            }
            Step::CloseAfterReading => return,
        }
    }
}

fn fetch(url: &str) -> Vec<u8> {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let spec = common::get(NEXT.fetch_add(1, Ordering::Relaxed), url);
    exchange::start(runtime::current().unwrap(), spec, OwnedFd::from(theirs));
    let mut out = Vec::new();
    let _ = ours.read_to_end(&mut out);
    out
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

fn answer(response: &str) -> Step {
    Step::Answer(response.as_bytes().to_vec())
}

const OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

#[test]
fn keeps_the_origin_connection_for_the_next_request() {
    let origin = origin(vec![answer(OK), answer(OK), answer(OK)]);
    for _ in 0..3 {
        let out = text(&fetch(&format!("{}/a", origin.url)));
        assert!(
            out.starts_with("HTTP/1.1 200 OK\r\n") && out.ends_with("\r\n\r\nok"),
            "{out}"
        );
    }
    assert_eq!(origin.accepted.load(Ordering::SeqCst), 1);
}

#[test]
fn a_pooled_connection_the_origin_closed_is_replaced_by_a_fresh_one() {
    let origin = origin(vec![answer(OK), Step::CloseAfterReading]);
    let first = text(&fetch(&origin.url));
    assert!(first.ends_with("\r\n\r\nok"), "{first}");
    let second = text(&fetch(&origin.url));
    assert!(
        second.starts_with("HTTP/1.1 200 OK\r\n") && second.ends_with("\r\n\r\nok"),
        "{second}"
    );
    assert_eq!(origin.accepted.load(Ordering::SeqCst), 2);
}

#[test]
fn interim_responses_are_skipped() {
    let origin = origin(vec![answer(
        "HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    )]);
    let out = text(&fetch(&origin.url));
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(!out.to_ascii_lowercase().contains("link:"), "{out}");
    assert!(out.ends_with("\r\n\r\nok"), "{out}");
}

#[test]
fn chunk_extensions_and_trailers_are_read_and_the_connection_reused() {
    let chunked =
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;name=x\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n";
    let origin = origin(vec![answer(chunked), answer(OK)]);
    let out = text(&fetch(&origin.url));
    assert!(out.contains("\r\n\r\n5\r\nhello\r\n0\r\n\r\n"), "{out}");
    assert!(text(&fetch(&origin.url)).ends_with("ok"));
    assert_eq!(origin.accepted.load(Ordering::SeqCst), 1);
}

#[test]
fn bad_framing_from_the_origin_is_a_502() {
    for response in [
        "HTTP/1.1 200 OK\r\nContent-Length: 12abc\r\n\r\nok",
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        "HTTP/1.1 200 OK\r\nX-Bad\r\n\r\n",
        "HTTP/1.1 abc OK\r\n\r\n",
    ] {
        let origin = origin(vec![answer(response)]);
        let out = text(&fetch(&origin.url));
        assert!(out.starts_with("HTTP/1.1 502 "), "{response:?} gave {out}");
    }
}

#[test]
fn a_bad_chunk_size_cuts_the_body_without_a_last_chunk() {
    let origin = origin(vec![answer(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\nmore\r\n0\r\n\r\n",
    )]);
    let out = text(&fetch(&origin.url));
    assert!(out.contains("3\r\nabc\r\n"), "{out}");
    assert!(!out.ends_with("0\r\n\r\n"), "{out}");
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

#[test]
fn a_large_content_length_body_is_spliced_byte_for_byte() {
    const SIZE: usize = 8 << 20;
    let mut response = format!("HTTP/1.1 200 OK\r\nContent-Length: {SIZE}\r\n\r\n").into_bytes();
    response.extend(pattern(SIZE));
    let origin = origin(vec![Step::Answer(response), answer(OK)]);
    let stats = &runtime::current().unwrap().stats;
    let spliced_before = stats.bytes_spliced.load(Ordering::Relaxed);
    let out = fetch(&origin.url);
    let head_end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(text(&out[..head_end]).contains(&format!("content-length: {SIZE}\r\n")));
    assert!(
        out[head_end..] == pattern(SIZE),
        "body differs ({} bytes)",
        out.len() - head_end
    );
    let spliced = stats.bytes_spliced.load(Ordering::Relaxed) - spliced_before;
    assert!(
        spliced >= (SIZE - 64 * 1024) as u64,
        "only {spliced} bytes spliced"
    );
    // The connection went back to the pool after the spliced body.
    assert!(text(&fetch(&origin.url)).ends_with("ok"));
    assert_eq!(origin.accepted.load(Ordering::SeqCst), 1);
}

#[test]
fn a_spliced_body_cut_by_the_origin_is_an_upstream_failure_not_a_short_success() {
    const SIZE: usize = 1 << 20;
    let mut response = format!("HTTP/1.1 200 OK\r\nContent-Length: {SIZE}\r\n\r\n").into_bytes();
    response.extend(pattern(300 * 1024));
    let origin = origin(vec![Step::Answer(response)]);
    let stats = &runtime::current().unwrap().stats;
    let failed = || stats.failed[ErrorKind::Upstream.index()].load(Ordering::Relaxed);
    let failed_before = failed();
    let out = fetch(&origin.url);
    let head_end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(out.len() - head_end, 300 * 1024);
    assert!(
        failed() > failed_before,
        "the cut body was not counted as an upstream failure"
    );
}

#[test]
fn a_client_that_stops_reading_mid_splice_ends_the_exchange_and_its_origin_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (origin_gone_tx, origin_gone) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 2 {
            line.clear();
        }
        let mut conn = conn;
        let piece = vec![7u8; 1 << 20];
        let mut result =
            conn.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", 256 << 20).as_bytes());
        for _ in 0..256 {
            result = result.and_then(|()| conn.write_all(&piece));
        }
        // Fails once the proxy has dropped the connection.
        let _ = origin_gone_tx.send(result.is_err());
    });
    let (client, theirs) = UnixStream::pair().unwrap();
    let mut spec = common::get(900_001, &url);
    spec.timeouts.idle = Duration::from_millis(300);
    exchange::start(runtime::current().unwrap(), spec, OwnedFd::from(theirs));
    // The client reads nothing: the pipe and both socket buffers fill up.
    let failed = origin_gone
        .recv_timeout(Duration::from_secs(10))
        .expect("the origin was still sending 10 s after the client stopped reading");
    assert!(
        failed,
        "the origin could send the whole body to a client that reads nothing"
    );
    drop(client);
}

/// An origin whose first `pooled` connections each answer one request once
/// all of them are open (so the proxy pools that many), and which then,
/// once `drop_all` is set, reads every request and closes (or resets) its
/// connection without answering: a keep-alive timeout on all of them, or a
/// request that crashes each worker it reaches.
struct DroppingOrigin {
    url: String,
    accepted: Arc<AtomicUsize>,
    /// Requests read after `drop_all` was set.
    dropped: Arc<AtomicUsize>,
    drop_all: Arc<std::sync::atomic::AtomicBool>,
}

fn dropping_origin(pooled: usize, reset: bool) -> DroppingOrigin {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    let drop_all = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let all_open = Arc::new(std::sync::Barrier::new(pooled));
    let (counter, dropped_counter, dropping) = (accepted.clone(), dropped.clone(), drop_all.clone());
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let (dropped, dropping, all_open) = (dropped_counter.clone(), dropping.clone(), all_open.clone());
            thread::spawn(move || {
                conn.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                loop {
                    let mut line = String::new();
                    loop {
                        line.clear();
                        match reader.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" => break,
                            Ok(_) => {}
                        }
                    }
                    if dropping.load(Ordering::SeqCst) {
                        dropped.fetch_add(1, Ordering::SeqCst);
                        if reset {
                            socket2::SockRef::from(&conn)
                                .set_linger(Some(Duration::ZERO))
                                .unwrap();
                        }
                        return;
                    }
                    if n < pooled {
                        all_open.wait();
                    }
                    if conn.write_all(OK.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    DroppingOrigin {
        url,
        accepted,
        dropped,
        drop_all,
    }
}

fn fetch_spec(spec: threaded_proxy::exchange::ExchangeSpec) -> String {
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    exchange::start(runtime::current().unwrap(), spec, OwnedFd::from(theirs));
    let mut out = Vec::new();
    let _ = ours.read_to_end(&mut out);
    text(&out)
}

#[test]
fn a_request_the_origin_drops_is_sent_at_most_twice_whatever_the_pool_holds() {
    const POOLED: usize = 30;
    let mut id = 910_000;
    for (method, reset) in [
        (http::Method::GET, false),
        (http::Method::GET, true),
        (http::Method::HEAD, false),
        (http::Method::DELETE, true),
    ] {
        let origin = dropping_origin(POOLED, reset);
        let fill: Vec<_> = (0..POOLED)
            .map(|_| {
                id += 1;
                let spec = common::get(id, &origin.url);
                thread::spawn(move || fetch_spec(spec))
            })
            .collect();
        for fetch in fill {
            let out = fetch.join().unwrap();
            assert!(out.ends_with("\r\n\r\nok"), "filling the pool: {out}");
        }
        assert_eq!(origin.accepted.load(Ordering::SeqCst), POOLED);

        origin.drop_all.store(true, Ordering::SeqCst);
        id += 1;
        let head_only = method == http::Method::HEAD;
        let mut spec = common::get(id, &format!("{}/crash", origin.url));
        spec.method = method.clone();
        spec.client.head_only = head_only;
        let out = fetch_spec(spec);
        assert!(
            out.starts_with("HTTP/1.1 502 "),
            "{method} (reset {reset}): {out}"
        );
        let (sent, opened) = (
            origin.dropped.load(Ordering::SeqCst),
            origin.accepted.load(Ordering::SeqCst) - POOLED,
        );
        assert!(
            sent <= 2 && opened <= 1,
            "{method} (reset {reset}) reached the origin {sent} times on {opened} new connections"
        );
    }
}
