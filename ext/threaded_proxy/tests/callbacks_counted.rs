//! `callbacks_run` counts every callback that answered, on every path:
//! on_headers before a relayed head and before a 101, on_response, and
//! on_error. Its own test binary: the callback queue and the stats are
//! process-wide, and this file's dispatcher thread takes every job.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use threaded_proxy::callbacks::{CallbackEvent, CallbackReply, Summary};
use threaded_proxy::exchange::{self, CallbackSet, ExchangeSpec};
use threaded_proxy::runtime;

/// An origin that answers one connection with `response` after reading
/// the request head, then waits for the proxy to close.
fn origin(response: &'static [u8]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    thread::spawn(move || {
        let Ok((mut conn, _)) = listener.accept() else {
            return;
        };
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 2 {
            line.clear();
        }
        let _ = conn.write_all(response);
        let _ = conn.shutdown(Shutdown::Write);
        let mut buf = [0u8; 64];
        while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
    });
    url
}

/// Plays the Ruby dispatcher: lets every head through, takes the default
/// answer on errors, and hands each `Finished` summary to the test.
fn dispatcher() -> mpsc::Receiver<Summary> {
    common::dispatcher(None, |event| match event {
        CallbackEvent::Headers(head) | CallbackEvent::Response(head) => Some(CallbackReply::pass(Some(head))),
        _ => Some(CallbackReply::pass(None)),
    })
}

fn callbacks_run() -> u64 {
    runtime::current()
        .unwrap()
        .stats
        .callbacks_run
        .load(Ordering::Relaxed)
}

/// Runs `spec` with a socket-pair client that reads the whole answer
/// (then closes its side, which ends a tunnel); returns what it read.
fn exchange(spec: ExchangeSpec, summaries: &mpsc::Receiver<Summary>) -> (String, Summary) {
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    exchange::start(runtime::current().unwrap(), spec, OwnedFd::from(theirs));
    let mut out = Vec::new();
    let _ = ours.read_to_end(&mut out);
    let _ = ours.shutdown(Shutdown::Write);
    let summary = summaries
        .recv_timeout(Duration::from_secs(10))
        .expect("the exchange's Finished event");
    (String::from_utf8_lossy(&out).into_owned(), summary)
}

fn with(url: &str, id: u64, callbacks: CallbackSet) -> ExchangeSpec {
    ExchangeSpec {
        callbacks: CallbackSet {
            finished: true,
            ..callbacks
        },
        ..common::get(id, url)
    }
}

#[test]
fn every_path_counts_its_callbacks() {
    let summaries = dispatcher();
    let on_headers = CallbackSet {
        on_headers: true,
        ..CallbackSet::default()
    };

    let before = callbacks_run();
    let url = origin(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    let (out, summary) = exchange(with(&url, 1, on_headers), &summaries);
    assert!(
        out.starts_with("HTTP/1.1 200 OK\r\n") && out.ends_with("ok"),
        "{out}"
    );
    assert!(summary.error.is_none(), "{:?}", summary.error);
    assert_eq!(callbacks_run() - before, 1, "on_headers before a relayed head");

    let before = callbacks_run();
    let url =
        origin(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n");
    let spec = ExchangeSpec {
        upgrade: Some(Bytes::from_static(b"websocket")),
        ..with(&url, 2, on_headers)
    };
    let (out, summary) = exchange(spec, &summaries);
    assert!(out.starts_with("HTTP/1.1 101 Switching Protocols\r\n"), "{out}");
    assert_eq!(summary.status, Some(101));
    assert_eq!(callbacks_run() - before, 1, "on_headers before a 101");

    let before = callbacks_run();
    let url = origin(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    let on_response = CallbackSet {
        on_response: true,
        ..CallbackSet::default()
    };
    let (out, _) = exchange(with(&url, 3, on_response), &summaries);
    assert!(out.ends_with("ok"), "{out}");
    assert_eq!(callbacks_run() - before, 1, "on_response");

    let before = callbacks_run();
    // Closes without a byte: a 502 before anything was sent.
    let url = origin(b"");
    let on_error = CallbackSet {
        on_error: true,
        ..CallbackSet::default()
    };
    let (out, summary) = exchange(with(&url, 4, on_error), &summaries);
    assert!(out.starts_with("HTTP/1.1 502 "), "{out}");
    assert!(summary.error.is_some());
    assert_eq!(callbacks_run() - before, 1, "on_error");
}
