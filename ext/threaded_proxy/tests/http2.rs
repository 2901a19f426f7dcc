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
use threaded_proxy::runtime;
use threaded_proxy::upstream::TlsSettings;

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
