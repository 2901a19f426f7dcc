//! One proxied exchange, start to end, in the order the bytes go: the
//! hijacked descriptor becomes a tokio stream (`run`), the exchange takes
//! its steps (`Exchange::steps`: admission, the origin request, the head's
//! checks and callbacks), and the client writer (`relay::ClientWriter`,
//! which chooses the framing and encodes the head) gets the body by splice
//! or copy; last, the summary goes to the stats, the metrics and Ruby.
//!
//! - this file: the spec, the start, the task, the steps, the summary;
//! - `admission`: the permit an exchange holds while it runs;
//! - `hooks`: the user's callbacks on the way (on_headers on every path,
//!   on_response, on_error), each counted once when it answered;
//! - `body`: the origin's body to the client, spliced or copied;
//! - `upgrade`: a 101 from the origin, and `proxy_tunnel`: bytes both ways;
//! - `render`: answers the proxy writes itself (what a callback rendered,
//!   the default answer to an error).
//!
//! The whole exchange runs inside one `select!` against the client closing
//! its side and against shutdown: whichever ends first drops the others, so a
//! client that leaves cancels its origin request at once.

mod admission;
mod body;
mod hooks;
mod render;
mod upgrade;

use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};

use self::admission::fds_exhausted;
pub use self::admission::{admit, exchange_fds};
use self::body::Relayed;
pub use self::render::default_answer;
use crate::callbacks::{CallbackEvent, ResponseHead, Summary};
use crate::errors::{ErrorReport, ProxyError};
use crate::handoff::{self, ClientSocket};
use crate::headers::{self, ClientRequest, Framing, HeaderList};
use crate::limits::Permit;
use crate::origin::{self, BodySource, TlsSettings};
use crate::origin_url::Target;
use crate::relay::{self, BodyLength, ClientWriter};
use crate::runtime::{Proxy, TrackerGuard};
use crate::stats::Meter;

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP connect to the origin.
    pub connect: Duration,
    /// From sending the request to the origin's response head (covers DNS
    /// and TLS as well).
    pub header: Duration,
    /// Longest silence mid-body, from the origin or towards the client.
    pub idle: Duration,
}

/// Which Ruby callbacks this exchange has.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallbackSet {
    /// Call on_headers with the origin's head (101 included) before it
    /// goes out: it may change it or answer instead.
    pub on_headers: bool,
    /// Call on_response with the head, offering the body (buffered on
    /// request): it may render instead.
    pub on_response: bool,
    /// Call on_error for a failure before the head went out: it may render
    /// the answer.
    pub on_error: bool,
    /// Send the `Finished` event even on success (on_complete,
    /// instrumentation, cleanup); failures are always sent, to be logged.
    pub finished: bool,
}

/// Everything Ruby decided about an exchange, as plain data.
pub struct ExchangeSpec {
    /// The exchange's id: Ruby keys its callbacks by it.
    pub id: u64,
    /// The request method sent to the origin.
    pub method: Method,
    /// The origin URL, checked and parsed once (`origin_url::check`).
    pub target: Target,
    /// The request headers for the origin (hop-by-hop ones are dropped on
    /// the way out).
    pub headers: HeaderList,
    /// The request body, taken once when the request goes out.
    pub body: BodySource,
    /// What the client asked that decides the answer's framing.
    pub client: ClientRequest,
    /// Which callbacks Ruby has for this exchange.
    pub callbacks: CallbackSet,
    /// Connect, head and idle bounds.
    pub timeouts: Timeouts,
    /// How to verify an https origin.
    pub tls: TlsSettings,
    /// The most body bytes on_response may have buffered.
    pub max_buffered_body: usize,
    /// The client's Upgrade header when it asked to switch protocols: it
    /// goes to the origin, and the origin's 101 starts a tunnel.
    pub upgrade: Option<Bytes>,
    /// `proxy_tunnel`: join the client to the raw TCP service `target`
    /// names (`tcp://host:port`) instead of fetching it.
    pub tunnel: Option<TunnelTarget>,
}

#[derive(Debug, Clone)]
pub struct TunnelTarget {
    /// The protocol to name in a 101 answer; None answers 200 (CONNECT).
    pub upgrade: Option<Bytes>,
}

impl ExchangeSpec {
    fn tunnels(&self) -> bool {
        self.upgrade.is_some() || self.tunnel.is_some()
    }
}

/// Time the client gets to close its side after a clean finish.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// Starts the exchange on the proxy's runtime and returns at once; it asks
/// for admission itself (and answers 503, or lets on_error, when refused).
pub fn start(proxy: &'static Proxy, spec: ExchangeSpec, client: OwnedFd) {
    start_admitted(proxy, spec, client, None);
}

/// [`start`] with the admission taken before the client's descriptor was
/// duplicated (see [`admit`]); None asks for it in the exchange.
pub fn start_admitted(
    proxy: &'static Proxy,
    spec: ExchangeSpec,
    client: OwnedFd,
    permit: Option<Permit<'static>>,
) {
    proxy.stats.started.fetch_add(1, Relaxed);
    // Counted before the spawn: a shutdown waiting for idle must not miss
    // a task that has not run yet.
    let running = proxy.stats.exchanges.enter();
    // Boxed: the task's nested futures then carry a pointer to the spec,
    // not copies of it, for the life of a stream.
    proxy
        .runtime
        .spawn(run(proxy, Box::new(spec), client, permit, running));
}

/// Counts an exchange refused before it started (the caller answers the
/// client with 503 itself, holding no descriptor for it) and tells Ruby,
/// which logs it and forgets the exchange's callbacks.
pub fn refused(proxy: &'static Proxy, id: u64, method: &Method, url: &str, err: &ProxyError) {
    proxy.stats.started.fetch_add(1, Relaxed);
    let mut summary = empty_summary(method, url.to_owned(), Duration::ZERO, err);
    summary.status = Some(err.status());
    report(proxy, id, false, summary);
}

/// The summary of an exchange that moved no byte.
fn empty_summary(method: &Method, url: String, total_time: Duration, err: &ProxyError) -> Summary {
    Summary {
        method: method.to_string(),
        url,
        total_time,
        error: Some(ErrorReport::from(err)),
        ..Summary::default()
    }
}

/// The exchange's task: the client descriptor becomes a tokio stream, and
/// its halves go to [`drive`].
async fn run(
    proxy: &'static Proxy,
    spec: Box<ExchangeSpec>,
    client: OwnedFd,
    permit: Option<Permit<'static>>,
    _running: TrackerGuard<'static>,
) {
    let started = Instant::now();
    match handoff::adopt(client) {
        Ok(socket) => {
            let raw_fd = socket.raw_fd();
            match socket {
                // Borrowed halves: tokio's owned write half sends FIN when
                // dropped, which would make an aborted body look complete.
                // The socket closes (with RST when aborted) when `s` drops.
                ClientSocket::Tcp(mut s) => {
                    let (rd, wr) = s.split();
                    drive(proxy, spec, permit, rd, wr, raw_fd, started).await
                }
                ClientSocket::Unix(mut s) => {
                    let (rd, wr) = s.split();
                    drive(proxy, spec, permit, rd, wr, raw_fd, started).await
                }
            }
        }
        Err(e) => {
            let err = ProxyError::client(&e);
            let summary = empty_summary(&spec.method, spec.target.url(), started.elapsed(), &err);
            proxy.metrics.observe(&spec.target, None, summary.total_time);
            report(proxy, spec.id, spec.callbacks.finished, summary);
        }
    }
}

/// Counts the exchange's outcome and tells Ruby (on_complete, the
/// instrumentation event, forgetting its procs).
fn report(proxy: &'static Proxy, id: u64, notify: bool, summary: Summary) {
    match &summary.error {
        None => {
            proxy.stats.completed.fetch_add(1, Relaxed);
        }
        Some(report) => proxy.stats.failed(report.kind),
    }
    // Failures always go to Ruby, to be logged.
    if notify || summary.error.is_some() {
        proxy.callbacks.notify(id, CallbackEvent::Finished(summary));
    }
}

/// Serves the exchange on the client's halves, reports it, then closes
/// the client cleanly (a short drain) or abortively.
async fn drive<R, W>(
    proxy: &'static Proxy,
    spec: Box<ExchangeSpec>,
    permit: Option<Permit<'static>>,
    rd: R,
    wr: W,
    raw_fd: RawFd,
    started: Instant,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // A tunnel reads the client itself; anything else watches it for EOF.
    let (mut watched, client_reader) = if spec.tunnels() {
        (None, Some(rd))
    } else {
        (Some(rd), None)
    };
    let mut exchange = Exchange {
        proxy,
        writer: ClientWriter::new(wr, spec.timeouts.idle, spec.client, Meter::new(&proxy.stats)),
        spec,
        started,
        status: None,
        sent_head: None,
        time_to_first_byte: None,
        finished_cleanly: false,
        client_reader,
        client_fd: raw_fd,
        permit,
    };
    let mut cancelled = proxy.cancelled();
    let result = tokio::select! {
        result = exchange.serve() => result,
        _ = watch_client(watched.as_mut()) => Err(ProxyError::Client {
            message: "client closed the connection".to_owned(),
        }),
        _ = cancelled.wait_for(|cut| *cut) => Err(ProxyError::Internal {
            message: "cut by shutdown before the exchange finished".to_owned(),
        }),
    };
    let mut rd = watched.or_else(|| exchange.client_reader.take());
    let spec = &exchange.spec;
    let meter = exchange.writer.meter();
    let summary = Summary {
        method: spec.method.to_string(),
        url: spec.target.url(),
        status: exchange.status,
        head: exchange.sent_head.take(),
        bytes_from_origin: meter.origin_bytes(),
        bytes_to_client: meter.client_bytes(),
        bytes_from_client: meter.tunnel_bytes(),
        time_to_first_byte: exchange.time_to_first_byte,
        total_time: started.elapsed(),
        error: result.err().map(|e| ErrorReport::from(&e)),
    };
    proxy
        .metrics
        .observe(&spec.target, summary.time_to_first_byte, summary.total_time);
    // Reported before the drain: the last byte is already out, and
    // on_complete should not wait for a client that is slow to close.
    report(proxy, spec.id, spec.callbacks.finished, summary);
    if exchange.finished_cleanly {
        if let Some(rd) = rd.as_mut() {
            relay::drain(rd, DRAIN_LIMIT).await;
        }
    } else {
        handoff::set_abortive_close(raw_fd);
    }
}

/// Completes when the watched client closes; never when there is none.
async fn watch_client<R: AsyncRead + Unpin>(rd: Option<&mut R>) {
    match rd {
        Some(rd) => relay::client_gone(rd).await,
        None => std::future::pending().await,
    }
}

/// One exchange while it runs: its spec, the client's writer (and read
/// half for tunnels), and what the summary will say.
struct Exchange<R, W> {
    /// The process's proxy: origin clients, callbacks, limits, stats.
    proxy: &'static Proxy,
    /// What Ruby decided (boxed: see `start_admitted`).
    spec: Box<ExchangeSpec>,
    /// The client's write half, with the framing and the byte counts.
    writer: ClientWriter<W>,
    /// When the exchange started, for the time to first byte and the total.
    started: Instant,
    /// The status the client got, once its head went out.
    status: Option<u16>,
    /// A copy of the head sent, kept only for the `Finished` event.
    sent_head: Option<ResponseHead>,
    /// When the origin's head (or the tunnel's connection) arrived.
    time_to_first_byte: Option<Duration>,
    /// The last byte went out and the connection was half-closed cleanly.
    finished_cleanly: bool,
    /// The client's read half, for tunnels (which copy from it).
    client_reader: Option<R>,
    /// The client socket's descriptor, for splicing a body into it.
    client_fd: RawFd,
    /// This exchange's admission (caps and descriptors), held to its end.
    permit: Option<Permit<'static>>,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Exchange<R, W> {
    /// Runs the exchange; on a failure before the head went out, answers
    /// the client (on_error or the default status) and still reports it.
    async fn serve(&mut self) -> Result<(), ProxyError> {
        let err = match self.steps().await {
            Ok(()) => return Ok(()),
            Err(err) => err,
        };
        if !self.writer.head_sent && !matches!(err, ProxyError::Client { .. }) {
            if let Err(answer_err) = self.answer_error(&err).await {
                return Err(if matches!(answer_err, ProxyError::Client { .. }) {
                    err
                } else {
                    answer_err
                });
            }
        }
        Err(err)
    }

    /// The exchange's steps, in order.
    async fn steps(&mut self) -> Result<(), ProxyError> {
        let proxy = self.proxy;
        if self.permit.is_none() || !proxy.accepting() {
            self.permit = Some(admit(proxy, &self.spec)?);
        }
        if let Some(target) = self.spec.tunnel.clone() {
            return self.raw_tunnel(target).await;
        }
        let mut response = self.send_request().await.map_err(fds_exhausted)?;
        self.time_to_first_byte = Some(self.started.elapsed());
        if let Some(upgrade) = response.upgrade.take() {
            return self.switch_protocols(response.headers, upgrade).await;
        }
        let relayed = self.relayable(response)?;
        let Some(head) = self.on_headers(relayed.head).await? else {
            return Ok(());
        };
        let relayed = Relayed { head, ..relayed };
        if self.spec.callbacks.on_response {
            return self.on_response(relayed).await;
        }
        self.relay(relayed).await
    }

    /// Sends the request (`origin::Upstream::send` picks the client).
    async fn send_request(&mut self) -> Result<origin::Response, ProxyError> {
        let body = std::mem::replace(&mut self.spec.body, BodySource::Empty);
        let spec = &self.spec;
        let request = origin::Request {
            target: &spec.target,
            method: &spec.method,
            headers: &spec.headers,
            upgrade: spec.upgrade.as_ref(),
            tls: &spec.tls,
            connect_timeout: spec.timeouts.connect,
            header_timeout: spec.timeouts.header,
        };
        self.proxy.upstream.send(&request, body).await
    }

    /// The origin's (non-101) response as a head the client may get, or a
    /// 502 for framing the proxy will not pass on.
    fn relayable(&self, response: origin::Response) -> Result<Relayed<origin::OriginBody>, ProxyError> {
        let refuse = |message: &str| ProxyError::Upstream {
            url: self.spec.target.url(),
            message: message.to_owned(),
            errno: None,
        };
        if headers::ambiguous_framing(&response.headers) {
            return Err(refuse("response has both Content-Length and Transfer-Encoding"));
        }
        if headers::unsupported_transfer_coding(&response.headers) {
            return Err(refuse("response has a transfer coding other than a lone chunked"));
        }
        let length = BodyLength {
            exact: response.body.size_hint().exact(),
            declared: response
                .headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok()),
        };
        Ok(Relayed {
            head: ResponseHead {
                status: response.status.as_u16(),
                reason: response.reason,
                headers: headers::end_to_end(&response.headers),
            },
            body: response.body,
            length,
        })
    }

    /// Records the head as the one the client gets and hands it to the
    /// writer, which frames and encodes it and sends it with the first body
    /// bytes. It leaves alone before anything waits (`copy_body`,
    /// `flush_head`, `finish`). The framing chosen (`Framing::None`: no
    /// body goes out).
    fn hold_head(
        &mut self,
        status: u16,
        reason: Option<&str>,
        headers: &HeaderList,
        length: BodyLength,
    ) -> Framing {
        self.status = Some(status);
        if self.spec.callbacks.finished {
            self.sent_head = Some(ResponseHead {
                status,
                reason: reason.map(str::to_owned),
                headers: headers.clone(),
            });
        }
        self.writer.hold_head(status, reason, headers, length)
    }

    /// Flushes and half-closes after the last byte.
    async fn finish(&mut self) -> Result<(), ProxyError> {
        self.writer.finish().await?;
        self.finished_cleanly = true;
        Ok(())
    }

    fn validate_head(&self, headers: &HeaderList) -> Result<(), ProxyError> {
        headers::validate_all(headers).map_err(|message| ProxyError::InvalidHeader {
            url: self.spec.target.url(),
            message,
        })
    }
}
