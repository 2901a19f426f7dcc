//! Process-wide counters behind `ThreadedProxy.stats`. Plain atomics: the hot
//! path adds, `snapshot` reads, nothing locks.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::errors::ErrorKind;

#[derive(Default)]
pub struct Stats {
    pub started: AtomicU64,
    pub active: AtomicU64,
    pub completed: AtomicU64,
    pub rejected: AtomicU64,
    pub bytes_from_origin: AtomicU64,
    pub bytes_to_client: AtomicU64,
    /// Bytes clients sent through tunnels.
    pub bytes_from_client: AtomicU64,
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
            ("active".to_owned(), self.active.load(Relaxed)),
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
