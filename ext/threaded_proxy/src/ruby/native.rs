//! `ThreadedProxy::Native`: the module functions Ruby calls. Thin: parse
//! arguments under the GVL, hand plain data to the core, convert errors.

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use bytes::Bytes;
use magnus::value::ReprValue;
use magnus::{Error, RHash, Ruby, Symbol, TryConvert, Value};

use super::errors;
use super::job::{parse_headers, Job};
use super::nogvl::{self, guard, nogvl};
use crate::exchange::{self, CallbackSet, ExchangeSpec, Timeouts, TunnelTarget};
use crate::handoff;
use crate::headers::ClientRequest;
use crate::runtime::{self, Settings};
use crate::upstream::{BodySource, TlsSettings};

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
        url.parse::<http::Uri>()
            .map_err(|e| errors::argument_error(ruby, format!("invalid URL {url:?}: {e}")))?;
        let body = match opt::<Value>(ruby, spec, "body")? {
            None => BodySource::Empty,
            Some(value) if value.is_nil() => BodySource::Empty,
            Some(value) => BodySource::Bytes(Bytes::try_convert(value)?),
        };
        let body = match opt::<i32>(ruby, spec, "body_fd")? {
            Some(body_fd) => {
                let owned = handoff::duplicate(body_fd).map_err(|e| {
                    Error::new(
                        ruby.exception_io_error(),
                        format!("cannot duplicate body fd: {e}"),
                    )
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
            url,
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
            tunnel: match opt::<String>(ruby, spec, "tunnel_address")? {
                Some(address) => Some(TunnelTarget {
                    address,
                    upgrade: opt::<Bytes>(ruby, spec, "tunnel_upgrade")?,
                }),
                None => None,
            },
        };
        let client = handoff::duplicate(fd).map_err(|e| {
            Error::new(
                ruby.exception_io_error(),
                format!("cannot duplicate client fd {fd}: {e}"),
            )
        })?;
        let proxy = runtime::current().map_err(|e| errors::raise(ruby, &e))?;
        exchange::start(proxy, spec, client);
        Ok(())
    })
}

/// The next callback job, waited for with the GVL released; nil when
/// interrupted, timed out or shut down.
fn next_job(ruby: &Ruby, timeout: Option<f64>) -> Result<Option<Job>, Error> {
    guard(|| {
        let proxy = runtime::current().map_err(|e| errors::raise(ruby, &e))?;
        let deadline = timeout.map(|t| Instant::now() + Duration::from_secs_f64(t.max(0.0)));
        let interrupted = AtomicBool::new(false);
        let queue = &proxy.callbacks.queue;
        let job = nogvl(
            ruby,
            || queue.pop_wait(&interrupted, deadline),
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
    if let Some(proxy) = runtime::existing() {
        hash.aset(ruby.to_symbol("callbacks_queued"), proxy.callbacks.queue.len())?;
        hash.aset(
            ruby.to_symbol("tasks_alive"),
            proxy.runtime.metrics().num_alive_tasks(),
        )?;
    }
    Ok(hash)
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
        Some(proxy) => nogvl::wait_idle(ruby, &proxy.tracker, timeout),
        None => Ok(true),
    })
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
    runtime::existing().map_or(0, |p| p.tracker.active())
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

pub fn define(ruby: &Ruby, native: &magnus::RModule) -> Result<(), Error> {
    use magnus::function;
    native.define_module_function("start_exchange", function!(start_exchange, 2))?;
    native.define_module_function("next_job", function!(next_job, 1))?;
    native.define_module_function("configure", function!(configure, 1))?;
    native.define_module_function("stats", function!(stats, 0))?;
    native.define_module_function("stop_accepting", function!(stop_accepting, 0))?;
    native.define_module_function("wait_idle", function!(wait_idle, 1))?;
    native.define_module_function("cut", function!(cut, 0))?;
    native.define_module_function("close_callbacks", function!(close_callbacks, 0))?;
    native.define_module_function("active", function!(active, 0))?;
    native.define_module_function("runtime_pid", function!(runtime_pid, 0))?;
    native.define_module_function("start_runtime", function!(start_runtime, 0))?;
    let _ = ruby;
    Ok(())
}
