//! `ThreadedProxy::Native`: the module functions Ruby calls. Thin: parse
//! arguments under the GVL, hand plain data to the core, convert errors.

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use magnus::value::ReprValue;
use magnus::{Error, Float, Integer, RArray, RHash, Ruby, TryConvert, Value};

use super::args::{self, opt, seconds_or};
use super::errors;
use super::exchange_spec;
use super::job::Job;
use super::nogvl::{self, guard, nogvl};
use crate::exchange;
use crate::metrics::{Metrics, Value as Metric};
use crate::origin_url::{self, Kind};
use crate::runtime::{self, Settings};

/// Takes over the client socket `fd` (duplicated here, under the GVL; the
/// caller closes its IO right after) and starts the exchange described by
/// `spec`. Returns at once.
fn start_exchange(ruby: &Ruby, fd: i32, spec: RHash) -> Result<(), Error> {
    guard(|| {
        let spec = exchange_spec::parse(ruby, spec)?;
        let proxy = runtime::current().map_err(|e| errors::raise(ruby, &e))?;
        // Admission before the duplicate: a refused exchange holds no
        // descriptor, and Ruby answers 503 on the socket and closes it at
        // once. With on_error the exchange runs and lets it answer.
        // (It asks for admission itself then, counted once.)
        let permit = if spec.callbacks.on_error {
            None
        } else {
            match exchange::admit(proxy, &spec) {
                Ok(permit) => Some(permit),
                Err(err) => {
                    exchange::refused(proxy, spec.id, &spec.method, &spec.target.url(), &err);
                    return Err(errors::raise(ruby, &err));
                }
            }
        };
        let client = match args::duplicate(fd, "client") {
            Ok(client) => client,
            Err(e) => {
                if e.out_of_fds() {
                    let overload = e.overload(&spec.target.url());
                    exchange::refused(proxy, spec.id, &spec.method, &spec.target.url(), &overload);
                }
                return Err(e.for_exchange(ruby, &spec.target.url()));
            }
        };
        exchange::start_admitted(proxy, spec, client, permit);
        Ok(())
    })
}

/// Judges an origin URL before the socket is taken, with the parser the
/// exchange will use: `[canonical_url, host, address]`, or ArgumentError.
/// `tunnel` asks for a proxy_tunnel target (`tcp://host:port`) instead of
/// an http(s) URL.
fn check_url(ruby: &Ruby, url: String, tunnel: bool) -> Result<(String, String, String), Error> {
    guard(|| {
        let kind = if tunnel { Kind::Tcp } else { Kind::Http };
        let checked =
            origin_url::check(&url, kind).map_err(|message| errors::argument_error(ruby, message))?;
        Ok((checked.url(), checked.host().to_owned(), checked.address()))
    })
}

/// The next callback job, waited for with the GVL released; nil when
/// interrupted, timed out or shut down. Jobs whose exchange stopped waiting
/// are dropped unrun (counted in `callback_jobs_expired`).
fn next_job(ruby: &Ruby, timeout: Option<f64>) -> Result<Option<Job>, Error> {
    guard(|| {
        let proxy = runtime::current().map_err(|e| errors::raise(ruby, &e))?;
        let deadline = timeout.map(|t| Instant::now() + Duration::from_secs_f64(t.max(0.0)));
        let interrupted = AtomicBool::new(false);
        let queue = &proxy.callbacks.queue;
        let expired = &proxy.stats.callback_jobs_expired;
        let job = nogvl(
            ruby,
            || loop {
                match queue.pop_wait(&interrupted, deadline) {
                    Some(job) if job.is_stale() => {
                        expired.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    other => break other,
                }
            },
            || queue.interrupt(&interrupted),
        )?;
        Ok(job.map(Job::from_callback))
    })
}

fn configure(ruby: &Ruby, options: RHash) -> Result<(), Error> {
    guard(|| {
        let defaults = Settings::default();
        let settings = Settings {
            runtime_threads: opt(ruby, options, "runtime_threads")?.unwrap_or(defaults.runtime_threads),
            callback_timeout: seconds_or(ruby, options, "callback_timeout", defaults.callback_timeout)?,
            pool_idle_timeout: seconds_or(ruby, options, "pool_idle_timeout", defaults.pool_idle_timeout)?,
            pool_max_idle_per_host: opt(ruby, options, "pool_max_idle_per_host")?
                .unwrap_or(defaults.pool_max_idle_per_host),
            max_connections: opt(ruby, options, "max_connections")?.unwrap_or(defaults.max_connections),
            max_connections_per_origin: opt(ruby, options, "max_connections_per_origin")?
                .unwrap_or(defaults.max_connections_per_origin),
            fd_budget: opt(ruby, options, "fd_budget")?.unwrap_or(defaults.fd_budget),
            metrics_hosts: opt(ruby, options, "metrics_hosts")?.unwrap_or(defaults.metrics_hosts),
            zero_copy: opt(ruby, options, "zero_copy")?.unwrap_or(defaults.zero_copy),
        };
        runtime::configure(settings);
        Ok(())
    })
}

fn stats(ruby: &Ruby) -> Result<RHash, Error> {
    let hash = ruby.hash_new();
    let pairs = match runtime::existing() {
        Some(proxy) => proxy.stats.snapshot(),
        None => crate::stats::Stats::default().snapshot(),
    };
    for (name, value) in pairs {
        hash.aset(ruby.to_symbol(name), value)?;
    }
    // Callback jobs waiting for a Ruby callback thread (callbacks_queued is
    // the older name of the same number).
    let queued = runtime::existing().map_or(0, |p| p.callbacks.queue.len());
    hash.aset(ruby.to_symbol("callback_jobs_queued"), queued)?;
    if let Some(proxy) = runtime::existing() {
        hash.aset(ruby.to_symbol("callbacks_queued"), queued)?;
        hash.aset(
            ruby.to_symbol("tasks_alive"),
            proxy.runtime.metrics().num_alive_tasks(),
        )?;
    }
    Ok(hash)
}

/// The Prometheus text of `values` (`[[name, Integer or Float], …]`: the
/// stats Ruby gathered) and this process's latency histograms.
fn metrics_text(ruby: &Ruby, values: RArray) -> Result<String, Error> {
    guard(|| {
        let mut pairs = Vec::with_capacity(values.len());
        for pair in values.into_iter() {
            let (name, value): (String, Value) = TryConvert::try_convert(pair)?;
            let value = if let Some(int) = Integer::from_value(value) {
                Metric::Int(int.to_i64().unwrap_or(i64::MAX))
            } else if let Some(float) = Float::from_value(value) {
                Metric::Float(float.to_f64())
            } else if value.is_nil() {
                continue;
            } else {
                return Err(errors::argument_error(
                    ruby,
                    format!("metric {name} is not a number"),
                ));
            };
            pairs.push((name, value));
        }
        Ok(match runtime::existing() {
            Some(proxy) => proxy.metrics.render(proxy.pid, &pairs),
            None => Metrics::new(Vec::new()).render(std::process::id(), &pairs),
        })
    })
}

/// Refuses new exchanges (they answer 503) from now on.
fn stop_accepting() {
    if let Some(proxy) = runtime::existing() {
        proxy.stop_accepting();
    }
}

/// Waits up to `timeout` seconds, GVL released, for running exchanges to
/// end; true when none is left.
fn wait_idle(ruby: &Ruby, timeout: f64) -> Result<bool, Error> {
    guard(|| match runtime::existing() {
        Some(proxy) => nogvl::wait_idle(ruby, &proxy.stats.exchanges, timeout),
        None => Ok(true),
    })
}

/// The defaults of the process-wide settings, for Ruby's `Configuration`
/// (one place: `Settings::default` and `DeliverySettings::default`; the
/// per-call timeouts and the Ruby-only settings are Ruby's). Seconds as
/// Floats; status ranges as `[[low, high], …]`; an async_rate of 0 is none.
fn default_settings(ruby: &Ruby) -> Result<RHash, Error> {
    let runtime = Settings::default();
    let delivery = crate::delivery::DeliverySettings::default();
    let ranges = |list: &[std::ops::RangeInclusive<u16>]| -> Result<RArray, Error> {
        let array = ruby.ary_new_capa(list.len());
        for range in list {
            array.push((*range.start(), *range.end()))?;
        }
        Ok(array)
    };
    let hash = ruby.hash_new();
    let key = |name: &str| ruby.to_symbol(name);
    hash.aset(key("max_connections"), runtime.max_connections)?;
    hash.aset(
        key("max_connections_per_origin"),
        runtime.max_connections_per_origin,
    )?;
    hash.aset(key("fd_budget"), runtime.fd_budget)?;
    hash.aset(key("runtime_threads"), runtime.runtime_threads)?;
    hash.aset(key("callback_timeout"), runtime.callback_timeout.as_secs_f64())?;
    hash.aset(key("pool_idle_timeout"), runtime.pool_idle_timeout.as_secs_f64())?;
    hash.aset(key("pool_max_idle_per_host"), runtime.pool_max_idle_per_host)?;
    if let crate::delivery::QueueLocation::Sqlite(path) = &delivery.queue {
        hash.aset(key("async_queue_path"), path.to_string_lossy().as_ref())?;
    }
    hash.aset(key("async_concurrency"), delivery.concurrency)?;
    hash.aset(key("async_rate"), delivery.rate)?;
    hash.aset(key("async_timeout"), delivery.timeout.as_secs_f64())?;
    hash.aset(key("async_max_attempts"), delivery.max_attempts)?;
    hash.aset(key("async_backoff"), delivery.backoff.as_secs_f64())?;
    hash.aset(key("async_backoff_max"), delivery.backoff_max.as_secs_f64())?;
    hash.aset(key("async_success"), ranges(&delivery.success)?)?;
    hash.aset(key("async_retry_on"), ranges(&delivery.retry)?)?;
    Ok(hash)
}

/// The hop-by-hop header names (lowercase): `headers.rs` owns the list.
fn hop_by_hop_headers() -> Vec<&'static str> {
    crate::headers::hop_by_hop().to_vec()
}

/// Aborts every running exchange.
fn cut() {
    if let Some(proxy) = runtime::existing() {
        proxy.cut();
    }
}

/// Wakes and stops the callback threads for good.
fn close_callbacks() {
    if let Some(proxy) = runtime::existing() {
        proxy.callbacks.queue.close();
    }
}

fn active() -> usize {
    runtime::existing().map_or(0, |p| p.stats.exchanges.active())
}

/// Builds this process's runtime now rather than on first use; returns the
/// pid that owns it.
fn start_runtime(ruby: &Ruby) -> Result<u32, Error> {
    guard(|| {
        runtime::current()
            .map(|p| p.pid)
            .map_err(|e| errors::raise(ruby, &e))
    })
}

/// The pid that built this process's runtime (nil when none yet).
fn runtime_pid() -> Option<u32> {
    runtime::existing().map(|p| p.pid)
}

pub fn define(native: &magnus::RModule) -> Result<(), Error> {
    use magnus::function;
    native.define_module_function("start_exchange", function!(start_exchange, 2))?;
    native.define_module_function("check_url", function!(check_url, 2))?;
    native.define_module_function("next_job", function!(next_job, 1))?;
    native.define_module_function("configure", function!(configure, 1))?;
    native.define_module_function("default_settings", function!(default_settings, 0))?;
    native.define_module_function("hop_by_hop_headers", function!(hop_by_hop_headers, 0))?;
    native.define_module_function("stats", function!(stats, 0))?;
    native.define_module_function("metrics_text", function!(metrics_text, 1))?;
    native.define_module_function("stop_accepting", function!(stop_accepting, 0))?;
    native.define_module_function("wait_idle", function!(wait_idle, 1))?;
    native.define_module_function("cut", function!(cut, 0))?;
    native.define_module_function("close_callbacks", function!(close_callbacks, 0))?;
    native.define_module_function("active", function!(active, 0))?;
    native.define_module_function("runtime_pid", function!(runtime_pid, 0))?;
    native.define_module_function("start_runtime", function!(start_runtime, 0))?;
    Ok(())
}
