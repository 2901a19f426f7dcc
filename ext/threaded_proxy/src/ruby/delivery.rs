//! `ThreadedProxy::Native.async_*`: deferred delivery (`proxy_async`).
//! Arguments are parsed under the GVL; every store call (SQLite: file I/O
//! and lock waits; PostgreSQL: round trips) runs with the GVL released.

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use magnus::{Error, RArray, RHash, Ruby, TryConvert};

use super::args::{opt, seconds_or};
use super::exchange_spec;
use super::nogvl::{self, guard, nogvl};
use crate::delivery::store::{now_ms, NewDelivery, StoreError, StoreResult};
use crate::delivery::{self, Delivery, DeliverySettings, QueueLocation};
use crate::origin_url::Kind;

fn store_error(ruby: &Ruby, err: impl std::fmt::Display) -> Error {
    Error::new(
        ruby.exception_io_error(),
        format!("threaded-proxy deferred delivery: {err}"),
    )
}

fn running(ruby: &Ruby) -> Result<&'static Delivery, Error> {
    delivery::existing().ok_or_else(|| {
        Error::new(
            ruby.exception_runtime_error(),
            "deferred delivery is not started in this process (ThreadedProxy.async_start)",
        )
    })
}

/// Runs a store call without the GVL. SQLite waits are bounded by its busy
/// timeout and PostgreSQL's by the connect timeout and short statements
/// (claims skip locked rows instead of waiting), so the unblocking
/// function has nothing to wake.
fn without_gvl<T: Send>(ruby: &Ruby, work: impl FnOnce() -> StoreResult<T> + Send) -> Result<T, Error> {
    nogvl(ruby, work, || {})?.map_err(|e: StoreError| store_error(ruby, e))
}

fn settings(ruby: &Ruby, options: RHash) -> Result<DeliverySettings, Error> {
    let defaults = DeliverySettings::default();
    let duration = |name: &str, default: Duration| seconds_or(ruby, options, name, default);
    let ranges =
        |name: &str, default: &Vec<RangeInclusive<u16>>| -> Result<Vec<RangeInclusive<u16>>, Error> {
            match opt::<RArray>(ruby, options, name)? {
                None => Ok(default.clone()),
                Some(list) => list
                    .into_iter()
                    .map(|pair| {
                        let pair = RArray::try_convert(pair)?;
                        Ok(pair.entry::<u16>(0)?..=pair.entry::<u16>(1)?)
                    })
                    .collect(),
            }
        };
    let success = ranges("success", &defaults.success)?;
    let retry = ranges("retry", &defaults.retry)?;
    Ok(DeliverySettings {
        queue: match (
            opt::<String>(ruby, options, "url")?,
            opt::<String>(ruby, options, "path")?,
        ) {
            (Some(url), _) => QueueLocation::Postgres(url),
            (None, Some(path)) => QueueLocation::Sqlite(PathBuf::from(path)),
            (None, None) => defaults.queue.clone(),
        },
        concurrency: opt(ruby, options, "concurrency")?.unwrap_or(defaults.concurrency),
        rate: opt(ruby, options, "rate")?.unwrap_or(defaults.rate),
        timeout: duration("timeout", defaults.timeout)?,
        connect_timeout: duration("connect_timeout", defaults.connect_timeout)?,
        max_attempts: opt(ruby, options, "max_attempts")?.unwrap_or(defaults.max_attempts),
        backoff: duration("backoff", defaults.backoff)?,
        backoff_max: duration("backoff_max", defaults.backoff_max)?,
        success,
        retry,
        lease_margin: duration("lease_margin", defaults.lease_margin)?,
        poll_interval: duration("poll_interval", defaults.poll_interval)?,
    })
}

/// Starts this process's delivery service (opens the store, spawns the
/// worker); a no-op when it runs already. Returns the pid.
fn async_start(ruby: &Ruby, options: RHash) -> Result<u32, Error> {
    guard(|| {
        let settings = settings(ruby, options)?;
        if let Some(running) = delivery::existing() {
            if running.settings.queue == settings.queue {
                return Ok(running.pid);
            }
        }
        // Opening creates the schema (a write): no GVL held meanwhile.
        nogvl(ruby, move || delivery::start(settings).map(|d| d.pid), || {})?
            .map_err(|e| store_error(ruby, e))
    })
}

fn async_running() -> bool {
    delivery::existing().is_some()
}

/// Stores one request durably (committed when this returns); its id. A
/// `body_fd` (Puma's Tempfile) is duplicated here, under the GVL, and
/// copied into the database without it.
fn async_enqueue(ruby: &Ruby, spec: RHash) -> Result<i64, Error> {
    guard(|| {
        let delivery = running(ruby)?;
        // The same reader (and URL judgement) as proxy_fetch's spec.
        let request = exchange_spec::request(ruby, spec, Kind::Http)?;
        let body = exchange_spec::request_body(ruby, spec)?.map_err(|e| e.io_error(ruby))?;
        let new = NewDelivery {
            method: request.method.to_string(),
            url: request.target.url(),
            headers: request
                .headers
                .into_iter()
                .map(|(name, value)| (name, value.to_vec()))
                .collect(),
            body: body.into(),
        };
        let store = delivery.store.clone();
        let id = without_gvl(ruby, move || store.enqueue(new))?;
        delivery.wake();
        Ok(id)
    })
}

fn async_stats(ruby: &Ruby) -> Result<RHash, Error> {
    guard(|| {
        let delivery = running(ruby)?;
        let store = delivery.store.clone();
        let stats = without_gvl(ruby, move || store.stats())?;
        let hash = ruby.hash_new();
        hash.aset(ruby.to_symbol("queued"), stats.queued)?;
        hash.aset(ruby.to_symbol("in_flight"), stats.in_flight)?;
        hash.aset(ruby.to_symbol("delivered"), stats.delivered)?;
        hash.aset(ruby.to_symbol("retrying"), stats.retrying)?;
        hash.aset(ruby.to_symbol("dead"), stats.dead)?;
        hash.aset(ruby.to_symbol("running_here"), delivery.in_flight.active())?;
        Ok(hash)
    })
}

fn async_dead(ruby: &Ruby, limit: usize) -> Result<RArray, Error> {
    guard(|| {
        let delivery = running(ruby)?;
        let store = delivery.store.clone();
        let rows = without_gvl(ruby, move || store.dead(limit))?;
        let list = ruby.ary_new_capa(rows.len());
        for row in rows {
            let hash = ruby.hash_new();
            hash.aset(ruby.to_symbol("id"), row.id)?;
            hash.aset(ruby.to_symbol("method"), row.method)?;
            hash.aset(ruby.to_symbol("url"), row.url)?;
            hash.aset(ruby.to_symbol("attempts"), row.attempts)?;
            hash.aset(ruby.to_symbol("last_error"), row.last_error)?;
            list.push(hash)?;
        }
        Ok(list)
    })
}

/// Dead rows back to the queue: one id, or all with nil. The count.
fn async_requeue(ruby: &Ruby, id: Option<i64>) -> Result<usize, Error> {
    guard(|| {
        let delivery = running(ruby)?;
        let store = delivery.store.clone();
        let count = without_gvl(ruby, move || store.requeue(id, now_ms()))?;
        delivery.wake();
        Ok(count)
    })
}

/// Stops claiming rows in this process (shutdown's first step).
fn async_stop_claiming() {
    if let Some(delivery) = delivery::existing() {
        delivery.stop_claiming();
    }
}

/// Waits up to `timeout` seconds, GVL released, for running attempts to
/// end; true when none is left (returns early on a Ruby interrupt).
fn async_wait_idle(ruby: &Ruby, timeout: f64) -> Result<bool, Error> {
    guard(|| match delivery::existing() {
        Some(delivery) => nogvl::wait_idle(ruby, &delivery.in_flight, timeout),
        None => Ok(true),
    })
}

/// Cuts running attempts and returns every row this process claims to the
/// queue; the number of rows returned.
fn async_abandon(ruby: &Ruby) -> Result<u64, Error> {
    guard(|| {
        let Some(delivery) = delivery::existing() else {
            return Ok(0);
        };
        without_gvl(ruby, move || delivery.abandon())
    })
}

pub fn define(native: &magnus::RModule) -> Result<(), Error> {
    use magnus::function;
    native.define_module_function("async_start", function!(async_start, 1))?;
    native.define_module_function("async_running?", function!(async_running, 0))?;
    native.define_module_function("async_enqueue", function!(async_enqueue, 1))?;
    native.define_module_function("async_stats", function!(async_stats, 0))?;
    native.define_module_function("async_dead", function!(async_dead, 1))?;
    native.define_module_function("async_requeue", function!(async_requeue, 1))?;
    native.define_module_function("async_stop_claiming", function!(async_stop_claiming, 0))?;
    native.define_module_function("async_wait_idle", function!(async_wait_idle, 1))?;
    native.define_module_function("async_abandon", function!(async_abandon, 0))?;
    Ok(())
}
