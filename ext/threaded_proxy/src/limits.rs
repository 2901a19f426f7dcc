//! Admission control: a process-wide and a per-origin cap on concurrent
//! exchanges, and a budget of file descriptors they may hold together. Past
//! a cap the exchange is refused at once (503), never queued: a queue would
//! hold client sockets (file descriptors) the caps protect.
//!
//! Why a descriptor budget as well as a count: exchanges do not cost the
//! same. A copied one holds two descriptors (the client's duplicate and the
//! origin socket), one with a request body file three, a spliced one five
//! (plus a pipe pair and a second registration of the client socket). A
//! count sized for two per exchange ran the process out of descriptors as
//! soon as bodies were spliced, and the app server then could not accept.
//! So each permit reserves what its exchange holds, and a splice asks the
//! budget for its three extra descriptors, copying the body when they are
//! not there.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Descriptors every exchange holds: the client's duplicate, the origin.
pub const EXCHANGE_FDS: usize = 2;
/// Extra descriptors of a spliced body: the pipe's two ends and the
/// duplicate of the client socket registered for writability.
pub const SPLICE_FDS: usize = 3;
/// Descriptors an event stream holds: the client's duplicate.
pub const STREAM_FDS: usize = 1;

/// The process's caps and what running exchanges hold of them. The caps
/// are atomics, not constants, so `configure` changes them while exchanges
/// run (a permit taken under the old value is simply given back later).
pub struct Limits {
    /// `max_connections`: exchanges running at once in this process.
    max_total: AtomicUsize,
    /// `max_connections_per_origin`: so one slow origin cannot take every
    /// slot from the others.
    max_per_origin: AtomicUsize,
    /// `fd_budget`: descriptors running exchanges may hold together (see
    /// the module doc for why a count alone is not enough).
    fd_budget: AtomicUsize,
    /// Exchanges holding a permit now.
    total: AtomicUsize,
    /// Descriptors reserved by those permits now.
    fds: AtomicUsize,
    /// Permits held per origin key (scheme, host, port). A map under a
    /// mutex: origins are not known in advance; an entry is removed when
    /// its count drops to 0, so the map holds only busy origins.
    per_origin: Mutex<HashMap<String, usize>>,
}

/// Holds one slot of each cap, and the descriptors it reserved, until
/// dropped.
pub struct Permit<'a> {
    /// Where to give the slots back on drop.
    limits: &'a Limits,
    /// The origin key whose per-origin count this permit holds.
    origin: String,
    /// Descriptors reserved now: the exchange's own plus a splice's while
    /// it runs; all of them go back on drop.
    fds: usize,
}

impl Limits {
    pub fn new(max_total: usize, max_per_origin: usize, fd_budget: usize) -> Self {
        Limits {
            max_total: AtomicUsize::new(max_total),
            max_per_origin: AtomicUsize::new(max_per_origin),
            fd_budget: AtomicUsize::new(fd_budget),
            total: AtomicUsize::new(0),
            fds: AtomicUsize::new(0),
            per_origin: Mutex::new(HashMap::new()),
        }
    }

    pub fn resize(&self, max_total: usize, max_per_origin: usize, fd_budget: usize) {
        self.max_total.store(max_total, Ordering::Relaxed);
        self.max_per_origin.store(max_per_origin, Ordering::Relaxed);
        self.fd_budget.store(fd_budget, Ordering::Relaxed);
    }

    /// Takes `n` descriptors from the budget, or none when fewer are left.
    fn take_fds(&self, n: usize) -> bool {
        let budget = self.fd_budget.load(Ordering::Relaxed);
        self.fds
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + n <= budget).then_some(used + n)
            })
            .is_ok()
    }

    /// A permit reserving `fds` descriptors, or which cap is full. An empty
    /// `origin` (an event stream, which has none) skips the per-origin cap.
    pub fn try_acquire(&self, origin: &str, fds: usize) -> Result<Permit<'_>, &'static str> {
        let max_total = self.max_total.load(Ordering::Relaxed);
        if self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max_total).then_some(n + 1)
            })
            .is_err()
        {
            return Err("max_connections reached");
        }
        if !self.take_fds(fds) {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err("fd_budget reached (file descriptors)");
        }
        if origin.is_empty() {
            return Ok(Permit {
                limits: self,
                origin: String::new(),
                fds,
            });
        }
        let mut per_origin = self.per_origin.lock().unwrap_or_else(|e| e.into_inner());
        let count = per_origin.entry(origin.to_owned()).or_insert(0);
        if *count >= self.max_per_origin.load(Ordering::Relaxed) {
            drop(per_origin);
            self.fds.fetch_sub(fds, Ordering::AcqRel);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err("max_connections_per_origin reached");
        }
        *count += 1;
        Ok(Permit {
            limits: self,
            origin: origin.to_owned(),
            fds,
        })
    }

    pub fn in_use(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Descriptors reserved by running exchanges.
    pub fn fds_in_use(&self) -> usize {
        self.fds.load(Ordering::Acquire)
    }
}

impl Permit<'_> {
    /// Reserves `n` more descriptors for this exchange (a splice); false,
    /// and nothing reserved, when the budget has not that many left.
    pub fn reserve_more(&mut self, n: usize) -> bool {
        let ok = self.limits.take_fds(n);
        if ok {
            self.fds += n;
        }
        ok
    }

    /// Gives back `n` of the descriptors reserved by [`Permit::reserve_more`].
    pub fn release(&mut self, n: usize) {
        let n = n.min(self.fds);
        self.fds -= n;
        self.limits.fds.fetch_sub(n, Ordering::AcqRel);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut per_origin = self.limits.per_origin.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = per_origin.get_mut(&self.origin) {
            *count -= 1;
            if *count == 0 {
                per_origin.remove(&self.origin);
            }
        }
        drop(per_origin);
        self.limits.fds.fetch_sub(self.fds, Ordering::AcqRel);
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The default descriptor budget for a soft `RLIMIT_NOFILE` of `soft`:
/// what is left after [`reserved_fds`].
pub fn default_fd_budget(soft: usize) -> usize {
    soft.saturating_sub(reserved_fds(soft)).max(32)
}

/// The default `max_connections` for a descriptor budget: as many copied
/// exchanges as the budget holds (at least 16).
pub fn default_max_connections(fd_budget: usize) -> usize {
    (fd_budget / EXCHANGE_FDS).max(16)
}

/// Descriptors kept out of the budget for the app server and the app: its
/// listeners, logs and libraries, the sockets it accepted but has not
/// handed over yet (one per thread and per connection waiting in its
/// reactor), idle pooled origin connections. A fixed part plus an eighth
/// of the limit, since the server's share grows with the load.
pub fn reserved_fds(soft: usize) -> usize {
    256 + soft / 8
}

/// The soft `RLIMIT_NOFILE` of this process (1024 when unknown).
pub fn soft_fd_limit() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
}

/// Whether an errno means the process (or the system) ran out of file
/// descriptors: an overload (503), not a fault of the origin.
pub fn out_of_fds(errno: Option<i32>) -> bool {
    matches!(errno, Some(libc::EMFILE) | Some(libc::ENFILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn total_cap_refuses_the_extra_exchange_and_frees_on_drop() {
        let limits = Limits::new(2, 10, 100);
        let a = limits.try_acquire("http://a", EXCHANGE_FDS).unwrap();
        let _b = limits.try_acquire("http://b", EXCHANGE_FDS).unwrap();
        assert_eq!(
            limits.try_acquire("http://c", EXCHANGE_FDS).err(),
            Some("max_connections reached")
        );
        drop(a);
        assert!(limits.try_acquire("http://c", EXCHANGE_FDS).is_ok());
    }

    #[test]
    fn per_origin_cap_is_separate_per_origin() {
        let limits = Limits::new(10, 1, 100);
        let _a = limits.try_acquire("http://a", EXCHANGE_FDS).unwrap();
        assert_eq!(
            limits.try_acquire("http://a", EXCHANGE_FDS).err(),
            Some("max_connections_per_origin reached")
        );
        let _b = limits.try_acquire("http://b", EXCHANGE_FDS).unwrap();
        assert_eq!(limits.in_use(), 2);
        assert_eq!(limits.fds_in_use(), 4);
    }

    #[test]
    fn the_fd_budget_refuses_exchanges_and_splices_it_cannot_hold() {
        let limits = Limits::new(100, 100, 7);
        let mut a = limits.try_acquire("http://a", EXCHANGE_FDS).unwrap();
        assert!(a.reserve_more(SPLICE_FDS));
        let mut b = limits.try_acquire("http://a", EXCHANGE_FDS).unwrap();
        // 7 - 5 - 2 = 0 left: b copies its body, a third is refused.
        assert!(!b.reserve_more(SPLICE_FDS));
        assert_eq!(
            limits.try_acquire("http://a", EXCHANGE_FDS).err(),
            Some("fd_budget reached (file descriptors)")
        );
        assert_eq!(limits.in_use(), 2);
        a.release(SPLICE_FDS);
        assert!(b.reserve_more(SPLICE_FDS));
        drop(a);
        drop(b);
        assert_eq!((limits.in_use(), limits.fds_in_use()), (0, 0));
    }

    #[test]
    fn the_default_budget_leaves_room_for_the_app_server() {
        assert_eq!(default_fd_budget(1024), 1024 - 256 - 128);
        assert_eq!(default_fd_budget(20_000), 20_000 - 256 - 2_500);
        assert_eq!(default_fd_budget(100), 32);
        assert_eq!(default_max_connections(default_fd_budget(1024)), 320);
        assert_eq!(default_max_connections(default_fd_budget(100)), 16);
        assert!(out_of_fds(Some(libc::EMFILE)) && !out_of_fds(Some(libc::ECONNREFUSED)));
    }
}
