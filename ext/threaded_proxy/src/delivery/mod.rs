//! Deferred delivery (`proxy_async`): a request is stored durably first,
//! the action answers its client, and a background worker on this
//! process's tokio runtime delivers it with a concurrency cap, a rate, a
//! timeout per attempt and retries with exponential backoff and jitter.
//!
//! - `store`: the [`store::DeliveryStore`] trait and its backends: the
//!   embedded SQLite one (`store::sqlite`, one WAL file shared by every
//!   process of a machine) and PostgreSQL (`store::postgres`, processes on
//!   several machines; claims with `SKIP LOCKED`).
//! - `worker`: the claim loop, one attempt, the outcome of an attempt.
//!
//! One [`Delivery`] per process, started on demand and started again in a
//! forked child (the parent's is leaked there, like the runtime: its
//! SQLite connection must never be used or closed across fork).

pub mod store;
pub mod worker;

use std::fmt;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use crate::runtime::{self, Tracker};
use store::{postgres, DeliveryStore, SqliteStore, StoreError};

/// Where the queue lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueLocation {
    /// An SQLite file shared by the processes of one machine.
    Sqlite(PathBuf),
    /// A `postgres://` URL: processes on any number of machines.
    Postgres(String),
}

impl QueueLocation {
    fn open(&self, connect_timeout: Duration) -> Result<Arc<dyn DeliveryStore>, StoreError> {
        Ok(match self {
            QueueLocation::Sqlite(path) => Arc::new(SqliteStore::open(path)?),
            QueueLocation::Postgres(url) => Arc::new(postgres::PostgresStore::open(url, connect_timeout)?),
        })
    }
}

/// For messages: the path, or the URL without its password.
impl fmt::Display for QueueLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueLocation::Sqlite(path) => write!(f, "{}", path.display()),
            QueueLocation::Postgres(url) => f.write_str(&postgres::redact(url)),
        }
    }
}

/// `async_*` settings from `ThreadedProxy.configure`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliverySettings {
    /// The SQLite file or the PostgreSQL database.
    pub queue: QueueLocation,
    /// Attempts running at once in this process.
    pub concurrency: usize,
    /// Attempts started per second by all the processes of the queue
    /// together; 0 = no limit.
    pub rate: f64,
    /// Bound on one attempt (connect, send, response head and body).
    pub timeout: Duration,
    /// Bound on connecting to the origin of an attempt, and to the
    /// PostgreSQL server of the queue.
    pub connect_timeout: Duration,
    /// After this many failed attempts a request is dead.
    pub max_attempts: u32,
    /// Delay after the first failure; doubles per attempt, with jitter.
    pub backoff: Duration,
    /// Cap of that delay, and of an origin's `Retry-After`.
    pub backoff_max: Duration,
    /// Statuses that count as delivered (default 200..=299).
    pub success: Vec<RangeInclusive<u16>>,
    /// Statuses worth another attempt (default 429 and 5xx); any other
    /// status that is not a success makes the request dead at once.
    /// Connection failures and timeouts are always retried.
    pub retry: Vec<RangeInclusive<u16>>,
    /// A claim lasts `timeout` plus this; a row whose lease ran out goes
    /// back to the queue (a claimer that died is noticed sooner).
    pub lease_margin: Duration,
    /// How often an idle worker looks for rows enqueued by other processes.
    pub poll_interval: Duration,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            queue: QueueLocation::Sqlite(PathBuf::from("tmp/threaded_proxy_queue.sqlite3")),
            concurrency: 8,
            rate: 0.0,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            max_attempts: 10,
            backoff: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            success: vec![200..=299],
            retry: vec![429..=429, 500..=599],
            lease_margin: Duration::from_secs(30),
            poll_interval: Duration::from_millis(200),
        }
    }
}

impl DeliverySettings {
    pub fn is_success(&self, status: u16) -> bool {
        self.success.iter().any(|range| range.contains(&status))
    }

    pub fn is_retried(&self, status: u16) -> bool {
        self.retry.iter().any(|range| range.contains(&status))
    }

    /// The wait before attempt `failed + 1` after `failed` failures:
    /// `backoff * 2^(failed-1)` capped at `backoff_max`, of which the upper
    /// half is random (`random` in [0, 1)) so retries of many requests
    /// spread out.
    pub fn backoff_after(&self, failed: u32, random: f64) -> Duration {
        let exponent = failed.saturating_sub(1).min(30) as i32;
        let full = (self.backoff.as_secs_f64() * 2f64.powi(exponent)).min(self.backoff_max.as_secs_f64());
        Duration::from_secs_f64(full / 2.0 + full / 2.0 * random.clamp(0.0, 1.0))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Runtime(#[from] crate::errors::ProxyError),
    #[error("the delivery queue of this process uses {running}, not {wanted}")]
    OtherQueue { running: String, wanted: String },
}

/// This process's delivery service.
pub struct Delivery {
    /// The process that started it: tells this process's service from one
    /// inherited through fork, and is the owner of every row it claims.
    pub pid: u32,
    /// Fixed for the service's life: a second start must name the same
    /// queue (`OtherQueue` otherwise).
    pub settings: DeliverySettings,
    /// The queue, behind the trait so the worker is the same for SQLite and
    /// PostgreSQL; an `Arc` because the worker's `spawn_blocking` calls and
    /// Ruby's enqueue (without the GVL) each take a handle.
    pub store: Arc<dyn DeliveryStore>,
    /// Running attempts, so shutdown can wait for them.
    pub in_flight: Tracker,
    /// Cleared by shutdown: the worker claims nothing more.
    claiming: AtomicBool,
    /// Wakes the worker (a row was enqueued here, or shutdown).
    wake: Notify,
    /// Set to true to cut running attempts (their rows are released).
    cancel: watch::Sender<bool>,
    /// Rows given back by cut attempts.
    released: AtomicU64,
}

impl Delivery {
    pub fn claiming(&self) -> bool {
        self.claiming.load(Ordering::Acquire)
    }

    /// Stops claiming rows; running attempts go on.
    pub fn stop_claiming(&self) {
        self.claiming.store(false, Ordering::Release);
        self.wake.notify_one();
    }

    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub fn cancelled(&self) -> watch::Receiver<bool> {
        self.cancel.subscribe()
    }

    /// Counts a row a cut attempt gave back.
    pub fn note_released(&self, rows: usize) {
        self.released.fetch_add(rows as u64, Ordering::Relaxed);
    }

    /// Cuts running attempts, waits a moment for them to give their rows
    /// back, then returns everything this process still claims to the
    /// queue (an attempt that did not end, a claim that raced the stop).
    /// Blocks: call without the GVL. The number of rows given back.
    pub fn abandon(&self) -> Result<u64, StoreError> {
        self.stop_claiming();
        if self.in_flight.active() > 0 {
            self.cancel.send_replace(true);
            let grace = Instant::now() + Duration::from_secs(1);
            self.in_flight.wait_idle(grace, &AtomicBool::new(false));
        }
        let rest = self.store.release(self.pid, None)? as u64;
        Ok(self.released.swap(0, Ordering::Relaxed) + rest)
    }
}

static CURRENT: Mutex<Option<&'static Delivery>> = Mutex::new(None);

/// Starts this process's delivery service with `settings` (opening the
/// store and spawning the worker on the runtime); returns the running one
/// when there is one already.
pub fn start(settings: DeliverySettings) -> Result<&'static Delivery, DeliveryError> {
    let mut slot = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    let pid = std::process::id();
    if let Some(delivery) = slot.filter(|d| d.pid == pid) {
        if delivery.settings.queue != settings.queue {
            return Err(DeliveryError::OtherQueue {
                running: delivery.settings.queue.to_string(),
                wanted: settings.queue.to_string(),
            });
        }
        return Ok(delivery);
    }
    let store = settings.queue.open(settings.connect_timeout)?;
    let proxy = runtime::current()?;
    // Leaked on purpose: one per process, never dropped after fork (see the
    // module doc).
    let delivery: &'static Delivery = Box::leak(Box::new(Delivery {
        pid,
        settings,
        store,
        in_flight: Tracker::default(),
        claiming: AtomicBool::new(true),
        wake: Notify::new(),
        cancel: watch::channel(false).0,
        released: AtomicU64::new(0),
    }));
    proxy.runtime.spawn(worker::run(delivery));
    *slot = Some(delivery);
    Ok(delivery)
}

/// The service of this process if it was started here (not inherited).
pub fn existing() -> Option<&'static Delivery> {
    let slot = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    slot.filter(|d| d.pid == std::process::id())
}

/// A number in [0, 1) for jitter: splitmix64 over a process-wide counter
/// seeded from the clock and pid (not for anything secret).
pub fn random_unit() -> f64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let mut seed = STATE.load(Ordering::Relaxed);
    if seed == 0 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        seed = nanos ^ ((std::process::id() as u64) << 32) | 1;
        let _ = STATE.compare_exchange(0, seed, Ordering::Relaxed, Ordering::Relaxed);
    }
    let mut z = STATE
        .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_in_the_upper_half() {
        let settings = DeliverySettings {
            backoff: Duration::from_secs(1),
            backoff_max: Duration::from_secs(10),
            ..DeliverySettings::default()
        };
        assert_eq!(settings.backoff_after(1, 0.0), Duration::from_millis(500));
        assert_eq!(settings.backoff_after(1, 1.0), Duration::from_secs(1));
        assert_eq!(settings.backoff_after(2, 0.0), Duration::from_secs(1));
        assert_eq!(settings.backoff_after(3, 1.0), Duration::from_secs(4));
        // Capped.
        assert_eq!(settings.backoff_after(6, 1.0), Duration::from_secs(10));
        assert_eq!(settings.backoff_after(u32::MAX, 0.0), Duration::from_secs(5));
        for failed in 1..20 {
            let d = settings.backoff_after(failed, random_unit());
            let full = (2f64.powi(failed as i32 - 1)).min(10.0);
            assert!(
                d.as_secs_f64() >= full / 2.0 - 1e-9 && d.as_secs_f64() <= full + 1e-9,
                "{failed}: {d:?}"
            );
        }
    }

    #[test]
    fn random_unit_stays_in_range_and_varies() {
        let values: Vec<f64> = (0..1000).map(|_| random_unit()).collect();
        assert!(values.iter().all(|v| (0.0..1.0).contains(v)));
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        assert!((0.4..0.6).contains(&mean), "{mean}");
    }

    #[test]
    fn success_ranges() {
        let mut settings = DeliverySettings::default();
        assert!(settings.is_success(200) && settings.is_success(299));
        assert!(!settings.is_success(300) && !settings.is_success(199));
        settings.success = vec![200..=200, 404..=404];
        assert!(settings.is_success(404) && !settings.is_success(201));
        assert!(settings.is_retried(429) && settings.is_retried(503) && !settings.is_retried(409));
        settings.retry = vec![409..=409];
        assert!(settings.is_retried(409) && !settings.is_retried(503));
    }
}
