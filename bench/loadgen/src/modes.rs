//! The four measurement modes (see the crate doc in main.rs).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio::task::JoinSet;

use crate::http::{self, Failure, Target};
use crate::ramp::{self, count_state, CONNECTING, ENDED, FAILED, OPEN};
use crate::report::{fd_count, rss_kb, sum_over, JsonObject, Samples, Tally};
use crate::Args;

/// Latency samples kept per run (8 MB of u32s); the count goes on past it.
const SAMPLE_CAP: usize = 2_000_000;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ------------------------------------------------------------------ download

/// One big GET: the 1 GiB scenario.
pub async fn download(args: &Args) -> Result<String, String> {
    let target = Target::parse(args.required("--url")?)?;
    let timeout = Duration::from_secs(args.number("--timeout-secs", 120u64)?);
    // Large reads: the driver must not be what limits a loopback stream.
    let mut read_buf = vec![0u8; 256 * 1024];
    let outcome = http::fetch_close(&target, &target.request(false), timeout, &mut read_buf, 0)
        .await
        .map_err(|f| format!("download failed: {}", f.name()))?;
    let secs = outcome.latency.as_secs_f64();
    let mut object = JsonObject::new();
    object
        .num("driver_cpu_s", crate::report::own_cpu_seconds())
        .int("status", outcome.status as u64)
        .int("bytes", outcome.body_bytes)
        .num("secs", Some(secs))
        .num("mb_per_s", Some(outcome.body_bytes as f64 / secs / 1e6));
    Ok(object.finish())
}

// ------------------------------------------------------------------- burst

/// N requests at once plus a sequential probe: the thread-freedom scenario.
pub async fn burst(args: &Args) -> Result<String, String> {
    let target = Arc::new(Target::parse(args.required("--url")?)?);
    let requests: usize = args.number("--requests", 1000usize)?;
    let timeout = Duration::from_secs(args.number("--timeout-secs", 30u64)?);
    let probe = match args.string("--probe-url") {
        Some(url) => Some(Arc::new(Target::parse(url)?)),
        None => None,
    };
    let probe_interval = Duration::from_millis(args.number("--probe-interval-ms", 10u64)?);
    let fd_limit = crate::raise_fd_limit();
    if requests as u64 + 64 > fd_limit {
        return Err(format!(
            "{requests} requests need more descriptors than the limit {fd_limit}"
        ));
    }

    let request = Arc::new(target.request(false));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..requests {
        let target = Arc::clone(&target);
        let request = Arc::clone(&request);
        set.spawn(async move {
            let mut read_buf = [0u8; 16 * 1024];
            let result = http::fetch_close(&target, &request, timeout, &mut read_buf, 0).await;
            (start.elapsed(), result)
        });
    }

    // The probe runs while the burst does, then stops (bounded by timeout).
    let burst_done = Arc::new(AtomicBool::new(false));
    let probe_task = probe.map(|probe| {
        let done = Arc::clone(&burst_done);
        tokio::spawn(async move {
            let request = probe.request(false);
            let mut samples = Samples::new(SAMPLE_CAP);
            let mut tally = Tally::default();
            let mut read_buf = [0u8; 16 * 1024];
            while !done.load(Ordering::Relaxed) && start.elapsed() < timeout {
                match http::fetch_close(&probe, &request, timeout, &mut read_buf, 0).await {
                    Ok(outcome) => {
                        tally.status(outcome.status);
                        samples.record(outcome.latency);
                    }
                    Err(failure) => tally.failure(failure),
                }
                tokio::time::sleep(probe_interval).await;
            }
            (samples, tally)
        })
    });

    let mut samples = Samples::new(SAMPLE_CAP);
    let mut tally = Tally::default();
    let mut wall = Duration::ZERO;
    while let Some(joined) = set.join_next().await {
        let (finished, result) = joined.map_err(|e| format!("burst task: {e}"))?;
        wall = wall.max(finished);
        match result {
            Ok(outcome) => {
                tally.status(outcome.status);
                samples.record(outcome.latency);
            }
            Err(failure) => tally.failure(failure),
        }
    }
    burst_done.store(true, Ordering::Relaxed);

    let mut object = JsonObject::new();
    object
        .int("requests", requests as u64)
        .num("wall_secs", Some(wall.as_secs_f64()))
        .num("p50_ms", samples.percentile_ms(50.0))
        .num("p99_ms", samples.percentile_ms(99.0))
        .num("max_ms", samples.max_ms());
    tally.json_fields(&mut object);
    if let Some(task) = probe_task {
        let (mut probe_samples, probe_tally) = task.await.map_err(|e| format!("probe task: {e}"))?;
        let mut probe = JsonObject::new();
        probe
            .int("count", probe_samples.count)
            .num("p50_ms", probe_samples.percentile_ms(50.0))
            .num("p99_ms", probe_samples.percentile_ms(99.0))
            .num("max_ms", probe_samples.max_ms());
        probe_tally.json_fields(&mut probe);
        object.raw("probe", &probe.finish());
    }
    Ok(object.finish())
}

// -------------------------------------------------------------------- rate

/// Closed-loop throughput: the small-responses scenario.
pub async fn rate(args: &Args) -> Result<String, String> {
    let target = Arc::new(Target::parse(args.required("--url")?)?);
    let connections: usize = args.number("--connections", 32usize)?;
    let duration = Duration::from_secs_f64(args.number("--duration-secs", 10.0f64)?);
    let warmup = Duration::from_secs_f64(args.number("--warmup-secs", 2.0f64)?);
    let timeout = Duration::from_secs(args.number("--timeout-secs", 10u64)?);
    let keep_alive = args.switch("--keep-alive");

    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut set = JoinSet::new();
    for _ in 0..connections {
        let target = Arc::clone(&target);
        set.spawn(async move {
            let request = target.request(keep_alive);
            let mut samples = Samples::new(SAMPLE_CAP / connections.max(1));
            let mut tally = Tally::default();
            let mut read_buf = [0u8; 16 * 1024];
            let mut connection: Option<tokio::net::TcpStream> = None;
            // Every exchange, warm-up included: the CPU counters the harness
            // reads cannot tell warm-up from measurement.
            let mut exchanges: u64 = 0;
            // Bounded by `end` (each exchange by `timeout`).
            while Instant::now() < end {
                exchanges += 1;
                let result = if keep_alive {
                    keep_alive_exchange(&target, &mut connection, &request, timeout, &mut read_buf).await
                } else {
                    http::fetch_close(&target, &request, timeout, &mut read_buf, 0).await
                };
                let finished = Instant::now();
                let counted = finished >= measure_from && finished <= end;
                match result {
                    Ok(outcome) if counted => {
                        tally.status(outcome.status);
                        samples.record(outcome.latency);
                    }
                    Err(failure) => {
                        if counted {
                            tally.failure(failure);
                        }
                        // A failing server must not turn this into a spin.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Ok(_) => {}
                }
            }
            (samples, tally, exchanges)
        });
    }
    let mut samples = Samples::new(SAMPLE_CAP);
    let mut tally = Tally::default();
    let mut exchanges = 0;
    while let Some(joined) = set.join_next().await {
        let (task_samples, task_tally, task_exchanges) = joined.map_err(|e| format!("rate task: {e}"))?;
        samples.merge(task_samples);
        tally.merge(task_tally);
        exchanges += task_exchanges;
    }
    let mut object = JsonObject::new();
    object
        .int("connections", connections as u64)
        .str("connection_mode", if keep_alive { "keep-alive" } else { "close" })
        .num("duration_secs", Some(duration.as_secs_f64()))
        .int("completed", samples.count)
        .int("exchanges_total", exchanges)
        .num("rps", Some(tally.ok as f64 / duration.as_secs_f64()))
        .num("p50_ms", samples.percentile_ms(50.0))
        .num("p99_ms", samples.percentile_ms(99.0))
        .num("max_ms", samples.max_ms());
    tally.json_fields(&mut object);
    Ok(object.finish())
}

/// One request on the task's keep-alive connection, (re)connecting as
/// needed; a connection the server closed between requests is retried once
/// on a fresh one.
async fn keep_alive_exchange(
    target: &Target,
    connection: &mut Option<tokio::net::TcpStream>,
    request: &[u8],
    timeout: Duration,
    read_buf: &mut [u8],
) -> Result<http::Outcome, Failure> {
    for _attempt in 0..2 {
        let reused = connection.is_some();
        let mut stream = match connection.take() {
            Some(stream) => stream,
            None => http::connect(target.addr, timeout).await?,
        };
        match http::fetch_keep_alive(&mut stream, request, timeout, read_buf).await {
            Ok((outcome, reusable)) => {
                if reusable {
                    *connection = Some(stream);
                }
                return Ok(outcome);
            }
            Err(Failure::Closed) if reused => continue,
            Err(failure) => return Err(failure),
        }
    }
    Err(Failure::Closed)
}

// --------------------------------------------------------------------- sse

/// Per-stream state, shared between its task and the phase logic.
struct Slot {
    state: AtomicU8,
    events: AtomicU32,
}

impl ramp::Stream for Slot {
    fn state(&self) -> &AtomicU8 {
        &self.state
    }
}

/// Counts `marker` in a byte stream that arrives in pieces (`carry` keeps
/// the tail that could be the start of a marker cut in two).
fn count_markers(carry: &mut Vec<u8>, data: &[u8], marker: &[u8]) -> u32 {
    carry.extend_from_slice(data);
    let mut count = 0;
    let mut i = 0;
    while i + marker.len() <= carry.len() {
        if &carry[i..i + marker.len()] == marker {
            count += 1;
            i += marker.len();
        } else {
            i += 1;
        }
    }
    let keep_from = i.max(carry.len().saturating_sub(marker.len() - 1));
    carry.drain(..keep_from);
    count
}

/// One stream: connect, request, check the head, then count events until
/// the peer ends the stream, the deadline passes or the task is dropped
/// (cancellation: dropping the future closes the socket).
async fn run_stream(
    target: Arc<Target>,
    request: Arc<Vec<u8>>,
    slot: Arc<Slot>,
    mut permit: Option<OwnedSemaphorePermit>,
    deadline: tokio::time::Instant,
    marker: Arc<Vec<u8>>,
) -> Result<(), Failure> {
    let step = Duration::from_secs(30);
    let mut stream = http::connect(target.addr, step).await?;
    tokio::time::timeout(step, stream.write_all(&request))
        .await
        .map_err(|_| Failure::Timeout)?
        .map_err(|_| Failure::Io)?;
    let mut buf = Vec::new();
    let head = tokio::time::timeout(Duration::from_secs(60), http::read_head(&mut stream, &mut buf))
        .await
        .map_err(|_| Failure::Timeout)??;
    if head.status != 200 {
        return Err(Failure::BadResponse);
    }
    let mut carry = Vec::new();
    let note = |n: u32, permit: &mut Option<OwnedSemaphorePermit>| {
        if n > 0 {
            slot.events.fetch_add(n, Ordering::Relaxed);
            if permit.take().is_some() {
                slot.state.store(OPEN, Ordering::SeqCst);
            }
        }
    };
    note(count_markers(&mut carry, &buf, &marker), &mut permit);
    let mut chunk = [0u8; 2048];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return Err(Failure::Timeout),
            Ok(Ok(0)) => return Err(Failure::Closed),
            Ok(Err(_)) => return Err(Failure::Io),
            Ok(Ok(n)) => note(count_markers(&mut carry, &chunk[..n], &marker), &mut permit),
        }
    }
}

async fn origin_stat(stats: &Target, key: &str) -> Option<i64> {
    let mut read_buf = [0u8; 4096];
    let outcome = http::fetch_close(
        stats,
        &stats.request(false),
        Duration::from_secs(5),
        &mut read_buf,
        4096,
    )
    .await
    .ok()?;
    let body = String::from_utf8_lossy(&outcome.body);
    let needle = format!("\"{key}\":");
    let start = body.find(&needle)? + needle.len();
    let digits: String = body[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '-')
        .collect();
    digits.parse().ok()
}

/// Many concurrent event streams held open: the SSE scenario.
pub async fn sse(args: &Args) -> Result<String, String> {
    let target = Arc::new(Target::parse(args.required("--url")?)?);
    let streams: usize = args.number("--streams", 1000usize)?;
    let window: usize = args.number("--window", 256usize)?.max(1);
    let hold = Duration::from_secs_f64(args.number("--hold-secs", 8.0f64)?);
    let ramp_timeout = Duration::from_secs(args.number("--ramp-timeout-secs", 180u64)?);
    let marker = Arc::new(args.string("--marker").unwrap_or("data: ").as_bytes().to_vec());
    let origin_stats = match args.string("--origin-stats") {
        Some(url) => Some(Target::parse(url)?),
        None => None,
    };
    let mut pids = Vec::new();
    for pid in args.all("--watch-pid") {
        pids.push(pid.parse::<u32>().map_err(|_| format!("bad pid {pid}"))?);
    }
    let fd_limit = crate::raise_fd_limit();
    if streams as u64 + 64 > fd_limit {
        return Err(format!(
            "{streams} streams need more descriptors than this process may open ({fd_limit}); \
             run several drivers with fewer streams each"
        ));
    }

    let rss_baseline = sum_over(&pids, rss_kb);
    let fds_baseline = sum_over(&pids, fd_count);
    let request = Arc::new(target.request(false));
    let slots: Vec<Arc<Slot>> = (0..streams)
        .map(|_| {
            Arc::new(Slot {
                state: AtomicU8::new(CONNECTING),
                events: AtomicU32::new(0),
            })
        })
        .collect();
    let failures: Arc<Mutex<Tally>> = Arc::new(Mutex::new(Tally::default()));
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let ramp_deadline = tokio::time::Instant::now() + ramp_timeout;
    // Streams end by themselves at the latest here; normally we close them.
    let stream_deadline = ramp_deadline + hold + Duration::from_secs(60);
    let ramp = ramp::ramp(
        "sse",
        &slots,
        window,
        ramp_deadline,
        &cancel_rx,
        &failures,
        |slot, permit| {
            run_stream(
                Arc::clone(&target),
                Arc::clone(&request),
                slot,
                Some(permit),
                stream_deadline,
                Arc::clone(&marker),
            )
        },
    )
    .await;
    let (mut set, started, ramp_secs) = (ramp.tasks, ramp.started, ramp.secs);
    let opened = count_state(&slots, OPEN) + count_state(&slots, ENDED);
    eprintln!("sse: ramp done in {ramp_secs:.1}s, {opened} open; holding {hold:?}");

    // Plateau: every stream must see at least one more event while held.
    let events_before: Vec<u32> = slots.iter().map(|s| s.events.load(Ordering::SeqCst)).collect();
    let mut rss_max = rss_baseline;
    let hold_end = Instant::now() + hold;
    while Instant::now() < hold_end {
        tokio::time::sleep(Duration::from_millis(500).min(hold_end - Instant::now())).await;
        rss_max = rss_max.max(sum_over(&pids, rss_kb));
    }
    let rss_plateau = sum_over(&pids, rss_kb);
    let fds_plateau = sum_over(&pids, fd_count);
    let healthy = slots
        .iter()
        .zip(&events_before)
        .filter(|(slot, &before)| {
            slot.state.load(Ordering::SeqCst) == OPEN && slot.events.load(Ordering::SeqCst) > before
        })
        .count() as u64;
    let still_open = count_state(&slots, OPEN);
    let origin_open_plateau = match &origin_stats {
        Some(stats) => origin_stat(stats, "open_sse").await,
        None => None,
    };

    // Clients leave, all at once.
    let close_started = Instant::now();
    let _ = cancel_tx.send(true);
    let close_deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Ok(Some(_)) = tokio::time::timeout_at(close_deadline, set.join_next()).await {}
    set.abort_all();
    let closed_at = Instant::now();

    // How long does the origin keep streams open after that?
    let mut open_after_2s = None;
    let mut connections_after_2s = None;
    let mut zero_after = None;
    if let Some(stats) = &origin_stats {
        let poll_end = closed_at + Duration::from_secs(10);
        while Instant::now() < poll_end {
            let elapsed = closed_at.elapsed();
            let open = origin_stat(stats, "open_sse").await;
            if zero_after.is_none() && open == Some(0) {
                zero_after = Some(elapsed.as_secs_f64());
            }
            if open_after_2s.is_none() && elapsed >= Duration::from_secs(2) {
                open_after_2s = open;
                connections_after_2s = origin_stat(stats, "open_connections").await;
            }
            if zero_after.is_some() && open_after_2s.is_some() {
                break;
            }
            let next = if elapsed < Duration::from_secs(2) {
                (Duration::from_secs(2) - elapsed).min(Duration::from_millis(100))
            } else {
                Duration::from_millis(100)
            };
            tokio::time::sleep(next).await;
        }
    }

    // What stays after the streams are gone: heap growth (Ruby's GC heap,
    // malloc arenas) rather than memory held per stream.
    let rss_after_close = sum_over(&pids, rss_kb);
    let per_stream = match (rss_baseline, rss_plateau) {
        (Some(before), Some(after)) if healthy > 0 => Some((after as f64 - before as f64) / healthy as f64),
        _ => None,
    };
    let tally = std::mem::take(&mut *failures.lock().unwrap_or_else(|e| e.into_inner()));
    let mut object = JsonObject::new();
    object
        .int("streams", streams as u64)
        .int("started", started as u64)
        .int("opened", opened)
        .int("failed_before_open", count_state(&slots, FAILED))
        .int("ended_early", count_state(&slots, ENDED))
        .int("open_at_end_of_hold", still_open)
        .int("healthy", healthy)
        .num("ramp_secs", Some(ramp_secs))
        .num("hold_secs", Some(hold.as_secs_f64()))
        .num("rss_baseline_kb", rss_baseline.map(|v| v as f64))
        .num("rss_plateau_kb", rss_plateau.map(|v| v as f64))
        .num("rss_max_kb", rss_max.map(|v| v as f64))
        .num("rss_per_stream_kb", per_stream)
        .num("rss_after_close_kb", rss_after_close.map(|v| v as f64))
        .num("fds_baseline", fds_baseline.map(|v| v as f64))
        .num("fds_plateau", fds_plateau.map(|v| v as f64))
        .num("origin_open_sse_plateau", origin_open_plateau.map(|v| v as f64))
        .num("origin_open_sse_after_2s", open_after_2s.map(|v| v as f64))
        .num(
            "origin_open_connections_after_2s",
            connections_after_2s.map(|v| v as f64),
        )
        .num("origin_zero_after_secs", zero_after)
        .num("client_close_ms", Some(ms(closed_at - close_started)));
    object.raw("failures", &{
        let mut failures = JsonObject::new();
        for (name, n) in &tally.failures {
            failures.int(name, *n);
        }
        failures.finish()
    });
    object.signed("pids_watched", pids.len() as i64);
    Ok(object.finish())
}

#[cfg(test)]
mod tests {
    use super::count_markers;

    #[test]
    fn counts_markers_across_pieces() {
        let mut carry = Vec::new();
        let marker = b"data: ";
        assert_eq!(count_markers(&mut carry, b"e\r\ndat", marker), 0);
        assert_eq!(count_markers(&mut carry, b"a: open\n\n\r\n", marker), 1);
        assert_eq!(count_markers(&mut carry, b"data: 1\n\ndata: 2", marker), 2);
        assert!(carry.len() < marker.len());
    }
}
