//! Event streams from Ruby: `stream_events` sockets registered under
//! channels, fed by `publish` without a Ruby thread or a Ruby call per event.
//!
//! - `encode`: the SSE wire format (head, event, heartbeat).
//! - `replay`: the per-channel ring behind `Last-Event-ID`.
//! - `subscriber`: one stream's bounded queue, shared by the hub and its task.
//! - `postgres`: `events_url`: publish through PostgreSQL NOTIFY, one
//!   LISTEN connection per process that fans out locally.
//! - `stream`: the tokio task of one stream (writes, heartbeat, leave).
//!
//! The hub maps a channel to its subscribers and its ring. `publish`
//! encodes once and pushes the same `Bytes` into every subscriber's queue
//! under the hub lock (so a subscription either sees an event in its replay
//! or in its queue, never both, never neither); each stream's task writes
//! its queue to its socket. One hub per process, rebuilt after fork like the
//! runtime (an inherited hub lists the parent's streams).
//!
//! Forgetting: a channel with no subscriber is kept only for its ring, and
//! only for a while: one unused (no publish, no subscriber) for
//! [`IDLE_TTL`] is forgotten, and at most [`IDLE_CHANNELS`] such channels
//! are kept (the least recently used go first), so many unique channels
//! (`task:N`) cannot grow memory without bound. A channel with a subscriber
//! is never forgotten.

pub mod encode;
pub mod postgres;
pub mod replay;
pub mod stream;
pub mod subscriber;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use replay::Ring;
use subscriber::Offer;
pub use subscriber::Subscriber;

/// A channel without subscribers unused this long is forgotten (its ring
/// with it): a client reconnects within seconds (`retry:`), a few minutes
/// covers a deploy or a network outage.
pub const IDLE_TTL: Duration = Duration::from_secs(300);

/// At most this many channels without subscribers are remembered; past it
/// the least recently used are forgotten. Worst case memory for rings:
/// this × `event_replay` × an event's size.
pub const IDLE_CHANNELS: usize = 10_000;

/// One channel: who listens, and what it keeps for replay.
struct Channel {
    /// The streams registered under this channel now.
    subscribers: Vec<Arc<Subscriber>>,
    /// The last events with an id, for `Last-Event-ID`.
    ring: Ring,
    /// Its last publish or leave: how recently an idle channel was used.
    touched: Instant,
}

impl Channel {
    fn new(now: Instant) -> Channel {
        Channel {
            subscribers: Vec::new(),
            ring: Ring::default(),
            touched: now,
        }
    }
}

/// The channels, and when to look for idle ones to forget.
struct Channels {
    /// Channel name → its subscribers and ring.
    map: HashMap<Box<str>, Channel>,
    /// Channels that became idle (no subscriber, a ring) since the last
    /// sweep: a sweep at `idle_cap / 2` keeps at most `idle_cap` idle.
    became_idle: usize,
    /// The next sweep for channels past the TTL, even under the cap.
    sweep_at: Instant,
}

/// Counters behind the `events_*` stats (plain atomics).
#[derive(Default)]
pub struct EventStats {
    /// Streams whose socket Rust holds now.
    pub streams_open: AtomicU64,
    /// Streams ever started (admitted).
    pub streams_started: AtomicU64,
    /// Streams refused at admission (503).
    pub streams_rejected: AtomicU64,
    /// `publish` calls in this process.
    pub published: AtomicU64,
    /// Events written to a socket (one per subscriber, replays included).
    pub delivered: AtomicU64,
    /// Events a subscriber never got: over its queue bound, or queued when
    /// its stream ended.
    pub dropped: AtomicU64,
    /// Streams disconnected because their queue passed `event_queue_bytes`.
    pub slow_cuts: AtomicU64,
    /// Events sent to PostgreSQL by `publish` (events_url).
    pub notified: AtomicU64,
    /// 1 while the LISTEN connection is up (events_url).
    pub listener_alive: AtomicU64,
    /// Idle channels forgotten with their ring (TTL or cap).
    pub channels_forgotten: AtomicU64,
    /// LISTEN connections lost or refused.
    pub listener_errors: AtomicU64,
    /// Events read from the table after a reconnect.
    pub caught_up: AtomicU64,
}

impl EventStats {
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("events_streams_open", self.streams_open.load(Relaxed)),
            ("events_streams_started", self.streams_started.load(Relaxed)),
            ("events_streams_rejected", self.streams_rejected.load(Relaxed)),
            ("events_published", self.published.load(Relaxed)),
            ("events_delivered", self.delivered.load(Relaxed)),
            ("events_dropped", self.dropped.load(Relaxed)),
            ("events_slow_disconnects", self.slow_cuts.load(Relaxed)),
            ("events_channels_forgotten", self.channels_forgotten.load(Relaxed)),
            ("events_notified", self.notified.load(Relaxed)),
            ("events_listener_alive", self.listener_alive.load(Relaxed)),
            ("events_listener_errors", self.listener_errors.load(Relaxed)),
            ("events_caught_up", self.caught_up.load(Relaxed)),
        ]
    }
}

/// The process's channels and counters.
pub struct Hub {
    /// The process that built it (see [`hub`]).
    pid: u32,
    /// The channels. One lock: a publish holds it while it queues (a push
    /// per subscriber, no I/O), a stream while it joins or leaves.
    channels: Mutex<Channels>,
    /// [`IDLE_TTL`] (shorter in tests).
    idle_ttl: Duration,
    /// [`IDLE_CHANNELS`] (smaller in tests).
    idle_cap: usize,
    /// Ids for subscribers, so a leaving stream finds itself in the lists.
    next_id: AtomicU64,
    /// The counters.
    pub stats: EventStats,
    /// `event_replay`, for events that arrive from PostgreSQL (a local
    /// publish passes its own).
    replay: AtomicUsize,
    /// The events_url this process LISTENs on, once its listener started.
    pub listening: Mutex<Option<String>>,
}

static HUB: Mutex<Option<&'static Hub>> = Mutex::new(None);

/// This process's hub, built on first use and again after fork (the old one
/// is leaked, as the runtime is: its streams belong to the parent).
pub fn hub() -> &'static Hub {
    let mut slot = HUB.lock().unwrap_or_else(|e| e.into_inner());
    let pid = std::process::id();
    match *slot {
        Some(hub) if hub.pid == pid => hub,
        _ => {
            let hub: &'static Hub = Box::leak(Box::new(Hub::new(pid)));
            *slot = Some(hub);
            hub
        }
    }
}

/// The hub if this process built one (stats without building it).
pub fn existing() -> Option<&'static Hub> {
    let slot = HUB.lock().unwrap_or_else(|e| e.into_inner());
    slot.filter(|h| h.pid == std::process::id())
}

impl Hub {
    pub fn new(pid: u32) -> Hub {
        Hub::with_limits(pid, IDLE_TTL, IDLE_CHANNELS)
    }

    /// A hub that forgets idle channels after `idle_ttl` or past `idle_cap`.
    pub fn with_limits(pid: u32, idle_ttl: Duration, idle_cap: usize) -> Hub {
        Hub {
            pid,
            channels: Mutex::new(Channels {
                map: HashMap::new(),
                became_idle: 0,
                sweep_at: Instant::now() + idle_ttl / 4,
            }),
            idle_ttl,
            idle_cap: idle_cap.max(2),
            next_id: AtomicU64::new(1),
            stats: EventStats::default(),
            replay: AtomicUsize::new(100),
            listening: Mutex::new(None),
        }
    }

    pub fn replay(&self) -> usize {
        self.replay.load(Relaxed)
    }

    pub fn set_replay(&self, replay: usize) {
        self.replay.store(replay, Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Channels> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Channels remembered now (with subscribers or a ring).
    pub fn channels(&self) -> usize {
        self.lock().map.len()
    }

    /// Forgets idle channels when `idle_cap / 2` became idle since the last
    /// sweep or a quarter TTL passed: one pass over the map per `idle_cap / 2`
    /// new idle channels (amortised O(1) per publish), under the hub lock.
    /// An idle channel goes after `idle_ttl` unused; past that, the least
    /// recently used beyond `idle_cap / 2` go, so at most `idle_cap` are
    /// ever idle.
    fn sweep(&self, channels: &mut Channels, now: Instant) {
        if channels.became_idle < self.idle_cap / 2 && now < channels.sweep_at {
            return;
        }
        let before = channels.map.len();
        let ttl = self.idle_ttl;
        channels
            .map
            .retain(|_, c| !c.subscribers.is_empty() || now.saturating_duration_since(c.touched) < ttl);
        let mut idle: Vec<Instant> = channels
            .map
            .values()
            .filter(|c| c.subscribers.is_empty())
            .map(|c| c.touched)
            .collect();
        let keep = self.idle_cap / 2;
        if idle.len() > keep {
            let forget = idle.len() - keep;
            let (_, cutoff, _) = idle.select_nth_unstable(forget - 1);
            let cutoff = *cutoff;
            channels
                .map
                .retain(|_, c| !c.subscribers.is_empty() || c.touched > cutoff);
        }
        let forgotten = before - channels.map.len();
        self.stats.channels_forgotten.fetch_add(forgotten as u64, Relaxed);
        channels.became_idle = 0;
        channels.sweep_at = now + ttl / 4;
    }

    /// Sweeps as if it were `now` (tests: a TTL passing without waiting).
    #[cfg(test)]
    fn sweep_now(&self, now: Instant) {
        let mut channels = self.lock();
        channels.became_idle = usize::MAX;
        self.sweep(&mut channels, now);
    }

    /// Registers a new subscriber under `channels`. With `last_id`, first
    /// queues what each channel's ring holds after it (under the same lock
    /// as the registration: no event both replayed and queued, none lost).
    pub fn subscribe(
        &self,
        channels: &[String],
        last_id: Option<&str>,
        queue_bytes: usize,
    ) -> Arc<Subscriber> {
        let sub = Arc::new(Subscriber::new(self.next_id.fetch_add(1, Relaxed), queue_bytes));
        let now = Instant::now();
        let mut guard = self.lock();
        let map = &mut guard.map;
        for name in channels {
            let channel = map
                .entry(name.as_str().into())
                .or_insert_with(|| Channel::new(now));
            if let Some(last_id) = last_id {
                for event in channel.ring.since(last_id) {
                    // A replay larger than the queue bound cuts at once:
                    // the client reconnects and gets the rest later.
                    if let Offer::Cut(n) = sub.offer(event) {
                        self.stats.dropped.fetch_add(n, Relaxed);
                        self.stats.slow_cuts.fetch_add(1, Relaxed);
                    }
                }
            }
            channel.subscribers.push(sub.clone());
        }
        sub
    }

    /// Removes `sub` from `channels` (its stream ended). A channel left with
    /// no subscriber and nothing to replay is forgotten; one with a ring is
    /// kept until it idles out (see [`Hub::sweep`]).
    pub fn unsubscribe(&self, channels: &[String], sub: &Subscriber) {
        let now = Instant::now();
        let mut guard = self.lock();
        let map = &mut guard.map;
        let mut became_idle = 0;
        for name in channels {
            let Some(channel) = map.get_mut(name.as_str()) else {
                continue;
            };
            if let Some(i) = channel.subscribers.iter().position(|s| s.id() == sub.id()) {
                channel.subscribers.swap_remove(i);
            }
            if channel.subscribers.is_empty() {
                if channel.ring.is_empty() {
                    map.remove(name.as_str());
                } else {
                    channel.touched = now;
                    became_idle += 1;
                }
            }
        }
        guard.became_idle += became_idle;
        self.sweep(&mut guard, now);
        drop(guard);
        self.stats.dropped.fetch_add(sub.close(), Relaxed);
    }

    /// Queues `event` for every subscriber of `channel` and, with an id,
    /// keeps it in the channel's ring (at most `replay` events). Returns how
    /// many subscribers it was queued for.
    pub fn publish(&self, channel: &str, event: Bytes, id: Option<&str>, replay: usize) -> usize {
        self.stats.published.fetch_add(1, Relaxed);
        let now = Instant::now();
        let mut guard = self.lock();
        let channels = &mut *guard;
        let found = match channels.map.get_mut(channel) {
            Some(found) => found,
            None if id.is_some() && replay > 0 => {
                channels.became_idle += 1;
                channels
                    .map
                    .entry(channel.into())
                    .or_insert_with(|| Channel::new(now))
            }
            None => return 0,
        };
        found.touched = now;
        if let Some(id) = id {
            found.ring.push(id, event.clone(), replay);
        }
        if found.subscribers.is_empty() {
            // Nothing to queue: only an idle channel's ring grew.
            self.sweep(channels, now);
            return 0;
        }
        let mut queued = 0;
        for sub in &found.subscribers {
            match sub.offer(&event) {
                Offer::Queued => queued += 1,
                Offer::Cut(n) => {
                    self.stats.dropped.fetch_add(n, Relaxed);
                    self.stats.slow_cuts.fetch_add(1, Relaxed);
                }
                Offer::Closed => {}
            }
        }
        self.sweep(channels, now);
        queued
    }

    /// Subscribers of `channel` now.
    pub fn subscribers(&self, channel: &str) -> usize {
        self.lock().map.get(channel).map_or(0, |c| c.subscribers.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(sub: &Subscriber) -> Vec<Bytes> {
        let mut out = Vec::new();
        while let subscriber::Pop::Event(e) = sub.pop() {
            out.push(e);
        }
        out
    }

    #[test]
    fn publish_reaches_every_subscriber_with_one_shared_buffer() {
        let hub = Hub::new(0);
        let a = hub.subscribe(&["c".into()], None, 1 << 20);
        let b = hub.subscribe(&["c".into(), "d".into()], None, 1 << 20);
        let event = Bytes::from_static(b"data: x\n\n");
        assert_eq!(hub.publish("c", event.clone(), None, 10), 2);
        assert_eq!(hub.publish("d", event.clone(), None, 10), 1);
        assert_eq!(hub.publish("nobody", event.clone(), None, 10), 0);
        let got = drain(&a);
        assert_eq!(got.len(), 1);
        // The same allocation, not a copy.
        assert_eq!(got[0].as_ptr(), event.as_ptr());
        assert_eq!(drain(&b).len(), 2);
        hub.unsubscribe(&["c".into(), "d".into()], &b);
        assert_eq!((hub.subscribers("c"), hub.subscribers("d")), (1, 0));
    }

    #[test]
    fn a_subscriber_past_its_bound_is_cut_and_the_others_are_not() {
        let hub = Hub::new(0);
        let slow = hub.subscribe(&["c".into()], None, 20);
        let fast = hub.subscribe(&["c".into()], None, 1 << 20);
        let event = Bytes::from_static(b"data: 0123456789\n\n"); // 18 bytes
        assert_eq!(hub.publish("c", event.clone(), None, 0), 2);
        drain(&fast);
        assert_eq!(hub.publish("c", event.clone(), None, 0), 1);
        assert!(slow.is_cut());
        assert_eq!(hub.stats.slow_cuts.load(Relaxed), 1);
        assert_eq!(hub.stats.dropped.load(Relaxed), 2);
        assert_eq!(drain(&fast).len(), 1);
    }

    #[test]
    fn a_subscription_replays_after_last_event_id_then_gets_new_events() {
        let hub = Hub::new(0);
        for id in ["1", "2", "3"] {
            hub.publish("c", Bytes::from(format!("id: {id}\n\n")), Some(id), 2);
        }
        let sub = hub.subscribe(&["c".into()], Some("2"), 1 << 20);
        hub.publish("c", Bytes::from_static(b"new"), None, 2);
        assert_eq!(
            drain(&sub),
            [Bytes::from_static(b"id: 3\n\n"), Bytes::from_static(b"new")]
        );
    }

    #[test]
    fn many_unique_channels_keep_at_most_the_cap_and_the_newest_still_replay() {
        let hub = Hub::with_limits(0, IDLE_TTL, 10);
        let listened = hub.subscribe(&["task:0".into()], None, 1 << 20);
        for n in 0..1000 {
            hub.publish(
                &format!("task:{n}"),
                Bytes::from(format!("id: {n}\n\n")),
                Some("1"),
                100,
            );
            assert!(hub.channels() <= 10 + 1, "{} channels after {n}", hub.channels());
        }
        assert!(hub.stats.channels_forgotten.load(Relaxed) >= 989);
        // A channel with a subscriber is never forgotten, however old.
        assert_eq!(hub.subscribers("task:0"), 1);
        drop(listened);
        let late = hub.subscribe(&["task:999".into()], Some("0"), 1 << 20);
        assert_eq!(drain(&late), [Bytes::from_static(b"id: 999\n\n")]);
        // The oldest idle ones went first: task:1 replays nothing now.
        let early = hub.subscribe(&["task:1".into()], Some("0"), 1 << 20);
        assert!(drain(&early).is_empty());
    }

    #[test]
    fn an_idle_channel_is_forgotten_after_the_ttl_and_a_used_one_is_not() {
        let ttl = Duration::from_secs(60);
        let hub = Hub::with_limits(0, ttl, 1000);
        for channel in ["old", "kept", "listened"] {
            hub.publish(channel, Bytes::from_static(b"id: 1\n\n"), Some("1"), 10);
        }
        let sub = hub.subscribe(&["listened".into()], None, 1 << 20);
        let left = hub.subscribe(&["left".into()], None, 1 << 20);
        hub.publish("left", Bytes::from_static(b"id: 1\n\n"), Some("1"), 10);
        hub.unsubscribe(&["left".into()], &left); // idle from now, ring kept
        hub.sweep_now(Instant::now() + ttl / 2);
        assert_eq!(hub.channels(), 4);
        hub.sweep_now(Instant::now() + ttl - Duration::from_secs(1));
        assert_eq!(hub.channels(), 4, "nothing is past the TTL yet");
        hub.sweep_now(Instant::now() + ttl + Duration::from_millis(10));
        // Every idle one is past the TTL now; the listened one stays.
        assert_eq!(hub.channels(), 1);
        assert_eq!(hub.subscribers("listened"), 1);
        assert_eq!(hub.stats.channels_forgotten.load(Relaxed), 3);
        drop(sub);
    }
}
