//! The origin side: pooled hyper-util clients (HTTP/1.1 keep-alive, HTTP/2
//! via ALPN for https), TLS settings, request bodies and error mapping.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use tokio::sync::mpsc;

use crate::errors::ProxyError;
use crate::http1_origin::{Http1Pool, PlainBody};

pub type BoxError = Box<dyn StdError + Send + Sync>;
pub type RequestBody = BoxBody<Bytes, BoxError>;
pub type HttpClient = Client<HttpsConnector<HttpConnector>, RequestBody>;

/// How to trust https origins.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TlsSettings {
    pub verify: bool,
    /// Extra PEM roots (a private CA), added to the system's.
    pub ca_file: Option<PathBuf>,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            verify: true,
            ca_file: None,
        }
    }
}

/// One hyper client per distinct (TLS settings, connect timeout), each with
/// its pool; plus the gem's own HTTP/1.1 pool for bodiless plain-http
/// requests (see `http1_origin`).
pub struct Upstream {
    clients: Mutex<HashMap<(TlsSettings, Duration), HttpClient>>,
    pub http1: Http1Pool,
    pool_idle_timeout: Duration,
    pool_max_idle_per_host: usize,
}

impl Upstream {
    pub fn new(pool_idle_timeout: Duration, pool_max_idle_per_host: usize) -> Self {
        Upstream {
            clients: Mutex::new(HashMap::new()),
            http1: Http1Pool::new(pool_idle_timeout, pool_max_idle_per_host),
            pool_idle_timeout,
            pool_max_idle_per_host,
        }
    }

    pub fn client(
        &self,
        tls: &TlsSettings,
        connect_timeout: Duration,
        url: &str,
    ) -> Result<HttpClient, ProxyError> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let key = (tls.clone(), connect_timeout);
        if let Some(client) = clients.get(&key) {
            return Ok(client.clone());
        }
        let client = self.build(tls, connect_timeout, url)?;
        clients.insert(key, client.clone());
        Ok(client)
    }

    fn build(
        &self,
        tls: &TlsSettings,
        connect_timeout: Duration,
        url: &str,
    ) -> Result<HttpClient, ProxyError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(tls, url)?)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        Ok(Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(self.pool_idle_timeout)
            .pool_max_idle_per_host(self.pool_max_idle_per_host)
            // Bounds the response head: oversized origin headers are a 502.
            .http1_max_buf_size(256 * 1024)
            .build(connector))
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_config(tls: &TlsSettings, url: &str) -> Result<rustls::ClientConfig, ProxyError> {
    let tls_error = |message: String| ProxyError::Tls {
        url: url.to_owned(),
        message,
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(e.to_string()))?;
    if !tls.verify {
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider())))
            .with_no_client_auth());
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = &tls.ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| tls_error(format!("cannot read ca_file {}: {e}", path.display())))?;
        for cert in certs {
            let cert = cert.map_err(|e| tls_error(format!("bad certificate in {}: {e}", path.display())))?;
            roots
                .add(cert)
                .map_err(|e| tls_error(format!("bad certificate in {}: {e}", path.display())))?;
        }
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// `verify_tls: false`: accepts any certificate, still checks signatures so
/// the handshake itself stays sound.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Where the request body comes from.
pub enum BodySource {
    Empty,
    Bytes(Bytes),
    /// A file (Puma's Tempfile for a large upload, or a user's File) read
    /// from `offset` to its end, never whole into memory.
    File {
        file: std::fs::File,
        offset: u64,
    },
    /// `length` bytes fetched piece by piece on a blocking thread:
    /// `read(offset, max)` returns up to `max` bytes from `offset` (a
    /// deferred delivery's body, read back from its queue).
    Chunks {
        length: u64,
        chunk: usize,
        read: ChunkReader,
    },
}

impl BodySource {
    /// A second source for the same bytes, to send a request again (an
    /// HTTP/2 origin refused it unprocessed); None for a source that can be
    /// read only once.
    pub fn try_clone(&self) -> Option<BodySource> {
        match self {
            BodySource::Empty => Some(BodySource::Empty),
            BodySource::Bytes(bytes) => Some(BodySource::Bytes(bytes.clone())),
            BodySource::File { file, offset } => file.try_clone().ok().map(|file| BodySource::File {
                file,
                offset: *offset,
            }),
            BodySource::Chunks { .. } => None,
        }
    }

    /// No bytes to send (nil, or an empty string).
    pub fn is_empty(&self) -> bool {
        match self {
            BodySource::Empty => true,
            BodySource::Bytes(bytes) => bytes.is_empty(),
            _ => false,
        }
    }
}

pub type ChunkReader = Box<dyn FnMut(u64, usize) -> std::io::Result<Vec<u8>> + Send>;

const FILE_CHUNK: usize = 64 * 1024;

impl BodySource {
    pub fn into_body(self) -> Result<RequestBody, std::io::Error> {
        Ok(match self {
            BodySource::Empty => Empty::new().map_err(|never| match never {}).boxed(),
            BodySource::Bytes(bytes) => Full::new(bytes).map_err(|never| match never {}).boxed(),
            BodySource::File { file, offset } => {
                let length = file.metadata()?.len().saturating_sub(offset);
                // Positioned reads: a clone of this source (a retried
                // request) shares the descriptor's file offset.
                let read = move |position, max| {
                    let mut buf = vec![0u8; max];
                    let n = file.read_at(&mut buf, offset + position)?;
                    buf.truncate(n);
                    Ok(buf)
                };
                ChannelBody::spawn(length, FILE_CHUNK, Box::new(read))
            }
            BodySource::Chunks { length, chunk, read } => ChannelBody::spawn(length, chunk, read),
        })
    }
}

/// A request body fed by a reader thread, with an exact length so hyper
/// sends Content-Length rather than chunked.
struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    left: u64,
}

impl ChannelBody {
    /// Starts the reader: a blocking thread reads ahead at most the
    /// channel's four chunks and stops when the request is dropped or a
    /// read fails (a source that ends early is an error, never a short
    /// body).
    fn spawn(length: u64, chunk: usize, mut read: ChunkReader) -> RequestBody {
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let mut offset = 0u64;
            while offset < length {
                let want = chunk.max(1).min((length - offset) as usize);
                let item = match read(offset, want) {
                    Ok(buf) if buf.is_empty() => Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "request body source shrank",
                    )),
                    Ok(buf) => {
                        offset += buf.len() as u64;
                        Ok(Bytes::from(buf))
                    }
                    Err(e) => Err(e),
                };
                let failed = item.is_err();
                if tx.blocking_send(item).is_err() || failed {
                    return;
                }
            }
        });
        ChannelBody { rx, left: length }.boxed()
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(bytes))) => {
                self.left = self.left.saturating_sub(bytes.len() as u64);
                Poll::Ready(Some(Ok(Frame::data(bytes))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(Some(Err("request body reader stopped".into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

/// An origin's response body, from hyper or from the gem's own HTTP/1.1
/// connection.
pub enum OriginBody {
    Hyper(hyper::body::Incoming),
    Plain(PlainBody),
}

impl Body for OriginBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            OriginBody::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            OriginBody::Plain(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            OriginBody::Hyper(body) => body.is_end_stream(),
            OriginBody::Plain(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            OriginBody::Hyper(body) => body.size_hint(),
            OriginBody::Plain(body) => body.size_hint(),
        }
    }
}

/// How many times a request an HTTP/2 origin refused unprocessed goes
/// again, each time on the connection the pool picks: a new one after a
/// GOAWAY (the pool no longer hands out a connection that is going away),
/// possibly the same after a REFUSED_STREAM, which RFC 9113 §8.7 allows.
/// Enough for an origin that retires connections under load, bounded for
/// one that refuses everything.
pub const REFUSED_RETRIES: usize = 3;

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

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(source: BodySource) -> Vec<u8> {
        source
            .into_body()
            .unwrap()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec()
    }

    #[tokio::test]
    async fn a_cloned_file_body_sends_the_same_bytes_even_read_at_the_same_time() {
        let path = std::env::temp_dir().join(format!("threaded-proxy-body-{}", std::process::id()));
        let content: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let source = BodySource::File { file, offset: 7 };
        let copy = source.try_clone().expect("a file body can be sent twice");
        // Both read concurrently through descriptors sharing one offset.
        let (a, b) = tokio::join!(read_all(source), read_all(copy));
        assert!(a == content[7..] && b == content[7..]);
        let chunks = BodySource::Chunks {
            length: 1,
            chunk: 1,
            read: Box::new(|_, _| Ok(vec![0])),
        };
        assert!(chunks.try_clone().is_none(), "a one-shot source is not replayed");
    }
}
