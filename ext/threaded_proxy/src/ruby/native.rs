//! `ThreadedProxy::Native`: the module functions Ruby calls. Thin: parse
//! arguments under the GVL, hand plain data to the core, convert errors.

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use bytes::Bytes;
use magnus::value::ReprValue;
use magnus::{Error, Float, Integer, RArray, RHash, Ruby, Symbol, TryConvert, Value};

use super::errors;
use super::job::{parse_headers, Job};
use super::nogvl::{self, guard, nogvl};
use crate::exchange::{self, CallbackSet, ExchangeSpec, Timeouts, TunnelTarget};
use crate::handoff;
use crate::headers::ClientRequest;
use crate::metrics::{Metrics, Value as Metric};
use crate::origin::{BodySource, TlsSettings};
use crate::origin_url::{self, Kind};
use crate::runtime::{self, Settings};

fn key<T: TryConvert>(ruby: &Ruby, hash: RHash, name: &str) -> Result<T, Error> {
    hash.fetch::<Symbol, T>(ruby.to_symbol(name))
}

fn opt<T: TryConvert>(ruby: &Ruby, hash: RHash, name: &str) -> Result<Option<T>, Error> {
    hash.lookup::<Symbol, Option<T>>(ruby.to_symbol(name))
}

fn seconds(ruby: &Ruby, hash: RHash, name: &str) -> Result<Duration, Error> {
    let value: f64 = key(ruby, hash, name)?;
    Duration::try_from_secs_f64(value)
        .map_err(|_| errors::argument_error(ruby, format!("{name} must be a positive number of seconds")))
}

/// Takes over the client socket `fd` (duplicated here, under the GVL; the
/// caller closes its IO right after) and starts the exchange described by
/// `spec`. Returns at once.
fn start_exchange(ruby: &Ruby, fd: i32, spec: RHash) -> Result<(), Error> {
    guard(|| {
        let method: String = key(ruby, spec, "method")?;
        let method = http::Method::from_bytes(method.as_bytes())
            .map_err(|_| errors::argument_error(ruby, format!("invalid HTTP method {method:?}")))?;
        let url: String = key(ruby, spec, "url")?;
        let tunnel_address = opt::<String>(ruby, spec, "tunnel_address")?;
        // The check Ruby made before the hijack, again: the URL used is the
        // canonical one whoever called.
        let kind = if tunnel_address.is_some() {
            Kind::Tcp
        } else {
            Kind::Http
        };
        let target =
            origin_url::check(&url, kind).map_err(|message| errors::argument_error(ruby, message))?;
        let url = &*target.url();
        let body = match opt::<Value>(ruby, spec, "body")? {
            None => BodySource::Empty,
            Some(value) if value.is_nil() => BodySource::Empty,
            Some(value) => BodySource::Bytes(Bytes::try_convert(value)?),
        };
        let body = match opt::<i32>(ruby, spec, "body_fd")? {
            Some(body_fd) => {
                let owned = handoff::duplicate(body_fd).map_err(|e| {
                    if let (true, Ok(proxy)) =
                        (crate::limits::out_of_fds(e.raw_os_error()), runtime::current())
                    {
                        let id = key(ruby, spec, "id").unwrap_or(0);
                        exchange::refused(proxy, id, &method, url, &fd_overload(url, "body", &e));
                    }
                    dup_failed(ruby, url, "body", &e)
                })?;
                BodySource::File {
                    file: std::fs::File::from(owned),
                    offset: opt::<u64>(ruby, spec, "body_offset")?.unwrap_or(0),
                }
            }
            None => body,
        };
        let spec = ExchangeSpec {
            id: key(ruby, spec, "id")?,
            method,
            target: target.clone(),
            headers: parse_headers(ruby, key(ruby, spec, "headers")?)?,
            body,
            client: ClientRequest {
                head_only: key(ruby, spec, "client_head")?,
                http10: key(ruby, spec, "client_http10")?,
            },
            callbacks: CallbackSet {
                on_headers: key(ruby, spec, "on_headers")?,
                on_response: key(ruby, spec, "on_response")?,
                on_error: key(ruby, spec, "on_error")?,
                finished: key(ruby, spec, "finished")?,
            },
            timeouts: Timeouts {
                connect: seconds(ruby, spec, "connect_timeout")?,
                header: seconds(ruby, spec, "header_timeout")?,
                idle: seconds(ruby, spec, "idle_timeout")?,
            },
            tls: TlsSettings {
                verify: key(ruby, spec, "verify_tls")?,
                ca_file: opt::<String>(ruby, spec, "ca_file")?.map(Into::into),
            },
            max_buffered_body: key(ruby, spec, "max_buffered_body")?,
            upgrade: opt::<Bytes>(ruby, spec, "upgrade")?,
            // The address Ruby sends is the one `check_url` gave it; the
            // target's own is used.
            tunnel: match tunnel_address {
                Some(_) => Some(TunnelTarget {
                    upgrade: opt::<Bytes>(ruby, spec, "tunnel_upgrade")?,
                }),
                None => None,
            },
        };
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
        let client = match handoff::duplicate(fd) {
            Ok(client) => client,
            Err(e) => {
                let err = dup_failed(ruby, &spec.target.url(), "client", &e);
                if crate::limits::out_of_fds(e.raw_os_error()) {
                    let overload = fd_overload(&spec.target.url(), "client", &e);
                    exchange::refused(proxy, spec.id, &spec.method, &spec.target.url(), &overload);
                }
                return Err(err);
            }
        };
        exchange::start_admitted(proxy, spec, client, permit);
        Ok(())
    })
}

fn fd_overload(url: &str, what: &str, e: &std::io::Error) -> crate::errors::ProxyError {
    crate::errors::ProxyError::Overload {
        url: url.to_owned(),
        message: format!("out of file descriptors: cannot duplicate the {what} fd: {e}"),
    }
}

/// A failed `dup` of a descriptor Ruby handed over: out of descriptors is
/// an overload (`OverloadError`, answered 503 with Retry-After); anything
/// else (a closed descriptor) is a bug of the caller (IOError).
fn dup_failed(ruby: &Ruby, url: &str, what: &str, e: &std::io::Error) -> Error {
    if crate::limits::out_of_fds(e.raw_os_error()) {
        return errors::raise(ruby, &fd_overload(url, what, e));
    }
    Error::new(
        ruby.exception_io_error(),
        format!("cannot duplicate {what} fd: {e}"),
    )
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
        let duration = |name: &str, default: Duration| -> Result<Duration, Error> {
            match opt::<f64>(ruby, options, name)? {
                Some(secs) => Duration::try_from_secs_f64(secs)
                    .map_err(|_| errors::argument_error(ruby, format!("{name} must be a positive number"))),
                None => Ok(default),
            }
        };
        let settings = Settings {
            runtime_threads: opt(ruby, options, "runtime_threads")?.unwrap_or(defaults.runtime_threads),
            callback_timeout: duration("callback_timeout", defaults.callback_timeout)?,
            pool_idle_timeout: duration("pool_idle_timeout", defaults.pool_idle_timeout)?,
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

/// The default `fd_budget` for this process's descriptor limit, for Ruby's
/// `Configuration` (one rule: `limits::default_fd_budget`).
fn default_fd_budget() -> usize {
    crate::limits::default_fd_budget(crate::limits::soft_fd_limit())
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
    native.define_module_function("default_fd_budget", function!(default_fd_budget, 0))?;
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
