//! One proxy (tokio runtime, origin clients, callback queue, counters) per
//! process, built lazily on first use and built again after fork.
//!
//! fork(2) copies only the calling thread: an inherited runtime's workers
//! are gone, so its tasks would never run. On a pid change the old proxy is
//! leaked (dropping a runtime whose threads vanished can hang) and a fresh
//! one is built.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::callbacks::CallbackBridge;
use crate::errors::ProxyError;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::origin::Upstream;
use crate::stats::Stats;

/// Process-wide settings from `ThreadedProxy.configure`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Tokio worker threads; 0 picks one per core (at most 4).
    pub runtime_threads: usize,
    /// How long an exchange waits for a Ruby callback to answer.
    pub callback_timeout: Duration,
    /// Idle pooled origin connections are closed after this long.
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per origin: bounds the descriptors (and the
    /// origin's resources) an idle process holds after a burst.
    pub pool_max_idle_per_host: usize,
    /// Concurrent exchanges per process; past it new ones answer 503.
    pub max_connections: usize,
    /// Concurrent exchanges per origin (scheme, host, port).
    pub max_connections_per_origin: usize,
    /// File descriptors running exchanges may hold together (see
    /// `limits`); past it new ones answer 503 and bodies are copied
    /// rather than spliced.
    pub fd_budget: usize,
    /// Origin hosts (`host` or `host:port`) that get their own label in the
    /// latency histograms; every other is "other".
    pub metrics_hosts: Vec<String>,
    /// Plain-HTTP bodies of known length go socket to socket with splice(2)
    /// (Linux). False forces the portable copy, the path every other OS
    /// takes, so that path can be tested here. Applies to the next body.
    pub zero_copy: bool,
}

impl Default for Settings {
    fn default() -> Self {
        // The defaults of Ruby's Configuration too (it reads them through
        // `Native.default_settings`): one place for both.
        let fd_budget = crate::limits::default_fd_budget(crate::limits::soft_fd_limit());
        let max_connections = crate::limits::default_max_connections(fd_budget);
        Settings {
            runtime_threads: 0,
            callback_timeout: Duration::from_secs(30),
            pool_idle_timeout: Duration::from_secs(60),
            pool_max_idle_per_host: 64,
            max_connections,
            max_connections_per_origin: max_connections,
            fd_budget,
            metrics_hosts: Vec::new(),
            zero_copy: zero_copy_default(),
        }
    }
}

/// THREADED_PROXY_ZERO_COPY=0 (or false, off, no) switches zero copy off for
/// a whole process without a code change, e.g. for a CI run of the copy path.
fn zero_copy_default() -> bool {
    let value = std::env::var("THREADED_PROXY_ZERO_COPY").unwrap_or_default();
    !matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "0" | "false" | "off" | "no"
    )
}

/// Whether splice(2) may be used for the next body (see [`Settings::zero_copy`]).
pub fn zero_copy() -> bool {
    let settings = SETTINGS.lock().unwrap_or_else(|e| e.into_inner());
    settings.as_ref().map_or_else(zero_copy_default, |s| s.zero_copy)
}

static SETTINGS: Mutex<Option<Settings>> = Mutex::new(None);
static CURRENT: Mutex<Option<&'static Proxy>> = Mutex::new(None);

pub fn settings() -> Settings {
    SETTINGS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_default()
}

/// Stores settings; limits apply at once, the rest to the next runtime built.
pub fn configure(settings: Settings) {
    if let Some(proxy) = existing() {
        proxy.limits.resize(
            settings.max_connections,
            settings.max_connections_per_origin,
            settings.fd_budget,
        );
        proxy.metrics.set_hosts(settings.metrics_hosts.clone());
    }
    *SETTINGS.lock().unwrap_or_else(|e| e.into_inner()) = Some(settings);
}

/// Everything one process needs to run exchanges.
pub struct Proxy {
    /// The process that built it: [`current`] and [`existing`] compare it
    /// with the running pid to tell this process's proxy from one inherited
    /// through fork (whose runtime threads are gone). Also the `pid` label
    /// of the metrics.
    pub pid: u32,
    /// Runs every exchange, origin connection and delivery attempt; its
    /// threads never touch the Ruby VM.
    pub runtime: tokio::runtime::Runtime,
    /// The one way from a tokio task to Ruby code: the queue the gem's
    /// callback threads take jobs from, and how long a reply may take.
    pub callbacks: CallbackBridge,
    /// The origin clients and their pools, shared by every exchange so an
    /// origin connection is reused across requests.
    pub upstream: Upstream,
    /// The counters behind `ThreadedProxy.stats` (plain atomics, read by
    /// snapshot).
    pub stats: Stats,
    /// Admission: the connection caps and the descriptor budget an exchange
    /// must fit in before it runs; `configure` resizes them at once.
    pub limits: Limits,
    /// The latency histograms behind `ThreadedProxy::Metrics`, and which
    /// origin hosts get their own label.
    pub metrics: Metrics,
    /// Cleared by shutdown: new exchanges are refused with 503.
    accepting: AtomicBool,
    /// Set to true to cut every running exchange (end of the drain).
    cancel: watch::Sender<bool>,
}

impl Proxy {
    fn build(settings: &Settings) -> Result<Proxy, ProxyError> {
        let threads = match settings.runtime_threads {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()).min(4),
            n => n,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("threaded-proxy")
            .enable_all()
            .build()
            .map_err(|e| ProxyError::Internal {
                message: format!("cannot start the tokio runtime: {e}"),
            })?;
        Ok(Proxy {
            pid: std::process::id(),
            runtime,
            callbacks: CallbackBridge::new(settings.callback_timeout),
            upstream: Upstream::new(settings.pool_idle_timeout, settings.pool_max_idle_per_host),
            stats: Stats::default(),
            limits: Limits::new(
                settings.max_connections,
                settings.max_connections_per_origin,
                settings.fd_budget,
            ),
            metrics: Metrics::new(settings.metrics_hosts.clone()),
            accepting: AtomicBool::new(true),
            cancel: watch::channel(false).0,
        })
    }

    pub fn accepting(&self) -> bool {
        self.accepting.load(Ordering::Acquire)
    }

    pub fn cancelled(&self) -> watch::Receiver<bool> {
        self.cancel.subscribe()
    }

    /// Stops taking exchanges; running ones go on until [`Proxy::cut`].
    pub fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::Release);
    }

    /// Ends every running exchange now (client connections are aborted).
    pub fn cut(&self) {
        self.cancel.send_replace(true);
    }
}

/// The proxy of this process, building it when there is none (or when the
/// one there was inherited through fork).
pub fn current() -> Result<&'static Proxy, ProxyError> {
    let mut slot = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    let pid = std::process::id();
    if let Some(proxy) = *slot {
        if proxy.pid == pid {
            return Ok(proxy);
        }
    }
    // Leaked on purpose: one per process lifetime, and never dropped after
    // fork (see the module doc).
    let proxy: &'static Proxy = Box::leak(Box::new(Proxy::build(&settings())?));
    *slot = Some(proxy);
    Ok(proxy)
}

/// The proxy of this process if one was built here (not inherited).
pub fn existing() -> Option<&'static Proxy> {
    let slot = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    slot.filter(|p| p.pid == std::process::id())
}

/// Counts running tasks (exchanges: `Stats::exchanges`; deliveries) so
/// shutdown can wait for them.
#[derive(Default)]
pub struct Tracker {
    /// Running now; under a mutex (not an atomic) so that a waiter checks
    /// it and sleeps on `idle` without missing the last exit.
    active: Mutex<usize>,
    /// Notified when `active` reaches 0 and by [`Tracker::interrupt`].
    idle: Condvar,
}

/// One running task; leaving (drop) counts it out.
pub struct TrackerGuard<'a>(&'a Tracker);

impl Drop for TrackerGuard<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

impl Tracker {
    pub fn enter(&self) -> TrackerGuard<'_> {
        self.arrive();
        TrackerGuard(self)
    }

    /// Counts a task in without a guard, for a holder that moves between
    /// tasks (the machine's connections); [`Tracker::leave`] counts it out.
    pub fn arrive(&self) {
        *self.active.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }

    pub fn leave(&self) {
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        *active -= 1;
        if *active == 0 {
            self.idle.notify_all();
        }
    }

    pub fn active(&self) -> usize {
        *self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until no exchange runs, the deadline passes or `interrupted` is
    /// set; true when idle.
    pub fn wait_idle(&self, deadline: Instant, interrupted: &AtomicBool) -> bool {
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if *active == 0 {
                return true;
            }
            let now = Instant::now();
            if now >= deadline || interrupted.load(Ordering::Acquire) {
                return false;
            }
            active = self
                .idle
                .wait_timeout(active, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Wakes a [`Tracker::wait_idle`] caller (unblocking function).
    pub fn interrupt(&self, flag: &AtomicBool) {
        flag.store(true, Ordering::Release);
        let _active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        self.idle.notify_all();
    }
}
