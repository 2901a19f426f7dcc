//! Admission control: a process-wide and a per-origin cap on concurrent
//! exchanges. Past a cap the exchange is refused at once (503), never queued:
//! a queue would hold client sockets (file descriptors) the cap protects.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

pub struct Limits {
    max_total: AtomicUsize,
    max_per_origin: AtomicUsize,
    total: AtomicUsize,
    per_origin: Mutex<HashMap<String, usize>>,
}

/// Holds one slot of each cap until dropped.
pub struct Permit<'a> {
    limits: &'a Limits,
    origin: String,
}

impl Limits {
    pub fn new(max_total: usize, max_per_origin: usize) -> Self {
        Limits {
            max_total: AtomicUsize::new(max_total),
            max_per_origin: AtomicUsize::new(max_per_origin),
            total: AtomicUsize::new(0),
            per_origin: Mutex::new(HashMap::new()),
        }
    }

    pub fn resize(&self, max_total: usize, max_per_origin: usize) {
        self.max_total.store(max_total, Ordering::Relaxed);
        self.max_per_origin.store(max_per_origin, Ordering::Relaxed);
    }

    /// A permit, or which cap is full.
    pub fn try_acquire(&self, origin: &str) -> Result<Permit<'_>, &'static str> {
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
        let mut per_origin = self.per_origin.lock().unwrap_or_else(|e| e.into_inner());
        let count = per_origin.entry(origin.to_owned()).or_insert(0);
        if *count >= self.max_per_origin.load(Ordering::Relaxed) {
            drop(per_origin);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err("max_connections_per_origin reached");
        }
        *count += 1;
        Ok(Permit {
            limits: self,
            origin: origin.to_owned(),
        })
    }

    pub fn in_use(&self) -> usize {
        self.total.load(Ordering::Acquire)
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
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn total_cap_refuses_the_extra_exchange_and_frees_on_drop() {
        let limits = Limits::new(2, 10);
        let a = limits.try_acquire("http://a").unwrap();
        let _b = limits.try_acquire("http://b").unwrap();
        assert_eq!(
            limits.try_acquire("http://c").err(),
            Some("max_connections reached")
        );
        drop(a);
        assert!(limits.try_acquire("http://c").is_ok());
    }

    #[test]
    fn per_origin_cap_is_separate_per_origin() {
        let limits = Limits::new(10, 1);
        let _a = limits.try_acquire("http://a").unwrap();
        assert_eq!(
            limits.try_acquire("http://a").err(),
            Some("max_connections_per_origin reached")
        );
        let _b = limits.try_acquire("http://b").unwrap();
        assert_eq!(limits.in_use(), 2);
    }
}
