//! One event stream's tokio task: writes the head, then whatever its
//! subscriber's queue gets, a heartbeat after `heartbeat` seconds of
//! silence, and ends (leaving the hub) when the client reads EOF, a write
//! fails, the queue passed its bound, or the proxy cuts every connection.
//!
//! An idle stream costs its socket, its subscriber (a queue that holds no
//! allocation when empty) and this task: no buffer, the timer lives inside
//! the task's future.

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use super::encode::HEARTBEAT;
use super::subscriber::Pop;
use super::{EventStats, Hub, Subscriber};
use crate::errors::ProxyError;
use crate::handoff::{self, ClientSocket};
use crate::limits::{Permit, STREAM_FDS};
use crate::runtime::Proxy;

/// What `stream_events` asked for, checked by Ruby and again by the
/// bindings.
pub struct StreamSpec {
    /// The channels the stream is registered under.
    pub channels: Vec<String>,
    /// The encoded response head (and `retry:` line).
    pub head: Bytes,
    /// Silence after which a heartbeat goes out (or, with
    /// `end_when_idle`, the stream ends).
    pub heartbeat: Duration,
    /// The client's `Last-Event-ID` when replay is on.
    pub last_event_id: Option<String>,
    /// `event_queue_bytes`.
    pub queue_bytes: usize,
    /// The rack-test fallback: end the stream after `heartbeat` seconds
    /// without an event instead of sending a heartbeat, so a test's read
    /// of the body ends.
    pub end_when_idle: bool,
}

/// Admission of a stream: it holds one descriptor and counts in
/// `max_connections` and `fd_budget` like an exchange (no per-origin cap:
/// it has no origin). Refused with the same Overload error (503).
pub fn admit(proxy: &'static Proxy, hub: &Hub) -> Result<Permit<'static>, ProxyError> {
    let refuse = |message: &str| {
        hub.stats.streams_rejected.fetch_add(1, Relaxed);
        ProxyError::Overload {
            url: "stream_events".to_owned(),
            message: message.to_owned(),
        }
    };
    if !proxy.accepting() {
        return Err(refuse("shutting down"));
    }
    proxy.limits.try_acquire("", STREAM_FDS).map_err(refuse)
}

/// Registers the stream under its channels now (a publish right after the
/// action returns reaches it) and starts its task on the runtime.
pub fn start(
    proxy: &'static Proxy,
    hub: &'static Hub,
    client: OwnedFd,
    spec: StreamSpec,
    permit: Permit<'static>,
) {
    hub.stats.streams_started.fetch_add(1, Relaxed);
    hub.stats.streams_open.fetch_add(1, Relaxed);
    let sub = hub.subscribe(&spec.channels, spec.last_event_id.as_deref(), spec.queue_bytes);
    let membership = Membership {
        hub,
        channels: spec.channels,
        sub,
    };
    let cancel = proxy.cancelled();
    let head = spec.head;
    let (heartbeat, end_when_idle) = (spec.heartbeat, spec.end_when_idle);
    proxy.runtime.spawn(async move {
        let _permit = permit;
        let membership = membership;
        let Ok(socket) = handoff::adopt(client) else {
            return;
        };
        let job = Job {
            sub: &membership.sub,
            stats: &hub.stats,
            heartbeat,
            end_when_idle,
        };
        match socket {
            ClientSocket::Tcp(mut s) => {
                let (r, w) = s.split();
                job.serve(r, w, head, cancel).await
            }
            ClientSocket::Unix(mut s) => {
                let (r, w) = s.split();
                job.serve(r, w, head, cancel).await
            }
        }
    });
}

/// The stream's place in the hub; leaving it (however the task ends, a
/// panic included) unsubscribes and counts the stream closed.
struct Membership {
    /// Where it is registered.
    hub: &'static Hub,
    /// Under which channels.
    channels: Vec<String>,
    /// Its queue.
    sub: Arc<Subscriber>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.hub.unsubscribe(&self.channels, &self.sub);
        self.hub.stats.streams_open.fetch_sub(1, Relaxed);
    }
}

/// What the write loop needs, borrowed from the task.
struct Job<'a> {
    /// The queue to write from (and whether it was cut).
    sub: &'a Subscriber,
    /// Where deliveries are counted.
    stats: &'a EventStats,
    /// Silence before a heartbeat (or the end, with `end_when_idle`).
    heartbeat: Duration,
    /// The rack-test fallback: end instead of sending a heartbeat.
    end_when_idle: bool,
}

/// Why a stream stops.
struct Gone;

impl Job<'_> {
    async fn serve<R, W>(&self, mut r: R, mut w: W, head: Bytes, mut cancel: watch::Receiver<bool>)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if *cancel.borrow_and_update() {
            return;
        }
        // Bytes a client sends are read and ignored; read only to see EOF.
        let mut probe = [0u8; 32];
        if self.write(&mut r, &mut w, &head, &mut probe).await.is_err() {
            return;
        }
        drop(head);
        let mut quiet_until = Instant::now() + self.heartbeat;
        loop {
            match self.sub.pop() {
                Pop::Event(event) => {
                    if self.write(&mut r, &mut w, &event, &mut probe).await.is_err() {
                        return;
                    }
                    self.stats.delivered.fetch_add(1, Relaxed);
                    quiet_until = Instant::now() + self.heartbeat;
                    continue;
                }
                Pop::Cut => return,
                Pop::Empty => {}
            }
            tokio::select! {
                _ = self.sub.woken() => {}
                _ = tokio::time::sleep_until(quiet_until) => {
                    if self.end_when_idle {
                        let _ = w.shutdown().await;
                        return;
                    }
                    if self.write(&mut r, &mut w, HEARTBEAT, &mut probe).await.is_err() {
                        return;
                    }
                    quiet_until = Instant::now() + self.heartbeat;
                }
                n = r.read(&mut probe) => if !matches!(n, Ok(n) if n > 0) { return },
                _ = cancel.changed() => return,
            }
        }
    }

    /// Writes `bytes` whole, unless the client leaves (EOF, error) or the
    /// subscriber is cut meanwhile (a client that stopped reading blocks
    /// the write; its queue passing the bound ends the wait).
    async fn write<R, W>(&self, r: &mut R, w: &mut W, bytes: &[u8], probe: &mut [u8]) -> Result<(), Gone>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let write = w.write_all(bytes);
        tokio::pin!(write);
        loop {
            tokio::select! {
                res = &mut write => return res.map_err(|_| Gone),
                _ = self.sub.woken() => if self.sub.is_cut() { return Err(Gone) },
                n = r.read(probe) => if !matches!(n, Ok(n) if n > 0) { return Err(Gone) },
            }
        }
    }
}
