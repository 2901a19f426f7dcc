//! `ThreadedProxy::Native::Machine` and `…::MachineJob`: the Ruby side of
//! the TCP router (`crate::machine`). A Machine object owns one listening
//! machine; its Ruby threads take MachineJobs (plain data plus the reply
//! channel) with the GVL released and answer them.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use magnus::{function, method, Class, Error, Module, Object, RHash, RModule, Ruby, Symbol, TryConvert};
use tokio::sync::oneshot;

use super::errors;
use super::nogvl::{guard, nogvl};
use crate::machine::{self, Answer, Job, Remote, Settings};
use crate::runtime;

#[magnus::wrap(class = "ThreadedProxy::Native::Machine", free_immediately, size)]
struct Machine(Arc<machine::Machine>);

#[magnus::wrap(class = "ThreadedProxy::Native::MachineJob", free_immediately, size)]
struct MachineJob {
    /// "route", "connect_error", "inactivity" or "log".
    kind: &'static str,
    /// The buffer (route) or the log line (log).
    data: Option<Bytes>,
    /// The remote an error callback is about.
    remote: Option<String>,
    /// Taken by the first answer; later answers are ignored.
    reply: Mutex<Option<oneshot::Sender<Answer>>>,
    /// When Ruby took the job: the block's time is measured from here.
    taken: Instant,
    /// Where that time is counted.
    machine: Arc<machine::Machine>,
}

fn opt<T: TryConvert>(ruby: &Ruby, hash: RHash, name: &str) -> Result<Option<T>, Error> {
    hash.lookup::<Symbol, Option<T>>(ruby.to_symbol(name))
}

fn duration(ruby: &Ruby, name: &str, secs: Option<f64>) -> Result<Option<Duration>, Error> {
    secs.map(|s| {
        Duration::try_from_secs_f64(s)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                errors::argument_error(ruby, format!("{name} must be a positive number of seconds"))
            })
    })
    .transpose()
}

/// Binds and starts accepting; returns once the port listens.
fn start(ruby: &Ruby, options: RHash) -> Result<Machine, Error> {
    guard(|| {
        let defaults = Settings::default();
        let settings = Settings {
            host: opt(ruby, options, "host")?.unwrap_or(defaults.host),
            port: opt(ruby, options, "port")?.unwrap_or(defaults.port),
            reuse_port: opt(ruby, options, "reuse_port")?.unwrap_or(defaults.reuse_port),
            max_route_bytes: opt(ruby, options, "max_route_bytes")?.unwrap_or(defaults.max_route_bytes),
            route_timeout: duration(ruby, "route_timeout", opt(ruby, options, "route_timeout")?)?
                .unwrap_or(defaults.route_timeout),
            connect_timeout: duration(ruby, "connect_timeout", opt(ruby, options, "connect_timeout")?)?
                .unwrap_or(defaults.connect_timeout),
            ..defaults
        };
        let proxy = runtime::current().map_err(|e| errors::raise(ruby, &e))?;
        let where_ = format!("{}:{}", settings.host, settings.port);
        machine::Machine::start(settings, proxy.runtime.handle())
            .map(Machine)
            .map_err(|e| {
                Error::new(
                    ruby.exception_io_error(),
                    format!("cannot listen on {where_}: {e}"),
                )
            })
    })
}

impl Machine {
    fn port(&self) -> u16 {
        self.0.port
    }

    /// The next job, waited for with the GVL released; nil when interrupted,
    /// timed out or closed.
    fn next_job(ruby: &Ruby, rb_self: &Self, timeout: Option<f64>) -> Result<Option<MachineJob>, Error> {
        guard(|| {
            let deadline = timeout.map(|t| Instant::now() + Duration::from_secs_f64(t.max(0.0)));
            let interrupted = AtomicBool::new(false);
            let queue = &rb_self.0.jobs;
            let job = nogvl(
                ruby,
                || queue.pop_wait(&interrupted, deadline),
                || queue.interrupt(&interrupted),
            )?;
            Ok(job.map(|job| {
                let (kind, data, remote, reply) = match job {
                    Job::Route { data, reply } => ("route", Some(data), None, Some(reply)),
                    Job::ConnectError { remote } => ("connect_error", None, Some(remote), None),
                    Job::Inactivity { remote } => ("inactivity", None, Some(remote), None),
                    Job::Log { message } => ("log", Some(Bytes::from(message)), None, None),
                };
                MachineJob {
                    kind,
                    data,
                    remote,
                    reply: Mutex::new(reply),
                    taken: Instant::now(),
                    machine: rb_self.0.clone(),
                }
            }))
        })
    }

    /// Returns once the port is closed (GVL released while the accept
    /// loop lets go of it).
    fn stop_accepting(ruby: &Ruby, rb_self: &Self) -> Result<(), Error> {
        let machine = rb_self.0.clone();
        guard(|| nogvl(ruby, move || machine.stop_accepting(), || {}))
    }

    /// Waits up to `timeout` seconds, GVL released, until no connection is
    /// open; true when none is.
    fn wait_idle(ruby: &Ruby, rb_self: &Self, timeout: f64) -> Result<bool, Error> {
        guard(|| super::nogvl::wait_idle(ruby, &rb_self.0.tracker, timeout))
    }

    fn cut(&self) {
        self.0.cut();
    }

    /// Refuses further jobs and wakes every waiting thread.
    fn close_jobs(&self) {
        self.0.jobs.close();
    }

    fn stats(ruby: &Ruby, rb_self: &Self) -> Result<RHash, Error> {
        let hash = ruby.hash_new();
        for (name, value) in rb_self.0.stats.snapshot() {
            hash.aset(ruby.to_symbol(name), value)?;
        }
        hash.aset(ruby.to_symbol("jobs_queued"), rb_self.0.jobs.len())?;
        Ok(hash)
    }
}

impl MachineJob {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn data(&self) -> Option<Bytes> {
        self.data.clone()
    }

    fn remote(&self) -> Option<String> {
        self.remote.clone()
    }

    fn answer(&self, answer: Answer) -> bool {
        let Some(tx) = self.reply.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return false;
        };
        let stats = &self.machine.stats;
        stats.route_calls.fetch_add(1, Relaxed);
        stats
            .route_nanos
            .fetch_add(self.taken.elapsed().as_nanos() as u64, Relaxed);
        tx.send(answer).is_ok()
    }

    /// `{remote:, data:, reply:, connect_timeout:, inactivity_timeout:}`,
    /// checked by Ruby's Machine first; the address form is checked here.
    fn route(ruby: &Ruby, rb_self: &Self, options: RHash) -> Result<bool, Error> {
        let address: String = opt(ruby, options, "remote")?
            .ok_or_else(|| errors::argument_error(ruby, "remote: is required"))?;
        let valid = address
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
        if !valid {
            return Err(errors::argument_error(
                ruby,
                format!("remote must be \"host:port\", got {address:?}"),
            ));
        }
        let remote = Remote {
            address,
            data: opt(ruby, options, "data")?,
            reply: opt(ruby, options, "reply")?,
            connect_timeout: duration(ruby, "connect_timeout", opt(ruby, options, "connect_timeout")?)?,
            inactivity_timeout: duration(
                ruby,
                "inactivity_timeout",
                opt(ruby, options, "inactivity_timeout")?,
            )?,
        };
        Ok(rb_self.answer(Answer::Remote(remote)))
    }

    fn noop(&self) -> bool {
        self.answer(Answer::Noop)
    }

    fn close(&self, bytes: Option<Bytes>) -> bool {
        self.answer(Answer::Close(bytes))
    }

    /// The block raised or answered garbage (Ruby logged it): close.
    fn fail(&self) -> bool {
        self.answer(Answer::Failed)
    }

    fn answered(&self) -> bool {
        self.reply.lock().unwrap_or_else(|e| e.into_inner()).is_none()
    }
}

pub fn define(ruby: &Ruby, native: &RModule) -> Result<(), Error> {
    let class = native.define_class("Machine", ruby.class_object())?;
    class.define_singleton_method("start", function!(start, 1))?;
    class.define_method("port", method!(Machine::port, 0))?;
    class.define_method("next_job", method!(Machine::next_job, 1))?;
    class.define_method("stop_accepting", method!(Machine::stop_accepting, 0))?;
    class.define_method("wait_idle", method!(Machine::wait_idle, 1))?;
    class.define_method("cut", method!(Machine::cut, 0))?;
    class.define_method("close_jobs", method!(Machine::close_jobs, 0))?;
    class.define_method("stats", method!(Machine::stats, 0))?;
    class.undef_default_alloc_func();
    let job = native.define_class("MachineJob", ruby.class_object())?;
    job.define_method("kind", method!(MachineJob::kind, 0))?;
    job.define_method("data", method!(MachineJob::data, 0))?;
    job.define_method("remote", method!(MachineJob::remote, 0))?;
    job.define_method("route", method!(MachineJob::route, 1))?;
    job.define_method("noop", method!(MachineJob::noop, 0))?;
    job.define_method("close", method!(MachineJob::close, 1))?;
    job.define_method("fail", method!(MachineJob::fail, 0))?;
    job.define_method("answered?", method!(MachineJob::answered, 0))?;
    job.undef_default_alloc_func();
    Ok(())
}
