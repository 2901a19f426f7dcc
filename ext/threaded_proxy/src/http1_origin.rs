//! The gem's own HTTP/1.1 client for plain `http://` origins, used for
//! requests without a body (GET, HEAD, OPTIONS, DELETE: most proxied
//! traffic). Requests with a body, upgrades and https stay on hyper.
//!
//! Why not hyper here: a hyper client connection holds ~33 KiB whatever its
//! traffic (two dispatch-channel blocks, an 8 KiB write buffer, an 8 KiB read
//! buffer), which was most of an idle SSE stream's memory; and it keeps the
//! socket to itself, so a body could not be spliced (see `splice`). This
//! connection holds no buffer while it waits: the read buffer exists only
//! while bytes are in flight.
//!
//! Framing follows RFC 9112 §6.3: no body for HEAD, 1xx, 204 and 304;
//! chunked when it is the last transfer coding; else Content-Length (one
//! valid value); else until the origin closes. The exchange refuses any
//! transfer coding but a lone chunked, as it does for hyper's responses
//! (`headers::unsupported_transfer_coding`), and the start of a chunked
//! body is checked before the head is handed over (`check_start`). A
//! connection goes back to the pool only after a complete body with
//! nothing left over.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::errors::ProxyError;
use crate::headers::{self, HeaderList};
use crate::upstream::BoxError;

/// Largest response head accepted (hyper's limit in `upstream` is the same).
const MAX_HEAD: usize = 256 * 1024;
/// Most header lines in a response head (hyper's default).
const MAX_HEADERS: usize = 100;
/// Longest chunk-size line or trailer section.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 64 * 1024;
/// Bytes asked of the socket per read while a body flows.
const READ_SIZE: usize = 64 * 1024;

/// True when this client serves the request: plain http, no body, no
/// upgrade, and a method that may be retried on a fresh connection when a
/// pooled one turns out closed.
pub fn serves(url: &str, method: &Method, has_body: bool, upgrade: bool) -> bool {
    !has_body
        && !upgrade
        && url.len() > 7
        && url[..7].eq_ignore_ascii_case("http://")
        && matches!(
            *method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE
        )
}

/// Where a request goes, parsed once from its URL.
pub struct Target {
    host: String,
    port: u16,
    /// "host:port": the pool's key.
    key: String,
    /// The Host header: the port only when it is not 80.
    host_header: String,
    path_and_query: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, ProxyError> {
        let invalid = |message: String| ProxyError::InvalidHeader {
            url: url.to_owned(),
            message,
        };
        let uri: http::Uri = url.parse().map_err(|e| invalid(format!("bad URL: {e}")))?;
        let authority = uri
            .authority()
            .ok_or_else(|| invalid("URL without a host".to_owned()))?;
        let host = authority.host().trim_start_matches('[').trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(80);
        let host_header = match authority.port_u16() {
            Some(p) if p != 80 => format!("{}:{p}", authority.host()),
            _ => authority.host().to_owned(),
        };
        Ok(Target {
            host: host.to_owned(),
            port,
            key: format!("{}:{port}", authority.host()),
            host_header,
            path_and_query: uri
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "/".to_owned()),
        })
    }
}

/// The origin's response head, as the exchange needs it.
pub struct ResponseHead {
    pub status: StatusCode,
    /// Only when it differs from the status's canonical reason.
    pub reason: Option<String>,
    pub headers: HeaderMap,
}

/// Idle keep-alive connections by origin, most recently used last.
pub struct Http1Pool {
    shared: Arc<PoolShared>,
}

struct PoolShared {
    idle: Mutex<PoolState>,
    idle_timeout: Duration,
    max_idle_per_host: usize,
}

struct PoolState {
    by_origin: HashMap<String, Vec<IdleConnection>>,
    /// A task closes expired connections while any are idle (it ends when
    /// the pool is empty, so an idle process runs none).
    reaper_running: bool,
}

struct IdleConnection {
    stream: TcpStream,
    since: Instant,
}

impl Http1Pool {
    pub fn new(idle_timeout: Duration, max_idle_per_host: usize) -> Self {
        Http1Pool {
            shared: Arc::new(PoolShared {
                idle: Mutex::new(PoolState {
                    by_origin: HashMap::new(),
                    reaper_running: false,
                }),
                idle_timeout,
                max_idle_per_host,
            }),
        }
    }

    /// Idle connections held right now (all origins).
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.shared.lock().by_origin.values().map(Vec::len).sum()
    }

    /// Sends a bodiless request and reads the response head.
    ///
    /// A pooled connection can turn out closed by the origin while it sat
    /// idle (a stale keep-alive): the write fails, or the origin closes or
    /// resets before any response byte. Only then, and only for an
    /// idempotent method, the request goes once more, on a new connection,
    /// never on another pooled one: an origin that drops every request
    /// (say, one that crashes the worker handling it) must see it at most
    /// twice, not once per pooled connection. A failure on a new connection
    /// is final: the origin may have processed the request.
    pub async fn send(
        &self,
        url: &str,
        method: &Method,
        request_headers: &HeaderList,
        connect_timeout: Duration,
    ) -> Result<(ResponseHead, PlainBody), ProxyError> {
        let target = Target::parse(url)?;
        let request = request_head(url, method, &target, request_headers)?;
        let mut first_try = true;
        loop {
            let pooled = if first_try {
                self.shared.take(&target.key)
            } else {
                None
            };
            let reused = pooled.is_some();
            let mut stream = match pooled {
                Some(stream) => stream,
                None => connect(url, &target, connect_timeout).await?,
            };
            let failure = match stream.write_all(&request).await {
                Err(e) => upstream_io(url, "sending the request", &e),
                Ok(()) => {
                    let mut buf = BytesMut::new();
                    match read_head(&mut stream, &mut buf).await {
                        Ok(head) => {
                            let mut body =
                                PlainBody::new(stream, buf, method, &head, &self.shared, target.key)
                                    .map_err(|message| upstream(url, message))?;
                            body.check_start()
                                .await
                                .map_err(|message| upstream(url, message))?;
                            return Ok((head, body));
                        }
                        Err(HeadError::ClosedEarly) => HeadError::ClosedEarly.into_proxy_error(url),
                        Err(e) => return Err(e.into_proxy_error(url)),
                    }
                }
            };
            if !(first_try && reused && method.is_idempotent()) {
                return Err(failure);
            }
            // The one retry, on a new connection.
            first_try = false;
        }
    }
}

impl PoolShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used live connection to `key`, if any.
    fn take(&self, key: &str) -> Option<TcpStream> {
        let mut state = self.lock();
        let list = state.by_origin.get_mut(key)?;
        while let Some(idle) = list.pop() {
            if idle.since.elapsed() < self.idle_timeout && still_open(&idle.stream) {
                return Some(idle.stream);
            }
        }
        None
    }

    fn put(self: &Arc<Self>, key: String, stream: TcpStream) {
        if self.max_idle_per_host == 0 || self.idle_timeout.is_zero() {
            return;
        }
        let mut state = self.lock();
        let list = state.by_origin.entry(key).or_default();
        if list.len() >= self.max_idle_per_host {
            list.remove(0);
        }
        list.push(IdleConnection {
            stream,
            since: Instant::now(),
        });
        if !state.reaper_running {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                state.reaper_running = true;
                runtime.spawn(reap(Arc::downgrade(self)));
            }
        }
    }
}

/// Closes connections idle longer than the pool's timeout, checking four
/// times per timeout; ends when the pool is empty or gone.
async fn reap(pool: Weak<PoolShared>) {
    loop {
        let Some(period) = pool
            .upgrade()
            .map(|p| (p.idle_timeout / 4).max(Duration::from_millis(10)))
        else {
            return;
        };
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else { return };
        let mut state = pool.lock();
        let timeout = pool.idle_timeout;
        state.by_origin.retain(|_, list| {
            list.retain(|idle| idle.since.elapsed() < timeout);
            !list.is_empty()
        });
        if state.by_origin.is_empty() {
            state.reaper_running = false;
            return;
        }
    }
}

/// A pooled connection is usable when reading it would block: no EOF, no
/// stray bytes from the origin.
fn still_open(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

async fn connect(url: &str, target: &Target, timeout: Duration) -> Result<TcpStream, ProxyError> {
    let timed_out = || ProxyError::Timeout {
        url: url.to_owned(),
        phase: "connecting",
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let lookup = tokio::net::lookup_host((target.host.as_str(), target.port));
    let addrs = match tokio::time::timeout_at(deadline, lookup).await {
        Err(_) => return Err(timed_out()),
        Ok(Err(e)) => {
            return Err(ProxyError::Connect {
                url: url.to_owned(),
                message: format!("dns error: {e}"),
                errno: None,
            })
        }
        Ok(Ok(addrs)) => addrs,
    };
    let mut last_error = None;
    for addr in addrs {
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Err(_) => return Err(timed_out()),
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => last_error = Some(e),
        }
    }
    Err(match last_error {
        Some(e) => ProxyError::Connect {
            url: url.to_owned(),
            message: format!("tcp connect error: {e}"),
            errno: e.raw_os_error(),
        },
        None => ProxyError::Connect {
            url: url.to_owned(),
            message: "dns error: no addresses".to_owned(),
            errno: None,
        },
    })
}

/// The request head: the caller's end-to-end headers, a Host header unless
/// the caller sent one, and nothing about a body (there is none).
fn request_head(
    url: &str,
    method: &Method,
    target: &Target,
    request_headers: &HeaderList,
) -> Result<Vec<u8>, ProxyError> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.path_and_query.as_bytes());
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
        out.extend_from_slice(target.host_header.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(out)
}

enum HeadError {
    /// EOF before any byte of a response: a pooled connection the origin
    /// had closed.
    ClosedEarly,
    Io(std::io::Error),
    Bad(String),
}

impl HeadError {
    fn into_proxy_error(self, url: &str) -> ProxyError {
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
async fn read_head(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<ResponseHead, HeadError> {
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

fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

fn upstream(url: &str, message: String) -> ProxyError {
    ProxyError::Upstream {
        url: url.to_owned(),
        message,
        errno: None,
    }
}

fn upstream_io(url: &str, doing: &str, e: &std::io::Error) -> ProxyError {
    ProxyError::Upstream {
        url: url.to_owned(),
        message: format!("{doing}: {e}"),
        errno: e.raw_os_error(),
    }
}

/// How the rest of the body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyFraming {
    /// This many bytes still to come.
    Length(u64),
    Chunked(ChunkState),
    /// Until the origin closes.
    Close,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Expecting `<hex size>[;ext]\r\n`.
    Size,
    /// This many bytes of the current chunk still to come.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one; the bytes of
    /// trailers seen so far.
    Trailers(usize),
}

/// The response body read straight from the origin socket; gives the
/// connection back to the pool once complete.
pub struct PlainBody {
    /// None once the body is complete (the connection pooled or closed).
    stream: Option<TcpStream>,
    /// Bytes read from the socket but not yet handed out.
    buf: BytesMut,
    framing: BodyFraming,
    /// Where a reusable connection goes back after a complete body.
    pool: Option<(Arc<PoolShared>, String)>,
    /// The first data, decoded by `check_start` before the head was
    /// handed over.
    first: Option<Bytes>,
}

impl PlainBody {
    fn new(
        stream: TcpStream,
        buf: BytesMut,
        method: &Method,
        head: &ResponseHead,
        pool: &Arc<PoolShared>,
        key: String,
    ) -> Result<PlainBody, String> {
        let headers = &head.headers;
        let status = head.status.as_u16();
        let mut keep_alive = !has_token(headers, http::header::CONNECTION, "close");
        let framing = if *method == Method::HEAD || status == 204 || status == 304 {
            BodyFraming::Done
        } else if let Some(last) = last_transfer_coding(headers) {
            if last.eq_ignore_ascii_case("chunked") {
                // With a Content-Length too, the exchange refuses the
                // response; never reuse such a connection.
                keep_alive &= !headers.contains_key(http::header::CONTENT_LENGTH);
                BodyFraming::Chunked(ChunkState::Size)
            } else {
                keep_alive = false;
                BodyFraming::Close
            }
        } else if headers.contains_key(http::header::CONTENT_LENGTH) {
            BodyFraming::Length(content_length(headers)?)
        } else {
            keep_alive = false;
            BodyFraming::Close
        };
        let mut body = PlainBody {
            stream: Some(stream),
            buf,
            framing,
            pool: keep_alive.then(|| (pool.clone(), key)),
            first: None,
        };
        if body.framing == BodyFraming::Length(0) {
            body.framing = BodyFraming::Done;
        }
        if body.framing == BodyFraming::Done {
            body.complete();
        }
        Ok(body)
    }

    /// Validates the start of a chunked body before the exchange commits
    /// to the head: a bad first chunk-size line, or oversized trailers after
    /// the last chunk, must be a 502, not a 200 cut by a reset. It decodes
    /// what came with the head and waits only for an element the origin
    /// has begun to send (a partial size line) or for the trailers after a
    /// last chunk; when the head came alone it returns at once, so an event
    /// stream's head never waits for its first event. The first data found
    /// is kept for `poll_frame`.
    async fn check_start(&mut self) -> Result<(), String> {
        loop {
            let BodyFraming::Chunked(state) = self.framing else {
                return Ok(());
            };
            let in_trailers = matches!(state, ChunkState::Trailers(_));
            if self.buf.is_empty() && !in_trailers {
                return Ok(());
            }
            if let Some(n) = self.decode_chunked()? {
                self.first = Some(self.buf.split_to(n).freeze());
                return Ok(());
            }
            if self.framing == BodyFraming::Done {
                return Ok(());
            }
            match std::future::poll_fn(|cx| self.poll_fill(cx)).await {
                Ok(true) => {}
                Ok(false) => {
                    return Err("origin closed the connection in the middle of a chunked body".to_owned())
                }
                Err(e) => return Err(format!("reading the response body: {e}")),
            }
        }
    }

    /// For `splice`: the socket, the body bytes already read, and how many
    /// are still to come, when the body has a known length.
    pub fn take_for_splice(&mut self) -> Option<(Bytes, u64)> {
        match self.framing {
            BodyFraming::Length(left) if self.stream.is_some() => {
                let buffered = (self.buf.len() as u64).min(left);
                let head = self.buf.split_to(buffered as usize).freeze();
                if !self.buf.is_empty() {
                    // More than the body: the connection cannot be reused.
                    self.pool = None;
                }
                self.framing = BodyFraming::Length(left - buffered);
                Some((head, left - buffered))
            }
            _ => None,
        }
    }

    /// The origin socket, for splicing the bytes `take_for_splice` counted.
    pub fn stream(&self) -> Option<&TcpStream> {
        self.stream.as_ref()
    }

    /// After a splice moved every remaining byte: the body is complete.
    pub fn spliced_to_end(&mut self) {
        self.framing = BodyFraming::Done;
        self.complete();
    }

    /// The body is over: pool the connection if it may be reused.
    fn complete(&mut self) {
        self.framing = BodyFraming::Done;
        let stream = self.stream.take();
        if let (Some(stream), Some((pool, key))) = (stream, self.pool.take()) {
            if self.buf.is_empty() {
                pool.put(key, stream);
            }
        }
        self.buf = BytesMut::new();
    }

    /// Reads more from the socket into `buf`: Ok(false) at EOF. An empty
    /// buffer is released before waiting, so a quiet stream holds none.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<bool>> {
        let Some(stream) = self.stream.as_ref() else {
            return Poll::Ready(Ok(false));
        };
        loop {
            self.buf.reserve(READ_SIZE);
            match stream.try_read_buf(&mut self.buf) {
                Ok(0) => return Poll::Ready(Ok(false)),
                Ok(_) => return Poll::Ready(Ok(true)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if self.buf.is_empty() {
                        self.buf = BytesMut::new();
                    }
                    ready!(stream.poll_read_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn data(&mut self, n: usize) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(Some(Ok(Frame::data(self.buf.split_to(n).freeze()))))
    }

    /// Advances the chunked decoder over `buf`: Some(n) to hand out n bytes,
    /// None when more input is needed or the body just ended.
    fn decode_chunked(&mut self) -> Result<Option<usize>, String> {
        loop {
            let BodyFraming::Chunked(state) = self.framing else {
                return Ok(None);
            };
            match state {
                ChunkState::Size => {
                    let Some(line_end) = self.buf.iter().position(|&b| b == b'\n') else {
                        if self.buf.len() > MAX_CHUNK_LINE {
                            return Err("chunk size line too long".to_owned());
                        }
                        return Ok(None);
                    };
                    let size = parse_chunk_size(&self.buf[..line_end])?;
                    self.buf.advance(line_end + 1);
                    self.framing = BodyFraming::Chunked(if size == 0 {
                        ChunkState::Trailers(0)
                    } else {
                        ChunkState::Data(size)
                    });
                }
                ChunkState::Data(left) => {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    let n = (self.buf.len() as u64).min(left);
                    self.framing = BodyFraming::Chunked(if n == left {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - n)
                    });
                    return Ok(Some(n as usize));
                }
                ChunkState::DataEnd => {
                    if self.buf.len() < 2 {
                        return Ok(None);
                    }
                    if &self.buf[..2] != b"\r\n" {
                        return Err("chunk data not followed by CRLF".to_owned());
                    }
                    self.buf.advance(2);
                    self.framing = BodyFraming::Chunked(ChunkState::Size);
                }
                ChunkState::Trailers(seen) => {
                    let Some(line_end) = self.buf.iter().position(|&b| b == b'\n') else {
                        if seen + self.buf.len() > MAX_TRAILERS {
                            return Err("trailers too long".to_owned());
                        }
                        return Ok(None);
                    };
                    let empty = line_end == 0 || (line_end == 1 && self.buf[0] == b'\r');
                    self.buf.advance(line_end + 1);
                    if empty {
                        self.complete();
                        return Ok(None);
                    }
                    let seen = seen + line_end + 1;
                    if seen > MAX_TRAILERS {
                        return Err("trailers too long".to_owned());
                    }
                    self.framing = BodyFraming::Chunked(ChunkState::Trailers(seen));
                }
            }
        }
    }
}

/// `<hex digits>[SP/HTAB][;extensions]` and the line's CR (the LF is
/// not in `line`). As hyper does, the line must end in CRLF, and a CR
/// inside the extensions is refused (some recipients end lines at a bare
/// CR: a smuggling vector); NUL is refused too.
fn parse_chunk_size(line: &[u8]) -> Result<u64, String> {
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

fn last_transfer_coding(headers: &HeaderMap) -> Option<String> {
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
fn content_length(headers: &HeaderMap) -> Result<u64, String> {
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

impl Body for PlainBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        loop {
            match this.framing {
                BodyFraming::Done => return Poll::Ready(None),
                BodyFraming::Length(left) => {
                    if !this.buf.is_empty() {
                        let n = (this.buf.len() as u64).min(left);
                        let left = left - n;
                        let frame = this.data(n as usize);
                        this.framing = BodyFraming::Length(left);
                        if left == 0 {
                            this.complete();
                        }
                        return frame;
                    }
                }
                BodyFraming::Close => {
                    if !this.buf.is_empty() {
                        let n = this.buf.len();
                        return this.data(n);
                    }
                }
                BodyFraming::Chunked(_) => match this.decode_chunked() {
                    Ok(Some(n)) => return this.data(n),
                    Ok(None) if this.framing == BodyFraming::Done => return Poll::Ready(None),
                    Ok(None) => {}
                    Err(message) => {
                        this.stream = None;
                        this.framing = BodyFraming::Done;
                        return Poll::Ready(Some(Err(message.into())));
                    }
                },
            }
            match ready!(this.poll_fill(cx)) {
                Ok(true) => {}
                Ok(false) if this.framing == BodyFraming::Close => {
                    this.framing = BodyFraming::Done;
                    this.stream = None;
                    return Poll::Ready(None);
                }
                Ok(false) => {
                    this.stream = None;
                    let what = match this.framing {
                        BodyFraming::Length(left) => format!("with {left} body bytes still to come"),
                        _ => "in the middle of a chunked body".to_owned(),
                    };
                    this.framing = BodyFraming::Done;
                    return Poll::Ready(Some(Err(format!("origin closed the connection {what}").into())));
                }
                Err(e) => {
                    this.stream = None;
                    this.framing = BodyFraming::Done;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == BodyFraming::Done && self.first.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            BodyFraming::Done if self.first.is_none() => SizeHint::with_exact(0),
            BodyFraming::Length(left) => SizeHint::with_exact(left),
            _ => SizeHint::default(),
        }
    }
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
    fn content_length_must_be_one_number() {
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

    #[test]
    fn targets_name_the_pool_key_and_host_header() {
        let t = Target::parse("http://example.com/a?b=1").unwrap();
        assert_eq!(
            (t.key.as_str(), t.host_header.as_str(), t.path_and_query.as_str()),
            ("example.com:80", "example.com", "/a?b=1")
        );
        let t = Target::parse("http://[::1]:8080").unwrap();
        assert_eq!(
            (t.host.as_str(), t.host_header.as_str(), t.path_and_query.as_str()),
            ("::1", "[::1]:8080", "/")
        );
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_pool_timeout() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let origin = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            assert!(conn.read(&mut buf).await.unwrap() > 0);
            conn.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await.unwrap();
            // Returns when the proxy closes the pooled connection.
            while conn.read(&mut buf).await.unwrap() > 0 {}
        });
        let pool = Http1Pool::new(Duration::from_millis(100), 4);
        let (head, _body) = pool
            .send(&url, &Method::GET, &Vec::new(), Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(head.status, 204);
        assert_eq!(
            pool.idle_count(),
            1,
            "a bodiless answer pools its connection at once"
        );
        tokio::time::timeout(Duration::from_secs(5), origin)
            .await
            .expect("the idle connection was never closed")
            .unwrap();
        assert_eq!(pool.idle_count(), 0);
    }

    #[test]
    fn only_bodiless_idempotent_plain_http_requests_are_served_here() {
        assert!(serves("http://a/", &Method::GET, false, false));
        assert!(serves("HTTP://a/", &Method::HEAD, false, false));
        assert!(!serves("https://a/", &Method::GET, false, false));
        assert!(!serves("http://a/", &Method::POST, false, false));
        assert!(!serves("http://a/", &Method::GET, true, false));
        assert!(!serves("http://a/", &Method::GET, false, true));
    }
}
