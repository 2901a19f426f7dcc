//! One event stream's tokio task: writes the head, then whatever its
//! subscriber's queue gets, a heartbeat after `heartbeat` seconds of
//! silence, and ends (leaving the hub) when the client reads EOF, a write
//! fails, the queue passed its bound, or the proxy cuts every connection.
//!
//! A write that makes no progress for [`stall_limit`] (the client stopped
//! reading and the socket buffers are full) cuts the stream as a slow
//! subscriber, publishes or not: a stuck reader never holds its fd forever.
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
            stall: stall_limit(heartbeat),
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

/// The shortest [`stall_limit`]: a short heartbeat must not cut a client over
/// an ordinary network hiccup (TCP's first retransmissions back off 1 s,
/// then 2 s).
pub const STALL_FLOOR: Duration = Duration::from_secs(5);

/// How long a write may make no progress before the stream is cut:
/// `max(2 x heartbeat, STALL_FLOOR)`. A reading client takes every
/// heartbeat, so a write still blocked after two of them is a client that
/// stopped reading; progress of any size restarts the clock, so a slow but
/// reading link is never cut by it (only by `event_queue_bytes`).
pub fn stall_limit(heartbeat: Duration) -> Duration {
    heartbeat.saturating_mul(2).max(STALL_FLOOR)
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
    /// No write progress for this long cuts the stream ([`stall_limit`]).
    stall: Duration,
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
        // The silence deadline moves with every write as a plain Instant;
        // the timer stays armed where it was and, firing early, is re-armed
        // once for the moved deadline. (Resetting it per event would be a
        // timer-wheel update per event per subscriber in a fan-out.)
        let mut quiet_until = Instant::now() + self.heartbeat;
        let heartbeat = tokio::time::sleep_until(quiet_until);
        tokio::pin!(heartbeat);
        // One wait on the shutdown signal for the stream's life: a new one
        // per event would register and deregister in the watch channel
        // every stream shares, a lock all of a fan-out's writers contend on.
        let cancelled = cancel.changed();
        tokio::pin!(cancelled);
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
                _ = &mut heartbeat => {
                    if Instant::now() < quiet_until {
                        heartbeat.as_mut().reset(quiet_until);
                        continue;
                    }
                    if self.end_when_idle {
                        let _ = w.shutdown().await;
                        return;
                    }
                    if self.write(&mut r, &mut w, HEARTBEAT, &mut probe).await.is_err() {
                        return;
                    }
                    quiet_until = Instant::now() + self.heartbeat;
                    heartbeat.as_mut().reset(quiet_until);
                }
                n = r.read(&mut probe) => if !matches!(n, Ok(n) if n > 0) { return },
                _ = &mut cancelled => return,
            }
        }
    }

    /// Writes `bytes` whole, unless the client leaves (EOF, error), the
    /// subscriber is cut meanwhile (its queue passed the bound while a
    /// client that stopped reading blocked the write), or the write makes
    /// no progress for `stall` (cut too, counted as a slow subscriber).
    async fn write<R, W>(&self, r: &mut R, w: &mut W, mut bytes: &[u8], probe: &mut [u8]) -> Result<(), Gone>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut stalled_at = Instant::now() + self.stall;
        while !bytes.is_empty() {
            tokio::select! {
                // The write first: one that completes at once (the usual
                // case in a fan-out) never polls, so never arms, the timer.
                biased;
                res = w.write(bytes) => match res {
                    Ok(0) | Err(_) => return Err(Gone),
                    Ok(n) => {
                        bytes = &bytes[n..];
                        stalled_at = Instant::now() + self.stall;
                    }
                },
                _ = self.sub.woken() => if self.sub.is_cut() { return Err(Gone) },
                n = r.read(probe) => if !matches!(n, Ok(n) if n > 0) { return Err(Gone) },
                _ = tokio::time::sleep_until(stalled_at) => {
                    self.stats.slow_cuts.fetch_add(1, Relaxed);
                    return Err(Gone);
                }
            }
        }
        w.flush().await.map_err(|_| Gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, split};

    fn job<'a>(sub: &'a Subscriber, stats: &'a EventStats) -> Job<'a> {
        Job {
            sub,
            stats,
            heartbeat: Duration::from_secs(1),
            stall: stall_limit(Duration::from_secs(1)),
            end_when_idle: false,
        }
    }

    #[test]
    fn the_stall_limit_is_two_heartbeats_with_a_floor() {
        assert_eq!(stall_limit(Duration::from_secs(15)), Duration::from_secs(30));
        assert_eq!(stall_limit(Duration::from_millis(100)), STALL_FLOOR);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_cut_without_another_publish() {
        let (stats, sub) = (EventStats::default(), Subscriber::new(1, 1 << 20));
        let (server, mut client) = duplex(64);
        let (r, w) = split(server);
        sub.offer(&Bytes::from(vec![b'x'; 4096]));
        let started = Instant::now();
        // The client holds its end open and reads nothing: the 64-byte pipe
        // fills and the write waits; no publish follows.
        tokio::time::timeout(
            Duration::from_secs(60),
            job(&sub, &stats).serve(r, w, Bytes::new(), watch::channel(false).1),
        )
        .await
        .expect("a stuck reader must be cut");
        assert_eq!(started.elapsed(), STALL_FLOOR);
        assert_eq!(stats.slow_cuts.load(Relaxed), 1);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 64); // truncated, and the client sees EOF
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_client_that_keeps_reading_is_not_cut() {
        let (stats, sub) = (EventStats::default(), Subscriber::new(1, 1 << 20));
        let (server, mut client) = duplex(64);
        let (r, w) = split(server);
        sub.offer(&Bytes::from(vec![b'x'; 640]));
        let (_tx, cancel) = watch::channel(false);
        let reader = async {
            // 64 bytes every 4 s: slower than the heartbeat, under the limit.
            let mut buf = [0u8; 64];
            let mut total = 0;
            while total < 640 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                total += client.read(&mut buf).await.unwrap();
            }
            total
        };
        let job = job(&sub, &stats);
        tokio::select! {
            _ = job.serve(r, w, Bytes::new(), cancel) => panic!("the stream ended"),
            total = reader => assert_eq!(total, 640),
        }
        assert_eq!(stats.slow_cuts.load(Relaxed), 0);
        assert_eq!(stats.delivered.load(Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_heartbeat_follows_the_last_write_not_the_first_timer() {
        let (stats, sub) = (EventStats::default(), Subscriber::new(1, 1 << 20));
        let (server, mut client) = duplex(4096);
        let (r, w) = split(server);
        let (_tx, cancel) = watch::channel(false);
        let started = Instant::now();
        let client_side = async {
            let mut buf = [0u8; 64];
            for (after, event) in [(0, &b"data: a\n\n"[..]), (600, b"data: b\n\n")] {
                tokio::time::sleep(Duration::from_millis(after)).await;
                sub.offer(&Bytes::copy_from_slice(event));
                let n = client.read(&mut buf).await.unwrap();
                assert_eq!(&buf[..n], event);
            }
            let n = client.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], HEARTBEAT);
            started.elapsed()
        };
        let job = job(&sub, &stats);
        tokio::select! {
            _ = job.serve(r, w, Bytes::new(), cancel) => panic!("the stream ended"),
            // 1 s of silence after the event at 0.6 s, not 1 s after the start.
            elapsed = client_side => assert_eq!(elapsed, Duration::from_millis(1600)),
        }
    }
}
