//! HTTP/2 to https origins is negotiated through ALPN, and one origin
//! connection carries many exchanges.

mod common;

use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use threaded_proxy::exchange::{self, ExchangeSpec};
use threaded_proxy::origin::{BodySource, TlsSettings};
use threaded_proxy::runtime;

/// Serves h2 only (ALPN "h2"); answers with the protocol version it saw.
fn h2_origin(connections: Arc<AtomicUsize>) -> String {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der()));
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![CertificateDer::from(cert.cert.der().to_vec())], key)
            .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                connections.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                        let version = format!("{:?}", req.version());
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .header("x-origin-version", version)
                                .body(Full::new(Bytes::from_static(b"over h2")))
                                .unwrap(),
                        )
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
    });
    format!("https://localhost:{port}/")
}

fn fetch(url: &str) -> String {
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let spec = ExchangeSpec {
        // A self-signed test certificate; ALPN is what is under test.
        tls: TlsSettings {
            verify: false,
            ca_file: None,
        },
        max_buffered_body: 1024,
        ..common::get(0, url)
    };
    exchange::start(runtime::current().unwrap(), spec, OwnedFd::from(theirs));
    let mut out = String::new();
    ours.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn https_origins_get_http2_through_alpn_on_one_pooled_connection() {
    let connections = Arc::new(AtomicUsize::new(0));
    let url = h2_origin(connections.clone());
    for _ in 0..5 {
        let out = fetch(&url);
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("x-origin-version: HTTP/2.0\r\n"), "{out}");
        // h2 bodies have no length header here: re-framed as chunked.
        assert!(
            out.ends_with("7\r\nover h2\r\n0\r\n\r\n") || out.ends_with("\r\n\r\nover h2"),
            "{out}"
        );
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "h2 connection was not reused"
    );
}

/// An HTTP/2 origin that answers each request with its body, or "over h2"
/// for none. `retire_after`: each connection is retired after that many
/// requests with a graceful GOAWAY (what nginx does after
/// `keepalive_requests`, 1,000 by default), so streams the client opened
/// meanwhile are refused unprocessed; then it closes the way nginx does
/// (lingering: it reads until the client closes), since a close with
/// unread request bodies sends an RST that can make the client lose the
/// GOAWAY itself. `refuse_every_other`: every other request is reset with
/// REFUSED_STREAM. Counts connections and requests answered. Built on h2
/// rather than hyper's server to own the socket's close.
struct H2Origin {
    url: String,
    connections: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
}

fn scripted_h2_origin(retire_after: Option<usize>, refuse_every_other: bool) -> H2Origin {
    let acceptor = h2_acceptor();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let (connections, answered) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (connected, done) = (connections.clone(), answered.clone());
    let requests = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                connected.fetch_add(1, Ordering::SeqCst);
                let (acceptor, answered, requests) = (acceptor.clone(), done.clone(), requests.clone());
                // A second descriptor of the socket, for a lingering close.
                let tcp = tcp.into_std().unwrap();
                let linger = tokio::net::TcpStream::from_std(tcp.try_clone().unwrap()).unwrap();
                let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut conn) = h2::server::handshake(tls).await else {
                        return;
                    };
                    let mut seen = 0;
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        seen += 1;
                        if Some(seen) == retire_after {
                            // Streams after the last one accepted are
                            // refused, the accepted ones still served.
                            conn.graceful_shutdown();
                        }
                        if refuse_every_other && requests.fetch_add(1, Ordering::SeqCst) % 2 == 0 {
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                            continue;
                        }
                        let answered = answered.clone();
                        tokio::spawn(async move {
                            let mut body = req.into_body();
                            let mut received = Vec::new();
                            while let Some(Ok(data)) = body.data().await {
                                let _ = body.flow_control().release_capacity(data.len());
                                received.extend_from_slice(&data);
                            }
                            answered.fetch_add(1, Ordering::SeqCst);
                            if received.is_empty() {
                                received = b"over h2".to_vec();
                            }
                            if let Ok(mut stream) = respond.send_response(hyper::Response::new(()), false) {
                                let _ = stream.send_data(Bytes::from(received), true);
                            }
                        });
                    }
                    // Like nginx's lingering close: h2 has sent its GOAWAY
                    // and FIN; read what the client still sends (request
                    // bodies of refused streams) until it closes, since
                    // closing with unread input sends an RST, and the
                    // client's kernel may then drop the unread GOAWAY.
                    drop(conn);
                    let mut sink = [0u8; 16 * 1024];
                    let drain = async {
                        loop {
                            let _ = linger.readable().await;
                            match linger.try_read(&mut sink) {
                                Ok(0) => return,
                                Ok(_) => {}
                                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                                Err(_) => return,
                            }
                        }
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
                });
            }
        });
    });
    H2Origin {
        url: format!("https://localhost:{port}/"),
        connections,
        answered,
    }
}

fn h2_acceptor() -> tokio_rustls::TlsAcceptor {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der()));
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![CertificateDer::from(cert.cert.der().to_vec())], key)
            .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

fn h2_spec(id: u64, url: &str) -> ExchangeSpec {
    ExchangeSpec {
        tls: TlsSettings {
            verify: false,
            ca_file: None,
        },
        ..common::get(id, url)
    }
}

#[test]
fn requests_refused_by_a_goaway_are_retried_on_a_new_connection() {
    const REQUESTS: usize = 600;
    const CONCURRENCY: usize = 20;
    let origin = scripted_h2_origin(Some(10), false);
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|w| {
            let url = origin.url.clone();
            std::thread::spawn(move || {
                (0..REQUESTS / CONCURRENCY)
                    .filter_map(|i| {
                        let n = w * 1000 + i;
                        let mut spec = h2_spec(920_000 + n as u64, &url);
                        // Every other one a POST: its body goes again.
                        let expected = if n % 2 == 1 {
                            spec.method = http::Method::POST;
                            spec.body = BodySource::Bytes(Bytes::from(format!("posted {n}")));
                            format!("posted {n}")
                        } else {
                            "over h2".to_owned()
                        };
                        let out = fetch_spec(spec);
                        let ok = out.starts_with("HTTP/1.1 200 OK\r\n") && out.contains(&expected);
                        (!ok).then(|| format!("{} {out}", spec_method(n)))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let failures: Vec<String> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    let connections = origin.connections.load(Ordering::SeqCst);
    assert!(
        failures.is_empty(),
        "{} of {REQUESTS} failed over {connections} connections, first: {}",
        failures.len(),
        failures[0]
    );
    assert_eq!(
        origin.answered.load(Ordering::SeqCst),
        REQUESTS,
        "each request processed once"
    );
    assert!(connections >= REQUESTS / 10, "only {connections} connections");
}

#[test]
fn a_refused_stream_goes_again_with_its_whole_body() {
    let origin = scripted_h2_origin(None, true);
    for n in 0..10 {
        let body = format!("request body {n} ").repeat(1000);
        let spec = ExchangeSpec {
            method: http::Method::POST,
            body: BodySource::Bytes(Bytes::from(body.clone())),
            ..h2_spec(930_000 + n, &origin.url)
        };
        let out = fetch_spec(spec);
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        let received: String = out
            .split("\r\n\r\n")
            .skip(1)
            .collect::<Vec<_>>()
            .join("")
            .split("\r\n")
            .filter(|part| part.starts_with("request body"))
            .collect();
        assert_eq!(received.len(), body.len(), "{out}");
    }
    assert_eq!(origin.answered.load(Ordering::SeqCst), 10);
}

fn spec_method(n: usize) -> &'static str {
    if n % 2 == 1 {
        "POST"
    } else {
        "GET"
    }
}

fn fetch_spec(spec: ExchangeSpec) -> String {
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    exchange::start(runtime::current().unwrap(), spec, OwnedFd::from(theirs));
    let mut out = Vec::new();
    let _ = ours.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}
