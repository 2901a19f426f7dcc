//! `events` mode: many SSE subscribers fed by publishes the driver asks
//! for, the event-streams scenario (issue 17).
//!
//! The driver opens `--streams` raw TCP SSE clients on `--url`, then asks
//! the app to publish through `--publish-url` (GET `?seq=S&count=C`: the app
//! publishes C events with sequence numbers S.. and puts its own
//! CLOCK_MONOTONIC nanoseconds in each one's data, `data: <seq> <ns>`).
//! Publisher and clients share the machine's monotonic clock, so each
//! client computes publish-to-receive latency from the event itself.
//!
//! Phases: ramp (open the streams, `--window` at a time), warm-up (publish
//! until every open stream has received an event: registration may lag the
//! response head), latency (`--publishes` single publishes, one at a time,
//! each waited for at every ready stream: the "last subscriber" latency of
//! each), hold (`--hold-secs`, RSS of `--watch-pid` sampled), optionally
//! rate (`--rate-secs`: publishes of `--rate-batch` events back to back,
//! never more than `--rate-window` events ahead of the slowest subscriber in
//! total, with an inline `--probe-url` probed every 10 ms), then close.
//! `--group-header NAME` tallies the streams by that response header (which
//! Puma worker holds each stream).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit};

use crate::http::{self, Failure, Target};
use crate::ramp::{self, count_state, CONNECTING, ENDED, FAILED, OPEN};
use crate::report::{fd_count, rss_kb, sum_over, JsonObject, Samples, Tally};
use crate::Args;

mod wire;
use wire::{parse_head, take_events, Dechunk};

/// Warm-up publishes use sequence numbers below this; latency publishes
/// start here; the rate phase starts at RATE_BASE.
const LATENCY_BASE: u64 = 16;
const RATE_BASE: u64 = 1 << 32;
/// Largest response head accepted from the app.
const MAX_HEAD: usize = 16 * 1024;

/// CLOCK_MONOTONIC in nanoseconds: the clock Ruby's
/// `Process.clock_gettime(Process::CLOCK_MONOTONIC, :nanosecond)` reads.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One subscriber, shared between its task and the phases.
struct Sub {
    state: AtomicU8,
    /// Events received (any sequence number).
    events: AtomicU32,
    /// Latency-phase events received.
    latency_events: AtomicU32,
}

/// One latency publish as the clients saw it.
#[derive(Default)]
struct PublishSlot {
    received: AtomicU32,
    max_us: AtomicU64,
}

/// What every stream task reports into.
struct Shared {
    delivered: AtomicU64,
    slots: Vec<PublishSlot>,
    /// Every latency-phase delivery, for the percentiles over all of them.
    samples: Mutex<Samples>,
    failures: Arc<Mutex<Tally>>,
    groups: Mutex<BTreeMap<String, u64>>,
}

impl ramp::Stream for Sub {
    fn state(&self) -> &AtomicU8 {
        &self.state
    }
}

impl Shared {
    fn on_event(&self, sub: &Sub, seq: u64, sent_ns: u64, now_ns: u64) {
        sub.events.fetch_add(1, Ordering::Relaxed);
        self.delivered.fetch_add(1, Ordering::Relaxed);
        if seq >= LATENCY_BASE {
            if let Some(slot) = self.slots.get((seq - LATENCY_BASE) as usize) {
                let us = now_ns.saturating_sub(sent_ns) / 1000;
                slot.max_us.fetch_max(us, Ordering::Relaxed);
                slot.received.fetch_add(1, Ordering::Relaxed);
                sub.latency_events.fetch_add(1, Ordering::Relaxed);
                self.samples
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .record(Duration::from_micros(us));
            }
        }
    }
}

/// One subscriber: connect, request, head, then events until the peer
/// ends the stream or the task is dropped (which closes the socket).
async fn run_stream(
    target: Arc<Target>,
    request: Arc<Vec<u8>>,
    sub: Arc<Sub>,
    shared: Arc<Shared>,
    mut permit: Option<OwnedSemaphorePermit>,
    group: Option<Arc<String>>,
) -> Result<(), Failure> {
    let step = Duration::from_secs(30);
    let mut stream: TcpStream = http::connect(target.addr, step).await?;
    tokio::time::timeout(step, stream.write_all(&request))
        .await
        .map_err(|_| Failure::Timeout)?
        .map_err(|_| Failure::Io)?;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err(Failure::BadResponse);
        }
        let n = tokio::time::timeout(Duration::from_secs(120), stream.read(&mut chunk))
            .await
            .map_err(|_| Failure::Timeout)?
            .map_err(|_| Failure::Io)?;
        if n == 0 {
            return Err(Failure::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let (status, chunked, group_value) = parse_head(&buf[..head_end], group.as_deref().map(String::as_str))?;
    if status != 200 {
        return Err(Failure::BadResponse);
    }
    if let Some(value) = group_value {
        *shared
            .groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(value)
            .or_insert(0) += 1;
    }
    sub.state.store(OPEN, Ordering::SeqCst);
    drop(permit.take());
    let mut dechunk = chunked.then(|| Dechunk::Size(Vec::new()));
    let mut carry = Vec::new();
    let mut pending = buf.split_off(head_end + 4);
    loop {
        let now = mono_ns();
        match &mut dechunk {
            Some(d) => d.feed(&pending, &mut carry)?,
            None => carry.extend_from_slice(&pending),
        }
        take_events(&mut carry, |seq, sent| shared.on_event(&sub, seq, sent, now));
        if carry.len() > 64 * 1024 {
            return Err(Failure::BadResponse);
        }
        let n = stream.read(&mut chunk).await.map_err(|_| Failure::Io)?;
        if n == 0 {
            return Err(Failure::Closed);
        }
        pending.clear();
        pending.extend_from_slice(&chunk[..n]);
    }
}

/// Asks the app to publish `count` events numbered from `seq`.
async fn publish(base: &str, seq: u64, count: u64) -> Result<(), String> {
    let sep = if base.contains('?') { '&' } else { '?' };
    let target = Target::parse(&format!("{base}{sep}seq={seq}&count={count}"))?;
    let mut read_buf = [0u8; 4096];
    let outcome = http::fetch_close(
        &target,
        &target.request(false),
        Duration::from_secs(60),
        &mut read_buf,
        512,
    )
    .await
    .map_err(|f| format!("publish request failed: {}", f.name()))?;
    if outcome.status != 200 {
        let body = String::from_utf8_lossy(&outcome.body);
        return Err(format!("publish answered {}: {}", outcome.status, body.trim()));
    }
    Ok(())
}

/// Waits (bounded) until `done` holds; whether it did.
async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    true
}

fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

pub async fn events(args: &Args) -> Result<String, String> {
    let target = Arc::new(Target::parse(args.required("--url")?)?);
    let publish_url = args.required("--publish-url")?.to_owned();
    let streams: usize = args.number("--streams", 1000usize)?;
    let window: usize = args.number("--window", 256usize)?.max(1);
    let publishes: usize = args.number("--publishes", 20usize)?;
    let gap = Duration::from_millis(args.number("--publish-gap-ms", 100u64)?);
    let hold = Duration::from_secs_f64(args.number("--hold-secs", 0.0f64)?);
    let rate_secs = Duration::from_secs_f64(args.number("--rate-secs", 0.0f64)?);
    let rate_batch: u64 = args.number("--rate-batch", 50u64)?.max(1);
    let rate_window: u64 = args.number("--rate-window", 500u64)?.max(1);
    let ramp_timeout = Duration::from_secs(args.number("--ramp-timeout-secs", 180u64)?);
    let probe = match args.string("--probe-url") {
        Some(url) => Some(Arc::new(Target::parse(url)?)),
        None => None,
    };
    let group = args.string("--group-header").map(|g| Arc::new(g.to_owned()));
    let mut pids = Vec::new();
    for pid in args.all("--watch-pid") {
        pids.push(pid.parse::<u32>().map_err(|_| format!("bad pid {pid}"))?);
    }
    let fd_limit = crate::raise_fd_limit();
    if streams as u64 + 64 > fd_limit {
        return Err(format!(
            "{streams} streams need more descriptors than this process may open ({fd_limit})"
        ));
    }

    let rss_baseline = sum_over(&pids, rss_kb);
    let fds_baseline = sum_over(&pids, fd_count);
    let shared = Arc::new(Shared {
        delivered: AtomicU64::new(0),
        slots: (0..publishes).map(|_| PublishSlot::default()).collect(),
        samples: Mutex::new(Samples::new(4_000_000)),
        failures: Arc::default(),
        groups: Mutex::new(BTreeMap::new()),
    });
    let subs: Vec<Arc<Sub>> = (0..streams)
        .map(|_| {
            Arc::new(Sub {
                state: AtomicU8::new(CONNECTING),
                events: AtomicU32::new(0),
                latency_events: AtomicU32::new(0),
            })
        })
        .collect();
    let request = Arc::new(target.request(false));
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let ramp_deadline = tokio::time::Instant::now() + ramp_timeout;
    let ramp = ramp::ramp(
        "events",
        &subs,
        window,
        ramp_deadline,
        &cancel_rx,
        &shared.failures,
        |sub, permit| {
            run_stream(
                Arc::clone(&target),
                Arc::clone(&request),
                sub,
                Arc::clone(&shared),
                Some(permit),
                group.clone(),
            )
        },
    )
    .await;
    let (mut set, started, ramp_secs) = (ramp.tasks, ramp.started, ramp.secs);
    let opened = count_state(&subs, OPEN);
    let open_peak = ramp.open_peak;
    eprintln!("events: ramp done in {ramp_secs:.1}s, {opened} open");

    // Warm-up: every open stream must have received an event.
    let open_subs: Vec<Arc<Sub>> = subs
        .iter()
        .filter(|s| s.state.load(Ordering::SeqCst) == OPEN)
        .cloned()
        .collect();
    let got_one = |subs: &[Arc<Sub>]| {
        subs.iter()
            .filter(|s| s.events.load(Ordering::Relaxed) > 0)
            .count() as u64
    };
    // A publish that fails (a Ruby row out of threads: the request times
    // out) ends the phases; what was measured so far is still reported.
    let mut publish_error: Option<String> = None;
    let mut warmups = 0u64;
    if opened > 0 {
        for seq in 1..LATENCY_BASE {
            warmups += 1;
            if let Err(e) = publish(&publish_url, seq, 1).await {
                publish_error = Some(e);
                break;
            }
            if wait_until(Duration::from_secs(10), || {
                got_one(&open_subs) == open_subs.len() as u64
            })
            .await
            {
                break;
            }
        }
    }
    let ready = got_one(&open_subs);
    eprintln!("events: {ready} of {opened} open streams received the warm-up ({warmups} publishes)");

    // Latency: one publish at a time, waited for at every ready stream.
    let mut last_ms = Vec::new();
    let mut missing = 0u64;
    if ready > 0 && publish_error.is_none() {
        for (index, slot) in shared.slots.iter().enumerate() {
            if let Err(e) = publish(&publish_url, LATENCY_BASE + index as u64, 1).await {
                publish_error = Some(e);
                break;
            }
            // Long enough for the Ruby rows' slowest deliveries (seconds at
            // 19,000 threads), so they are measured rather than missing.
            wait_until(Duration::from_secs(30), || {
                slot.received.load(Ordering::Relaxed) as u64 >= ready
            })
            .await;
            missing += ready.saturating_sub(slot.received.load(Ordering::Relaxed) as u64);
            last_ms.push(slot.max_us.load(Ordering::Relaxed) as f64 / 1000.0);
            tokio::time::sleep(gap).await;
        }
    }

    // Hold: RSS with every stream open.
    let mut rss_max = sum_over(&pids, rss_kb);
    let hold_end = Instant::now() + hold;
    while Instant::now() < hold_end {
        tokio::time::sleep(Duration::from_millis(250).min(hold_end - Instant::now())).await;
        rss_max = rss_max.max(sum_over(&pids, rss_kb));
    }
    let rss_plateau = sum_over(&pids, rss_kb);
    let fds_plateau = sum_over(&pids, fd_count);
    let healthy = subs
        .iter()
        .filter(|s| {
            s.state.load(Ordering::SeqCst) == OPEN
                && s.events.load(Ordering::Relaxed) > 0
                && s.latency_events.load(Ordering::Relaxed) as usize == publishes
        })
        .count() as u64;

    // Rate: as many events as the subscribers take, with an inline probe.
    let mut rate = JsonObject::new();
    let rate_ran = !rate_secs.is_zero() && ready > 0 && publish_error.is_none();
    if rate_ran {
        let open_before = count_state(&subs, OPEN);
        let probe_stop = Arc::new(AtomicU8::new(0));
        let probe_task = probe.clone().map(|probe| {
            let stop = Arc::clone(&probe_stop);
            tokio::spawn(async move {
                let request = probe.request(false);
                let mut samples = Samples::new(1_000_000);
                let mut tally = Tally::default();
                let mut read_buf = [0u8; 16 * 1024];
                while stop.load(Ordering::Relaxed) == 0 {
                    match http::fetch_close(&probe, &request, Duration::from_secs(30), &mut read_buf, 0).await
                    {
                        Ok(outcome) => {
                            tally.status(outcome.status);
                            samples.record(outcome.latency);
                        }
                        Err(failure) => tally.failure(failure),
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                (samples, tally)
            })
        });
        let delivered_start = shared.delivered.load(Ordering::Relaxed);
        let began = Instant::now();
        let mut published = 0u64;
        let mut stalls = 0u64;
        let mut error = None;
        while began.elapsed() < rate_secs {
            if let Err(e) = publish(&publish_url, RATE_BASE + published, rate_batch).await {
                error = Some(e);
                break;
            }
            published += rate_batch;
            // Never more than `rate_window` events per subscriber in flight.
            let receivers = count_state(&subs, OPEN).max(1);
            let caught_up = wait_until(Duration::from_secs(10), || {
                let delivered = shared.delivered.load(Ordering::Relaxed) - delivered_start;
                published.saturating_sub(rate_window) * receivers <= delivered
            })
            .await;
            if !caught_up {
                stalls += 1;
                break;
            }
        }
        let publishing_secs = began.elapsed().as_secs_f64();
        let delivered_during = shared.delivered.load(Ordering::Relaxed) - delivered_start;
        // Let the last events arrive, then count what never did.
        let receivers = count_state(&subs, OPEN);
        wait_until(Duration::from_secs(5), || {
            shared.delivered.load(Ordering::Relaxed) - delivered_start >= published * receivers
        })
        .await;
        let delivered_total = shared.delivered.load(Ordering::Relaxed) - delivered_start;
        probe_stop.store(1, Ordering::Relaxed);
        rate.num("secs", Some(publishing_secs))
            .int("published", published)
            .int("delivered", delivered_total)
            .num("delivered_per_s", Some(delivered_during as f64 / publishing_secs))
            .num("published_per_s", Some(published as f64 / publishing_secs))
            .int("stalls", stalls)
            .int("open_before", open_before)
            .int("open_after", receivers)
            .int(
                "not_delivered",
                (published * receivers).saturating_sub(delivered_total),
            );
        if let Some(e) = error {
            rate.str("error", &e);
        }
        if let Some(task) = probe_task {
            let (mut samples, tally) = task.await.map_err(|e| format!("probe task: {e}"))?;
            let mut p = JsonObject::new();
            p.int("count", samples.count)
                .num("p50_ms", samples.percentile_ms(50.0))
                .num("p99_ms", samples.percentile_ms(99.0))
                .num("max_ms", samples.max_ms());
            tally.json_fields(&mut p);
            rate.raw("probe", &p.finish());
        }
    }

    // Close.
    let close_started = Instant::now();
    let _ = cancel_tx.send(true);
    let close_deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Ok(Some(_)) = tokio::time::timeout_at(close_deadline, set.join_next()).await {}
    set.abort_all();

    let mut samples = std::mem::replace(
        &mut *shared.samples.lock().unwrap_or_else(|e| e.into_inner()),
        Samples::new(1),
    );
    let per_stream = match (rss_baseline, rss_plateau) {
        (Some(before), Some(after)) if healthy > 0 => Some((after as f64 - before as f64) / healthy as f64),
        _ => None,
    };
    let tally = std::mem::take(&mut *shared.failures.lock().unwrap_or_else(|e| e.into_inner()));
    let mut object = JsonObject::new();
    object
        .int("streams", streams as u64)
        .int("started", started as u64)
        .int("opened", opened)
        // A Ruby row whose Puma died during the ramp: how far it got.
        .int("open_peak", open_peak)
        .int("ready", ready)
        .int("warmup_publishes", warmups)
        .int("healthy", healthy)
        .int("failed_before_open", count_state(&subs, FAILED))
        .int("ended_early", count_state(&subs, ENDED))
        .num("ramp_secs", Some(ramp_secs))
        .int("publishes", last_ms.len() as u64)
        .int("deliveries_missing", missing)
        .num("last_p50_ms", percentile(&last_ms, 50.0))
        .num("last_p99_ms", percentile(&last_ms, 99.0))
        .num("last_max_ms", percentile(&last_ms, 100.0))
        .num("delivery_p50_ms", samples.percentile_ms(50.0))
        .num("delivery_p99_ms", samples.percentile_ms(99.0))
        .num("rss_baseline_kb", rss_baseline.map(|v| v as f64))
        .num("rss_plateau_kb", rss_plateau.map(|v| v as f64))
        .num("rss_max_kb", rss_max.map(|v| v as f64))
        .num("rss_per_stream_kb", per_stream)
        .num("fds_baseline", fds_baseline.map(|v| v as f64))
        .num("fds_plateau", fds_plateau.map(|v| v as f64))
        .num("client_close_ms", Some(ms(close_started.elapsed())));
    if let Some(e) = &publish_error {
        object.str("publish_error", e);
    }
    object.raw(
        "last_ms",
        &format!(
            "[{}]",
            last_ms
                .iter()
                .map(|v| format!("{v:.3}"))
                .collect::<Vec<_>>()
                .join(",")
        ),
    );
    if rate_ran {
        object.raw("rate", &rate.finish());
    }
    object.raw("groups", &{
        let mut groups = JsonObject::new();
        for (name, n) in shared.groups.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            groups.int(name, *n);
        }
        groups.finish()
    });
    object.raw("failures", &{
        let mut failures = JsonObject::new();
        for (name, n) in &tally.failures {
            failures.int(name, *n);
        }
        failures.finish()
    });
    Ok(object.finish())
}
