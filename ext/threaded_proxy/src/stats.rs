//! Process-wide counters behind `ThreadedProxy.stats`, and the [`Meter`]
//! through which one exchange counts its bytes. Plain atomics: the hot path
//! adds, `snapshot` reads, nothing locks (except the running count, which
//! shutdown waits on).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::errors::ErrorKind;
use crate::runtime::Tracker;

#[derive(Default)]
pub struct Stats {
    /// Exchanges handed to the runtime (and those refused before they
    /// started: they are reported like any other).
    pub started: AtomicU64,
    /// Exchanges running now, from before their task is spawned to its
    /// end: the one "active" count, behind both `stats[:active]` and the
    /// graceful shutdown's wait (hence a count with a condvar).
    pub exchanges: Tracker,
    /// Exchanges that ended without an error.
    pub completed: AtomicU64,
    /// Exchanges refused by admission (caps, descriptor budget).
    pub rejected: AtomicU64,
    /// Bytes read from origins (body and tunnel bytes; heads are not
    /// counted), via each exchange's [`Meter`].
    pub bytes_from_origin: AtomicU64,
    /// Bytes written to clients, heads included, via each [`Meter`].
    pub bytes_to_client: AtomicU64,
    /// Bytes clients sent through tunnels, via each [`Meter`].
    pub bytes_from_client: AtomicU64,
    /// User callbacks that answered (on_headers on every path,
    /// on_response, on_error): raised counts, a timeout does not.
    pub callbacks_run: AtomicU64,
    /// Callback jobs dropped unrun: their exchange had stopped waiting
    /// (callback_timeout passed while they were queued behind busy threads).
    pub callback_jobs_expired: AtomicU64,
    /// Body bytes moved origin → client by splice(2) (also counted in both
    /// byte counters above).
    pub bytes_spliced: AtomicU64,
    /// Indexed by `ErrorKind::index`.
    pub failed: [AtomicU64; ErrorKind::ALL.len()],
}

impl Stats {
    pub fn failed(&self, kind: ErrorKind) {
        self.failed[kind.index()].fetch_add(1, Relaxed);
    }

    /// Name/value pairs, failures as `failed_<kind>` plus their total.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let mut out = vec![
            ("started".to_owned(), self.started.load(Relaxed)),
            ("active".to_owned(), self.exchanges.active() as u64),
            ("completed".to_owned(), self.completed.load(Relaxed)),
            ("rejected".to_owned(), self.rejected.load(Relaxed)),
            (
                "bytes_from_origin".to_owned(),
                self.bytes_from_origin.load(Relaxed),
            ),
            ("bytes_to_client".to_owned(), self.bytes_to_client.load(Relaxed)),
            (
                "bytes_from_client".to_owned(),
                self.bytes_from_client.load(Relaxed),
            ),
            ("callbacks_run".to_owned(), self.callbacks_run.load(Relaxed)),
            (
                "callback_jobs_expired".to_owned(),
                self.callback_jobs_expired.load(Relaxed),
            ),
            ("bytes_spliced".to_owned(), self.bytes_spliced.load(Relaxed)),
        ];
        let mut total = 0;
        for kind in ErrorKind::ALL {
            let n = self.failed[kind.index()].load(Relaxed);
            total += n;
            out.push((format!("failed_{}", kind.as_str()), n));
        }
        out.push(("failed".to_owned(), total));
        out
    }
}

/// One exchange's byte counts, each byte counted once where it moves: the
/// client writer (every byte to the client), the splice (origin to client
/// in the kernel) and the tunnel (both ways) add here, and every add goes
/// to the process-wide [`Stats`] at the same moment, so a long stream or
/// tunnel shows in the stats while it runs. Atomics because a tunnel's two
/// directions count concurrently (in one task).
pub struct Meter {
    /// The process-wide counters every add also goes to.
    stats: &'static Stats,
    /// Bytes read from the origin (body or tunnel), for the summary.
    from_origin: AtomicU64,
    /// Bytes written to the client, heads included, for the summary.
    to_client: AtomicU64,
    /// Bytes the client sent through a tunnel, for the summary.
    from_client: AtomicU64,
}

impl Meter {
    pub fn new(stats: &'static Stats) -> Meter {
        Meter {
            stats,
            from_origin: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
            from_client: AtomicU64::new(0),
        }
    }

    /// `n` bytes read from the origin.
    pub fn from_origin(&self, n: u64) {
        self.from_origin.fetch_add(n, Relaxed);
        self.stats.bytes_from_origin.fetch_add(n, Relaxed);
    }

    /// `n` bytes written to the client.
    pub fn to_client(&self, n: u64) {
        self.to_client.fetch_add(n, Relaxed);
        self.stats.bytes_to_client.fetch_add(n, Relaxed);
    }

    /// `n` bytes the client sent through a tunnel.
    pub fn from_client(&self, n: u64) {
        self.from_client.fetch_add(n, Relaxed);
        self.stats.bytes_from_client.fetch_add(n, Relaxed);
    }

    /// `n` bytes passed from the origin straight to the client (a tunnel's
    /// way down).
    pub fn relayed(&self, n: u64) {
        self.from_origin(n);
        self.to_client(n);
    }

    /// `n` body bytes moved origin → client by splice(2).
    pub fn spliced(&self, n: u64) {
        self.relayed(n);
        self.stats.bytes_spliced.fetch_add(n, Relaxed);
    }

    /// Bytes read from the origin so far.
    pub fn origin_bytes(&self) -> u64 {
        self.from_origin.load(Relaxed)
    }

    /// Bytes written to the client so far.
    pub fn client_bytes(&self) -> u64 {
        self.to_client.load(Relaxed)
    }

    /// Bytes the client sent through a tunnel so far.
    pub fn tunnel_bytes(&self) -> u64 {
        self.from_client.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_meter_feeds_the_stats_as_it_counts() {
        let stats: &'static Stats = Box::leak(Box::default());
        let meter = Meter::new(stats);
        meter.to_client(10);
        meter.from_origin(3);
        meter.spliced(100);
        meter.relayed(5);
        meter.from_client(7);
        assert_eq!(
            (meter.origin_bytes(), meter.client_bytes(), meter.tunnel_bytes()),
            (108, 115, 7)
        );
        let snapshot: std::collections::HashMap<_, _> = stats.snapshot().into_iter().collect();
        assert_eq!(snapshot["bytes_from_origin"], 108);
        assert_eq!(snapshot["bytes_to_client"], 115);
        assert_eq!(snapshot["bytes_from_client"], 7);
        assert_eq!(snapshot["bytes_spliced"], 100);
    }
}
