//! Idle keep-alive connections by origin, and the task that closes the
//! expired ones while any are idle.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

/// Idle keep-alive connections by origin, most recently used last.
pub struct Http1Pool {
    pub(super) shared: Arc<PoolShared>,
}

pub(super) struct PoolShared {
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
    pub(super) fn idle_count(&self) -> usize {
        self.shared.lock().by_origin.values().map(Vec::len).sum()
    }
}

impl PoolShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used live connection to `key`, if any.
    pub(super) fn take(&self, key: &str) -> Option<TcpStream> {
        let mut state = self.lock();
        let list = state.by_origin.get_mut(key)?;
        while let Some(idle) = list.pop() {
            if idle.since.elapsed() < self.idle_timeout && still_open(&idle.stream) {
                return Some(idle.stream);
            }
        }
        None
    }

    pub(super) fn put(self: &Arc<Self>, key: String, stream: TcpStream) {
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
