//! `ThreadedProxy::Native` functions behind `stream_events`, `publish` and
//! `subscribers`. Ruby checked the arguments; they are checked again here
//! (whoever calls, no field can be injected). The fan-out runs with the GVL
//! released; after `stream_events` returns no Ruby code runs for the stream.

use std::time::Duration;

use bytes::Bytes;
use magnus::{Error, RArray, RHash, Ruby, Symbol, TryConvert};

use super::errors;
use super::nogvl::{guard, nogvl};
use crate::events::stream::{self, StreamSpec};
use crate::events::{self, encode};
use crate::handoff;
use crate::runtime;

fn key<T: TryConvert>(ruby: &Ruby, hash: RHash, name: &str) -> Result<T, Error> {
    hash.fetch::<Symbol, T>(ruby.to_symbol(name))
}

/// Takes over the hijacked socket `fd` (duplicated here; the caller closes
/// its IO right after) as an event stream. Raises OverloadError (nothing
/// taken) past max_connections / fd_budget.
fn stream_events(ruby: &Ruby, fd: i32, spec: RHash) -> Result<(), Error> {
    guard(|| {
        let channels: Vec<String> = key(ruby, spec, "channels")?;
        if channels.is_empty() {
            return Err(errors::argument_error(ruby, "stream_events needs a channel"));
        }
        let mut headers = Vec::new();
        for pair in key::<RArray>(ruby, spec, "headers")?.into_iter() {
            let (name, value): (String, String) = TryConvert::try_convert(pair)?;
            encode::check_field("header", &name)
                .and_then(|_| encode::check_field("header", &value))
                .map_err(|m| errors::argument_error(ruby, m))?;
            headers.push((name, value));
        }
        let heartbeat: f64 = key(ruby, spec, "heartbeat")?;
        let heartbeat = Duration::try_from_secs_f64(heartbeat)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| errors::argument_error(ruby, "heartbeat must be a positive number of seconds"))?;
        let spec = StreamSpec {
            head: encode::head(key::<Option<u64>>(ruby, spec, "retry")?, &headers),
            channels,
            heartbeat,
            last_event_id: key(ruby, spec, "last_event_id")?,
            queue_bytes: key(ruby, spec, "queue_bytes")?,
            end_when_idle: key(ruby, spec, "end_when_idle")?,
        };
        let proxy = runtime::current().map_err(|e| errors::raise(ruby, &e))?;
        let hub = events::hub();
        // Admission before the duplicate: a refused stream holds nothing and
        // Ruby answers 503 on the socket.
        let permit = stream::admit(proxy, hub).map_err(|e| errors::raise(ruby, &e))?;
        let client = handoff::duplicate(fd).map_err(|e| {
            if crate::limits::out_of_fds(e.raw_os_error()) {
                hub.stats
                    .streams_rejected
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                errors::raise(
                    ruby,
                    &crate::errors::ProxyError::Overload {
                        url: "stream_events".to_owned(),
                        message: format!("out of file descriptors: {e}"),
                    },
                )
            } else {
                Error::new(
                    ruby.exception_io_error(),
                    format!("cannot duplicate client fd: {e}"),
                )
            }
        })?;
        stream::start(proxy, hub, client, spec, permit);
        Ok(())
    })
}

/// Encodes the event once (under the GVL: it reads the Ruby strings) and
/// queues it for every local subscriber of `channel` with the GVL released.
/// `replay`: the channel ring's size (`event_replay`). Returns the count.
fn publish(
    ruby: &Ruby,
    channel: String,
    data: Bytes,
    event: Option<String>,
    id: Option<String>,
    replay: usize,
) -> Result<usize, Error> {
    guard(|| {
        let encoded = encode::event(event.as_deref(), id.as_deref(), &data)
            .map_err(|m| errors::argument_error(ruby, m))?;
        drop(data);
        let hub = events::hub();
        // Nothing here blocks (short locks, no I/O): nothing to unblock.
        nogvl(
            ruby,
            || hub.publish(&channel, encoded, id.as_deref(), replay),
            || {},
        )
    })
}

/// `publish` with `events_url`: stores and NOTIFYs the event (blocking on
/// the database, GVL released); every listening process, this one
/// included, fans it out. Returns this process's subscribers of `channel`
/// now (the local fan-out follows when the notification comes back).
fn publish_remote(
    ruby: &Ruby,
    url: String,
    channel: String,
    data: Bytes,
    event: Option<String>,
    id: Option<String>,
) -> Result<usize, Error> {
    guard(|| {
        let encoded = encode::event(event.as_deref(), id.as_deref(), &data)
            .map_err(|m| errors::argument_error(ruby, m))?;
        drop(data);
        // The blocking client cannot be woken early: an interrupt waits for
        // the statement, at most PUBLISH_TIMEOUT (postgres.rs).
        let stored = nogvl(
            ruby,
            || events::postgres::publish(&url, &channel, id.as_deref(), &encoded),
            || {},
        )?;
        stored.map_err(|message| {
            errors::raise(
                ruby,
                &crate::errors::ProxyError::Internal {
                    message: format!("publish through events_url failed: {message}"),
                },
            )
        })?;
        let hub = events::hub();
        hub.stats
            .notified
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(hub.subscribers(&channel))
    })
}

/// Starts this process's LISTEN connection for `url` (once; later calls
/// only update `replay`, the ring size for events that arrive through it).
fn events_listen(ruby: &Ruby, url: String, replay: usize) -> Result<(), Error> {
    guard(|| {
        let proxy = runtime::current().map_err(|e| errors::raise(ruby, &e))?;
        let hub = events::hub();
        hub.set_replay(replay);
        events::postgres::ensure_listener(&proxy.runtime, hub, &url)
            .map_err(|m| errors::argument_error(ruby, m))
    })
}

/// Local subscribers of `channel` now.
fn subscribers(channel: String) -> usize {
    events::existing().map_or(0, |hub| hub.subscribers(&channel))
}

/// The `events_*` counters (merged into `ThreadedProxy.stats` by Ruby).
fn event_stats(ruby: &Ruby) -> Result<RHash, Error> {
    let hash = ruby.hash_new();
    let stats = events::existing().map(|hub| hub.stats.snapshot());
    let stats = stats.unwrap_or_else(|| events::EventStats::default().snapshot());
    for (name, value) in stats {
        hash.aset(ruby.to_symbol(name), value)?;
    }
    Ok(hash)
}

pub fn define(native: &magnus::RModule) -> Result<(), Error> {
    use magnus::function;
    native.define_module_function("stream_events", function!(stream_events, 2))?;
    native.define_module_function("publish", function!(publish, 5))?;
    native.define_module_function("publish_remote", function!(publish_remote, 5))?;
    native.define_module_function("events_listen", function!(events_listen, 2))?;
    native.define_module_function("subscribers", function!(subscribers, 1))?;
    native.define_module_function("event_stats", function!(event_stats, 0))?;
    Ok(())
}
