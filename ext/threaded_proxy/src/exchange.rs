//! One proxied exchange, start to end: admission, the origin request, the
//! callbacks, the relay to the client, and the summary.
//!
//! The whole exchange runs inside one `select!` against the client closing
//! its side and against shutdown: whichever ends first drops the others, so a
//! client that leaves cancels its origin request at once.

use std::future::Future;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::Method;
use http_body::Body;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::callbacks::{
    BodyRequest, CallbackEvent, CallbackReply, Rendered, RenderedBody, ResponseHead, Summary,
};
use crate::errors::{ErrorReport, ProxyError};
use crate::handoff::{self, ClientSocket};
use crate::headers::{self, ClientRequest, Framing, HeaderList};
use crate::limits::{self, Permit};
use crate::origin::{self, BodySource, BoxError, OriginBody, PlainBody, TlsSettings};
use crate::origin_url::Target;
use crate::relay::{self, ClientWriter};
use crate::runtime::Proxy;
use crate::splice;
use crate::tunnel::{self, TunnelCounts, TunnelEnd};

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
    pub on_headers: bool,
    pub on_response: bool,
    pub on_error: bool,
    /// Send the `Finished` event even on success (on_complete,
    /// instrumentation, cleanup); failures are always sent, to be logged.
    pub finished: bool,
}

/// Everything Ruby decided about an exchange, as plain data.
pub struct ExchangeSpec {
    pub id: u64,
    pub method: Method,
    /// The origin URL, checked and parsed once (`origin_url::check`).
    pub target: Target,
    pub headers: HeaderList,
    pub body: BodySource,
    pub client: ClientRequest,
    pub callbacks: CallbackSet,
    pub timeouts: Timeouts,
    pub tls: TlsSettings,
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
    proxy.stats.active.fetch_add(1, Relaxed);
    proxy.runtime.spawn(run(proxy, spec, client, permit));
}

/// Descriptors the exchange holds from its start: the client's duplicate,
/// the origin socket, and a request body file if it streams one.
pub fn exchange_fds(spec: &ExchangeSpec) -> usize {
    limits::EXCHANGE_FDS + usize::from(matches!(spec.body, BodySource::File { .. }))
}

/// Admission for an exchange that has not started: a permit, or the
/// overload error to answer with.
pub fn admit(proxy: &'static Proxy, spec: &ExchangeSpec) -> Result<Permit<'static>, ProxyError> {
    if !proxy.accepting() {
        return Err(ProxyError::Overload {
            url: spec.target.url(),
            message: "shutting down".to_owned(),
        });
    }
    proxy
        .limits
        .try_acquire(&spec.target.origin_key(), exchange_fds(spec))
        .map_err(|message| {
            proxy.stats.rejected.fetch_add(1, Relaxed);
            ProxyError::Overload {
                url: spec.target.url(),
                message: message.to_owned(),
            }
        })
}

/// Counts an exchange refused before it started (the caller answers the
/// client with 503 itself, holding no descriptor for it) and tells Ruby,
/// which logs it and forgets the exchange's callbacks.
pub fn refused(proxy: &'static Proxy, id: u64, method: &Method, url: &str, err: &ProxyError) {
    proxy.stats.started.fetch_add(1, Relaxed);
    proxy.stats.active.fetch_add(1, Relaxed);
    let summary = Summary {
        method: method.to_string(),
        url: url.to_owned(),
        status: Some(err.status()),
        head: None,
        bytes_from_origin: 0,
        bytes_to_client: 0,
        bytes_from_client: 0,
        time_to_first_byte: None,
        total_time: Duration::ZERO,
        error: Some(ErrorReport::from(err)),
    };
    report(proxy, id, false, summary);
}

async fn run(proxy: &'static Proxy, spec: ExchangeSpec, client: OwnedFd, permit: Option<Permit<'static>>) {
    let _tracked = proxy.tracker.enter();
    let started = Instant::now();
    let outcome = match handoff::adopt(client) {
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
            let summary = Summary {
                method: spec.method.to_string(),
                url: spec.target.url(),
                status: None,
                head: None,
                bytes_from_origin: 0,
                bytes_to_client: 0,
                bytes_from_client: 0,
                time_to_first_byte: None,
                total_time: started.elapsed(),
                error: Some(ErrorReport::from(&ProxyError::client(&e))),
            };
            proxy.metrics.observe(&spec.target, None, summary.total_time);
            Some((spec.id, spec.callbacks.finished, summary))
        }
    };
    if let Some((id, notify, summary)) = outcome {
        report(proxy, id, notify, summary);
    }
}

/// Counts the exchange as ended and tells Ruby (on_complete, the
/// instrumentation event, forgetting its procs).
fn report(proxy: &'static Proxy, id: u64, notify: bool, summary: Summary) {
    proxy.stats.active.fetch_sub(1, Relaxed);
    proxy
        .stats
        .bytes_from_client
        .fetch_add(summary.bytes_from_client, Relaxed);
    match &summary.error {
        None => proxy.stats.completed.fetch_add(1, Relaxed),
        Some(report) => {
            proxy.stats.failed(report.kind);
            0
        }
    };
    // Failures always go to Ruby, to be logged.
    if notify || summary.error.is_some() {
        proxy.callbacks.notify(id, CallbackEvent::Finished(summary));
    }
}

async fn drive<R, W>(
    proxy: &'static Proxy,
    spec: ExchangeSpec,
    permit: Option<Permit<'static>>,
    rd: R,
    wr: W,
    raw_fd: RawFd,
    started: Instant,
) -> Option<(u64, bool, Summary)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut exchange = Exchange {
        proxy,
        writer: ClientWriter::new(wr, spec.timeouts.idle),
        spec,
        started,
        status: None,
        sent_head: None,
        time_to_first_byte: None,
        bytes_from_origin: 0,
        finished_cleanly: false,
        client_reader: None,
        tunnel_counts: TunnelCounts::default(),
        client_fd: raw_fd,
        permit,
    };
    // A tunnel reads the client itself; anything else watches it for EOF.
    let mut watched = if exchange.spec.tunnels() {
        exchange.client_reader = Some(rd);
        None
    } else {
        Some(rd)
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
    let summary = Summary {
        method: spec.method.to_string(),
        url: spec.target.url(),
        status: exchange.status,
        head: exchange.sent_head.take(),
        bytes_from_origin: exchange.bytes_from_origin,
        bytes_to_client: exchange.writer.bytes_written,
        bytes_from_client: exchange.tunnel_counts.to_origin.load(Relaxed),
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
    None
}

/// Completes when the watched client closes; never when there is none.
async fn watch_client<R: AsyncRead + Unpin>(rd: Option<&mut R>) {
    match rd {
        Some(rd) => relay::client_gone(rd).await,
        None => std::future::pending().await,
    }
}

struct Exchange<R, W> {
    proxy: &'static Proxy,
    spec: ExchangeSpec,
    writer: ClientWriter<W>,
    started: Instant,
    /// The status the client got, once its head went out.
    status: Option<u16>,
    /// A copy of the head sent, kept only for the `Finished` event.
    sent_head: Option<ResponseHead>,
    time_to_first_byte: Option<Duration>,
    bytes_from_origin: u64,
    /// The last byte went out and the connection was half-closed cleanly.
    finished_cleanly: bool,
    /// The client's read half, for tunnels (which copy from it).
    client_reader: Option<R>,
    tunnel_counts: TunnelCounts,
    /// The client socket's descriptor, for splicing a body into it.
    client_fd: RawFd,
    /// This exchange's admission (caps and descriptors), held to its end.
    permit: Option<Permit<'static>>,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Exchange<R, W> {
    fn url(&self) -> String {
        self.spec.target.url()
    }

    /// Runs the exchange; on a failure before the head went out, answers
    /// the client (on_error or the default status) and still reports it.
    async fn serve(&mut self) -> Result<(), ProxyError> {
        let err = match self.fetch_and_relay().await {
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

    async fn fetch_and_relay(&mut self) -> Result<(), ProxyError> {
        let proxy = self.proxy;
        if self.permit.is_none() || !proxy.accepting() {
            self.permit = Some(admit(proxy, &self.spec)?);
        }
        if let Some(target) = self.spec.tunnel.clone() {
            return self.raw_tunnel(target).await;
        }
        let response = self.send_request().await.map_err(fds_exhausted)?;
        self.time_to_first_byte = Some(self.started.elapsed());
        let origin::Response {
            status,
            reason,
            headers: origin_headers,
            body,
            upgrade,
        } = response;
        if let Some(upgrade) = upgrade {
            return self.switch_protocols(origin_headers, upgrade).await;
        }
        if headers::ambiguous_framing(&origin_headers) {
            return Err(ProxyError::Upstream {
                url: self.spec.target.url(),
                message: "response has both Content-Length and Transfer-Encoding".to_owned(),
                errno: None,
            });
        }
        if headers::unsupported_transfer_coding(&origin_headers) {
            return Err(ProxyError::Upstream {
                url: self.spec.target.url(),
                message: "response has a transfer coding other than a lone chunked".to_owned(),
                errno: None,
            });
        }
        let head_length = origin_headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let body_length = body.size_hint().exact();
        let mut head = ResponseHead {
            status: status.as_u16(),
            reason,
            headers: headers::end_to_end(&origin_headers),
        };

        if self.spec.callbacks.on_headers {
            let reply = proxy
                .callbacks
                .call(self.spec.id, CallbackEvent::Headers(head), &self.url())
                .await?;
            proxy.stats.callbacks_run.fetch_add(1, Relaxed);
            head = match reply {
                CallbackReply::Continue(changed) => changed,
                CallbackReply::Render(rendered) => return self.write_rendered(rendered).await,
                CallbackReply::Failed { message } => return Err(self.callback_error(message)),
            };
        }

        if self.spec.callbacks.on_response {
            return self.serve_on_response(head, body, body_length, head_length).await;
        }
        if let OriginBody::Plain(plain) = body {
            return self.relay_plain(head, plain, body_length, head_length).await;
        }
        self.relay_origin(head, body, body_length, head_length).await
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

    /// A plain-http origin body: spliced from socket to socket when it is
    /// relayed unchanged with a known length, else copied.
    async fn relay_plain(
        &mut self,
        head: ResponseHead,
        mut body: PlainBody,
        body_length: Option<u64>,
        head_length: Option<u64>,
    ) -> Result<(), ProxyError> {
        let framing = headers::framing(head.status, self.spec.client, body_length);
        let spliceable = matches!((framing, body_length), (Framing::Length(n), Some(m)) if n == m && n >= splice::MIN_BODY);
        // A splice needs three more descriptors: copied instead when the
        // budget has not got them (or the kernel refuses the pipe).
        let reserved = spliceable
            && self
                .permit
                .as_mut()
                .is_some_and(|p| p.reserve_more(limits::SPLICE_FDS));
        let splicer = if reserved {
            splice::Splicer::new(self.client_fd).ok()
        } else {
            None
        };
        if reserved && splicer.is_none() {
            self.release_splice_fds();
        }
        let Some(splicer) = splicer else {
            return self
                .relay_origin(head, OriginBody::Plain(body), body_length, head_length)
                .await;
        };
        self.hold_origin_head(&head, framing, head_length)?;
        // At once: the splice writes to the socket itself.
        self.flush_head().await?;
        let Some((buffered, left)) = body.take_for_splice() else {
            return Err(ProxyError::Internal {
                message: "origin body lost its length before the splice".to_owned(),
            });
        };
        if !buffered.is_empty() {
            self.count_from_origin(buffered.len() as u64);
            self.send_body(buffered).await?;
        }
        let Some(origin) = body.stream() else {
            return Err(ProxyError::Internal {
                message: "origin connection lost before the splice".to_owned(),
            });
        };
        let proxy = self.proxy;
        let mut spliced = 0u64;
        let mut moved = |n: u64| {
            spliced += n;
            proxy.stats.bytes_from_origin.fetch_add(n, Relaxed);
            proxy.stats.bytes_to_client.fetch_add(n, Relaxed);
            proxy.stats.bytes_spliced.fetch_add(n, Relaxed);
        };
        let copied = splicer
            .copy(origin, left, self.spec.timeouts.idle, &mut moved)
            .await;
        self.bytes_from_origin += spliced;
        self.writer.add_body_written(spliced);
        drop(splicer);
        self.release_splice_fds();
        copied.map_err(|end| end.into_error(&self.spec.target.url(), self.spec.timeouts.idle))?;
        body.spliced_to_end();
        self.finish().await
    }

    /// The origin accepted the upgrade: answer the client's 101 (after
    /// on_headers), then copy bytes both ways.
    async fn switch_protocols(
        &mut self,
        origin_headers: http::HeaderMap,
        upgrade: hyper::upgrade::OnUpgrade,
    ) -> Result<(), ProxyError> {
        let protocol = origin_headers
            .get(http::header::UPGRADE)
            .map(|v| Bytes::copy_from_slice(v.as_bytes()))
            .or_else(|| self.spec.upgrade.clone());
        let mut head = ResponseHead {
            status: 101,
            reason: None,
            headers: headers::end_to_end(&origin_headers),
        };
        if self.spec.callbacks.on_headers {
            let event = CallbackEvent::Headers(head);
            head = match self
                .proxy
                .callbacks
                .call(self.spec.id, event, &self.url())
                .await?
            {
                CallbackReply::Continue(changed) => changed,
                // The callback refused the switch with its own answer.
                CallbackReply::Render(rendered) => return self.write_rendered(rendered).await,
                CallbackReply::Failed { message } => return Err(self.callback_error(message)),
            };
        }
        self.validate_head(&head.headers)?;
        let upgraded = match tokio::time::timeout(self.spec.timeouts.idle, upgrade).await {
            Ok(Ok(upgraded)) => upgraded,
            Ok(Err(e)) => {
                return Err(ProxyError::Upstream {
                    url: self.spec.target.url(),
                    message: format!("upgrade failed: {e}"),
                    errno: None,
                })
            }
            Err(_) => {
                return Err(ProxyError::Timeout {
                    url: self.spec.target.url(),
                    phase: "upgrading the origin connection",
                })
            }
        };
        self.send_switch_head(101, &head.headers, protocol.as_deref())
            .await?;
        self.run_tunnel(TokioIo::new(upgraded)).await
    }

    /// `proxy_tunnel`: connect to a raw TCP service, answer 101 (or 200 for
    /// CONNECT), then copy bytes both ways.
    async fn raw_tunnel(&mut self, target: TunnelTarget) -> Result<(), ProxyError> {
        let connect = tokio::net::TcpStream::connect(self.spec.target.address());
        let stream = match tokio::time::timeout(self.spec.timeouts.connect, connect).await {
            Err(_) => {
                return Err(ProxyError::Timeout {
                    url: self.spec.target.url(),
                    phase: "connecting",
                })
            }
            Ok(Err(e)) => {
                return Err(ProxyError::Connect {
                    url: self.spec.target.url(),
                    message: e.to_string(),
                    errno: e.raw_os_error(),
                })
            }
            Ok(Ok(stream)) => stream,
        };
        let _ = stream.set_nodelay(true);
        self.time_to_first_byte = Some(self.started.elapsed());
        let status = if target.upgrade.is_some() { 101 } else { 200 };
        self.send_switch_head(status, &Vec::new(), target.upgrade.as_deref())
            .await?;
        self.run_tunnel(stream).await
    }

    async fn send_switch_head(
        &mut self,
        status: u16,
        headers: &HeaderList,
        protocol: Option<&[u8]>,
    ) -> Result<(), ProxyError> {
        let mut buf = BytesMut::new();
        headers::write_switch_head(&mut buf, status, headers, protocol);
        self.status = Some(status);
        let before = self.writer.bytes_written;
        let sent = self.writer.send_head(buf, Framing::None).await;
        self.count_to_client(before);
        sent
    }

    async fn run_tunnel<O: AsyncRead + AsyncWrite>(&mut self, origin: O) -> Result<(), ProxyError> {
        let Some(mut reader) = self.client_reader.take() else {
            return Err(ProxyError::Internal {
                message: "tunnel without the client's read half".to_owned(),
            });
        };
        let idle = self.spec.timeouts.idle;
        let result = tunnel::run(
            &mut reader,
            self.writer.io_mut(),
            origin,
            idle,
            &self.tunnel_counts,
        )
        .await;
        self.client_reader = Some(reader);
        let to_client = self.tunnel_counts.to_client.load(Relaxed);
        self.writer.add_written(to_client);
        self.bytes_from_origin += to_client;
        self.proxy.stats.bytes_to_client.fetch_add(to_client, Relaxed);
        self.proxy.stats.bytes_from_origin.fetch_add(to_client, Relaxed);
        match result {
            Ok(()) => {
                self.finished_cleanly = true;
                Ok(())
            }
            Err(TunnelEnd::Idle) => Err(ProxyError::Timeout {
                url: self.spec.target.url(),
                phase: "in an idle tunnel",
            }),
            Err(TunnelEnd::Failed(message)) => Err(ProxyError::Upstream {
                url: self.spec.target.url(),
                message,
                errno: None,
            }),
        }
    }

    fn release_splice_fds(&mut self) {
        if let Some(permit) = self.permit.as_mut() {
            permit.release(limits::SPLICE_FDS);
        }
    }

    fn callback_error(&self, message: String) -> ProxyError {
        ProxyError::Callback {
            url: self.spec.target.url(),
            message,
        }
    }

    fn validate_head(&self, headers: &HeaderList) -> Result<(), ProxyError> {
        headers::validate_all(headers).map_err(|message| ProxyError::InvalidHeader {
            url: self.spec.target.url(),
            message,
        })
    }

    /// Writes the (possibly changed) head and streams the origin body.
    async fn relay_origin<B>(
        &mut self,
        head: ResponseHead,
        body: B,
        body_length: Option<u64>,
        head_length: Option<u64>,
    ) -> Result<(), ProxyError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let framing = headers::framing(head.status, self.spec.client, body_length);
        self.hold_origin_head(&head, framing, head_length)?;
        if framing != Framing::None {
            self.copy_body(body, true).await?;
        }
        self.finish().await
    }

    /// Checks the (possibly changed) origin head and holds it for the body.
    fn hold_origin_head(
        &mut self,
        head: &ResponseHead,
        framing: Framing,
        head_length: Option<u64>,
    ) -> Result<(), ProxyError> {
        self.validate_head(&head.headers)?;
        self.hold_head(
            head.status,
            head.reason.as_deref(),
            &head.headers,
            framing,
            head_length,
        );
        Ok(())
    }

    /// Records the head as the one the client gets and hands it to the
    /// writer, which sends it with the first body bytes: a small answer is
    /// one writev. It leaves alone before anything waits (`copy_body`,
    /// `flush_head`, `finish`).
    fn hold_head(
        &mut self,
        status: u16,
        reason: Option<&str>,
        headers: &HeaderList,
        framing: Framing,
        head_length: Option<u64>,
    ) {
        let mut buf = BytesMut::new();
        headers::write_head(&mut buf, status, reason, headers, framing, head_length);
        self.status = Some(status);
        if self.spec.callbacks.finished {
            self.sent_head = Some(ResponseHead {
                status,
                reason: reason.map(str::to_owned),
                headers: headers.clone(),
            });
        }
        self.writer.hold_head(buf, framing);
    }

    fn count_from_origin(&mut self, n: u64) {
        self.bytes_from_origin += n;
        self.proxy.stats.bytes_from_origin.fetch_add(n, Relaxed);
    }

    fn count_to_client(&self, before: u64) {
        self.proxy
            .stats
            .bytes_to_client
            .fetch_add(self.writer.bytes_written - before, Relaxed);
    }

    async fn finish(&mut self) -> Result<(), ProxyError> {
        let before = self.writer.bytes_written;
        let finished = self.writer.finish().await;
        self.count_to_client(before);
        finished?;
        self.finished_cleanly = true;
        Ok(())
    }

    /// Copies a body frame by frame, each frame bounded by the idle timeout.
    /// A held head goes out with the first frame if that frame is already
    /// here, else alone before waiting: an event stream's head must not
    /// wait for its first event.
    async fn copy_body<B>(&mut self, mut body: B, from_origin: bool) -> Result<(), ProxyError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        if self.writer.head_held() {
            let ready = {
                let mut next = std::pin::pin!(self.next_data(&mut body, from_origin));
                std::future::poll_fn(|cx| Poll::Ready(next.as_mut().poll(cx))).await
            };
            match ready {
                Poll::Ready(Ok(Some(data))) => self.send_body(data).await?,
                // finish() sends the head (with the last chunk, if chunked).
                Poll::Ready(Ok(None)) => return Ok(()),
                Poll::Ready(Err(e)) => {
                    self.flush_head().await?;
                    return Err(e);
                }
                Poll::Pending => self.flush_head().await?,
            }
        }
        while let Some(data) = self.next_data(&mut body, from_origin).await? {
            self.send_body(data).await?;
        }
        Ok(())
    }

    async fn flush_head(&mut self) -> Result<(), ProxyError> {
        let before = self.writer.bytes_written;
        let flushed = self.writer.flush_head().await;
        self.count_to_client(before);
        flushed
    }

    /// One piece of body to the client, counted in the stats.
    async fn send_body(&mut self, data: Bytes) -> Result<(), ProxyError> {
        let before = self.writer.bytes_written;
        let sent = self.writer.send_body(data).await;
        self.count_to_client(before);
        sent
    }

    /// Reads a whole body into memory, refusing more than `max_buffered_body`.
    async fn read_whole<B>(&mut self, mut body: B) -> Result<Bytes, ProxyError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let limit = self.spec.max_buffered_body;
        let mut buf = BytesMut::new();
        while let Some(data) = self.next_data(&mut body, true).await? {
            if buf.len() + data.len() > limit {
                return Err(ProxyError::BodyTooLarge {
                    url: self.spec.target.url(),
                    limit,
                });
            }
            buf.extend_from_slice(&data);
        }
        Ok(buf.freeze())
    }

    /// The next data frame of a body (trailers skipped), waiting at most the
    /// idle timeout; counted as origin bytes when `from_origin`.
    async fn next_data<B>(&mut self, body: &mut B, from_origin: bool) -> Result<Option<Bytes>, ProxyError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        loop {
            let frame = match tokio::time::timeout(self.spec.timeouts.idle, body.frame()).await {
                Err(_) => {
                    return Err(ProxyError::Timeout {
                        url: self.spec.target.url(),
                        phase: "waiting for the response body",
                    })
                }
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) => {
                    let e: BoxError = e.into();
                    return Err(ProxyError::Upstream {
                        url: self.spec.target.url(),
                        message: origin::error::error_chain(e.as_ref()),
                        errno: None,
                    });
                }
                Ok(Some(Ok(frame))) => frame,
            };
            if let Ok(data) = frame.into_data() {
                if from_origin {
                    self.count_from_origin(data.len() as u64);
                }
                return Ok(Some(data));
            }
        }
    }

    /// `on_response`: the callback may read the body (we buffer it on
    /// request) and then render, or let the origin's response through.
    async fn serve_on_response<B>(
        &mut self,
        head: ResponseHead,
        body: B,
        body_length: Option<u64>,
        head_length: Option<u64>,
    ) -> Result<(), ProxyError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let proxy = self.proxy;
        let (body_tx, mut body_rx) = mpsc::unbounded_channel::<BodyRequest>();
        let mut reply_rx = proxy.callbacks.request(
            self.spec.id,
            CallbackEvent::Response(head.clone()),
            Some(body_tx),
            &self.spec.target.url(),
        )?;
        let deadline = tokio::time::Instant::now() + proxy.callbacks.reply_timeout;
        let mut origin_body = Some(body);
        let mut buffered: Option<Bytes> = None;
        let reply = loop {
            tokio::select! {
                reply = tokio::time::timeout_at(deadline, &mut reply_rx) => break reply,
                Some(slot) = body_rx.recv() => {
                    let result = match (&buffered, origin_body.take()) {
                        (Some(bytes), _) => Ok(bytes.clone()),
                        (None, Some(body)) => self.read_whole(body).await,
                        (None, None) => Err(ProxyError::BodyTooLarge { url: self.spec.target.url(), limit: self.spec.max_buffered_body }),
                    };
                    if let Ok(bytes) = &result {
                        buffered = Some(bytes.clone());
                    }
                    let _ = slot.push(result.as_ref().map(Bytes::clone).map_err(ErrorReport::from));
                }
            }
        };
        proxy.stats.callbacks_run.fetch_add(1, Relaxed);
        let reply = match reply {
            Err(_) => return Err(self.callback_error("on_response did not answer in time".to_owned())),
            Ok(Err(_)) => {
                return Err(self.callback_error("on_response finished without answering".to_owned()))
            }
            Ok(Ok(reply)) => reply,
        };
        match reply {
            CallbackReply::Render(rendered) => self.write_rendered(rendered).await,
            CallbackReply::Failed { message } => Err(self.callback_error(message)),
            CallbackReply::Continue(head) => match (buffered, origin_body) {
                (Some(bytes), _) => {
                    let length = Some(bytes.len() as u64);
                    self.relay_origin(head, http_body_util::Full::new(bytes), length, length)
                        .await
                }
                (None, Some(body)) => self.relay_origin(head, body, body_length, head_length).await,
                (None, None) => Err(self.callback_error("response body was lost".to_owned())),
            },
        }
    }

    /// Sends what a callback rendered, framed by its known length.
    async fn write_rendered(&mut self, rendered: Rendered) -> Result<(), ProxyError> {
        self.validate_head(&rendered.headers)?;
        match rendered.body {
            RenderedBody::Bytes(bytes) => {
                let framing = headers::framing(rendered.status, self.spec.client, Some(bytes.len() as u64));
                self.hold_head(
                    rendered.status,
                    None,
                    &rendered.headers,
                    framing,
                    Some(bytes.len() as u64),
                );
                if framing != Framing::None {
                    self.copy_body(http_body_util::Full::new(bytes), false).await?;
                }
            }
            RenderedBody::File(mut file) => {
                use std::io::Seek;
                let offset = file.stream_position().map_err(|e| self.file_error(e))?;
                let length = file
                    .metadata()
                    .map_err(|e| self.file_error(e))?
                    .len()
                    .saturating_sub(offset);
                let framing = headers::framing(rendered.status, self.spec.client, Some(length));
                let body = BodySource::File { file, offset }
                    .into_body()
                    .map_err(|e| self.file_error(e))?;
                self.hold_head(rendered.status, None, &rendered.headers, framing, Some(length));
                if framing != Framing::None {
                    self.copy_body(body, false).await?;
                }
            }
        }
        self.finish().await
    }

    fn file_error(&self, e: std::io::Error) -> ProxyError {
        ProxyError::Callback {
            url: self.spec.target.url(),
            message: format!("cannot read the rendered body: {e}"),
        }
    }

    /// The answer to a failure before anything was sent: what `on_error`
    /// renders, else the status for the error's kind.
    async fn answer_error(&mut self, err: &ProxyError) -> Result<(), ProxyError> {
        if self.spec.callbacks.on_error {
            let event = CallbackEvent::Error(ErrorReport::from(err));
            match self
                .proxy
                .callbacks
                .call(self.spec.id, event, &self.spec.target.url())
                .await
            {
                Ok(CallbackReply::Render(rendered)) => return self.write_rendered(rendered).await,
                Ok(CallbackReply::Continue(_)) => {}
                Ok(CallbackReply::Failed { message }) => {
                    return self
                        .write_rendered(default_answer(&self.callback_error(message)))
                        .await
                }
                Err(callback_err) => return self.write_rendered(default_answer(&callback_err)).await,
            }
        }
        self.write_rendered(default_answer(err)).await
    }
}

/// No descriptor left for the origin socket: an overload of this process
/// (503 with Retry-After), not a fault of the origin (502).
fn fds_exhausted(err: ProxyError) -> ProxyError {
    if !limits::out_of_fds(err.errno()) {
        return err;
    }
    ProxyError::Overload {
        url: err.url().unwrap_or_default().to_owned(),
        message: format!("out of file descriptors: {err}"),
    }
}

/// The plain answer for an error nobody rendered.
pub fn default_answer(err: &ProxyError) -> Rendered {
    let status = err.status();
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let mut headers: HeaderList = vec![
        (
            "content-type".to_owned(),
            Bytes::from_static(b"text/plain; charset=utf-8"),
        ),
        (
            "x-threaded-proxy-error".to_owned(),
            Bytes::from(err.kind().as_str()),
        ),
    ];
    if status == 503 {
        headers.push(("retry-after".to_owned(), Bytes::from_static(b"1")));
    }
    Rendered {
        status,
        headers,
        body: RenderedBody::Bytes(Bytes::from(format!("{status} {reason}\n"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_descriptors_at_the_origin_is_an_overload_not_a_bad_gateway() {
        let emfile = fds_exhausted(ProxyError::Connect {
            url: "http://a.test/".into(),
            message: "Too many open files".into(),
            errno: Some(libc::EMFILE),
        });
        assert_eq!((emfile.status(), emfile.url()), (503, Some("http://a.test/")));
        let refused = fds_exhausted(ProxyError::Connect {
            url: "u".into(),
            message: "refused".into(),
            errno: Some(libc::ECONNREFUSED),
        });
        assert_eq!(refused.status(), 502);
    }

    #[test]
    fn default_answers_map_kinds_to_statuses() {
        let overload = default_answer(&ProxyError::Overload {
            url: "u".into(),
            message: "m".into(),
        });
        assert_eq!(overload.status, 503);
        assert!(overload
            .headers
            .iter()
            .any(|(n, v)| n == "retry-after" && v == "1"));
        let timeout = default_answer(&ProxyError::Timeout {
            url: "u".into(),
            phase: "p",
        });
        assert_eq!(timeout.status, 504);
        let connect = default_answer(&ProxyError::Connect {
            url: "u".into(),
            message: "m".into(),
            errno: Some(111),
        });
        assert_eq!(connect.status, 502);
    }
}
