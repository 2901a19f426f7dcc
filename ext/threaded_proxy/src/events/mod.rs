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

pub mod encode;
pub mod postgres;
pub mod replay;
pub mod stream;
pub mod subscriber;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use replay::Ring;
use subscriber::Offer;
pub use subscriber::Subscriber;

/// One channel: who listens, and what it keeps for replay.
#[derive(Default)]
struct Channel {
    /// The streams registered under this channel now.
    subscribers: Vec<Arc<Subscriber>>,
    /// The last events with an id, for `Last-Event-ID`.
    ring: Ring,
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
    /// Channel name → its subscribers and ring. One lock: a publish holds it
    /// while it queues (a push per subscriber, no I/O), a stream while it
    /// joins or leaves.
    channels: Mutex<HashMap<Box<str>, Channel>>,
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
        Hub {
            pid,
            channels: Mutex::new(HashMap::new()),
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Channel>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
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
        let mut map = self.lock();
        for name in channels {
            let channel = map.entry(name.as_str().into()).or_default();
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
    /// no subscriber and nothing to replay is forgotten.
    pub fn unsubscribe(&self, channels: &[String], sub: &Subscriber) {
        let mut map = self.lock();
        for name in channels {
            let Some(channel) = map.get_mut(name.as_str()) else {
                continue;
            };
            if let Some(i) = channel.subscribers.iter().position(|s| s.id() == sub.id()) {
                channel.subscribers.swap_remove(i);
            }
            if channel.subscribers.is_empty() && channel.ring.is_empty() {
                map.remove(name.as_str());
            }
        }
        drop(map);
        self.stats.dropped.fetch_add(sub.close(), Relaxed);
    }

    /// Queues `event` for every subscriber of `channel` and, with an id,
    /// keeps it in the channel's ring (at most `replay` events). Returns how
    /// many subscribers it was queued for.
    pub fn publish(&self, channel: &str, event: Bytes, id: Option<&str>, replay: usize) -> usize {
        self.stats.published.fetch_add(1, Relaxed);
        let mut map = self.lock();
        let found = match map.get_mut(channel) {
            Some(found) => found,
            None if id.is_some() && replay > 0 => map.entry(channel.into()).or_default(),
            None => return 0,
        };
        if let Some(id) = id {
            found.ring.push(id, event.clone(), replay);
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
        queued
    }

    /// Subscribers of `channel` now.
    pub fn subscribers(&self, channel: &str) -> usize {
        self.lock().get(channel).map_or(0, |c| c.subscribers.len())
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
}
