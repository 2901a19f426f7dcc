//! The delivery worker: a claim loop on the tokio runtime that starts one
//! task per claimed row, within the concurrency cap and the rate, and the
//! outcome rules of one attempt. Store calls go through `spawn_blocking`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::sync::Semaphore;

use super::store::{ms, now_ms, Claimed, ClaimedBody, DeliveryStore, StoreResult, BODY_CHUNK};
use super::{random_unit, Delivery, DeliverySettings};
use crate::origin::{self, BodySource, TlsSettings};
use crate::origin_url::{self, Kind, Target};
use crate::runtime;

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Worth another attempt (a status in `retry`, connection failure,
    /// timeout).
    Retry {
        error: String,
        retry_after: Option<Duration>,
    },
    /// Never worth another attempt (another status).
    Dead {
        error: String,
    },
}

/// What the origin answered, or why it did not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Status {
        status: u16,
        retry_after: Option<Duration>,
    },
    Failed(String),
}

pub fn outcome(settings: &DeliverySettings, answer: Answer) -> Outcome {
    match answer {
        Answer::Status { status, .. } if settings.is_success(status) => Outcome::Delivered,
        Answer::Status { status, retry_after } if settings.is_retried(status) => Outcome::Retry {
            error: format!("HTTP {status}"),
            retry_after,
        },
        Answer::Status { status, .. } => Outcome::Dead {
            error: format!("HTTP {status}"),
        },
        Answer::Failed(error) => Outcome::Retry {
            error,
            retry_after: None,
        },
    }
}

/// When a retryable failure after `attempts` attempts is tried again, or
/// None when the attempts are used up.
pub fn next_attempt_in(
    settings: &DeliverySettings,
    attempts: u32,
    retry_after: Option<Duration>,
    random: f64,
) -> Option<Duration> {
    if attempts >= settings.max_attempts {
        return None;
    }
    let backoff = settings.backoff_after(attempts, random);
    Some(match retry_after {
        Some(asked) => asked.min(settings.backoff_max).max(backoff),
        None => backoff,
    })
}

/// The queue-wide spacing of attempt starts, in ms (None: no rate).
fn rate_interval_ms(rate: f64) -> Option<i64> {
    (rate > 0.0 && rate.is_finite()).then(|| ((1000.0 / rate).round() as i64).max(1))
}

async fn blocking<T: Send + 'static>(
    store: &Arc<dyn DeliveryStore>,
    f: impl FnOnce(&dyn DeliveryStore) -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    let store = store.clone();
    match tokio::task::spawn_blocking(move || f(store.as_ref())).await {
        Ok(result) => result,
        Err(join) => Err(super::store::StoreError::Corrupt(format!(
            "store task failed: {join}"
        ))),
    }
}

/// Whether `pid` is a live process on this machine (a zombie is not).
pub fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let Ok(pid_t) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    let exists = unsafe { libc::kill(pid_t, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    if !exists {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next()),
            Some('Z') | Some('X')
        ),
        Err(_) => true,
    }
}

fn log_store_error(what: &str, err: &super::store::StoreError) {
    eprintln!("threaded-proxy: deferred delivery: {what}: {err}");
}

const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The claim loop; ends when the service stops claiming.
pub async fn run(delivery: &'static Delivery) {
    let settings = &delivery.settings;
    let permits = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    let interval = rate_interval_ms(settings.rate);
    let mut next_sweep = Instant::now();
    let lease = settings.timeout + settings.lease_margin;
    while delivery.claiming() {
        if Instant::now() >= next_sweep {
            next_sweep = Instant::now() + SWEEP_EVERY;
            if let Err(e) = blocking(&delivery.store, |s| s.recover(now_ms(), &process_alive)).await {
                log_store_error("recovering expired claims", &e);
            }
        }
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            _ = delivery.wake.notified() => continue,
        };
        let due = blocking(&delivery.store, |s| s.has_due(now_ms())).await;
        let claimed = match due {
            Ok(true) => claim_paced(delivery, interval, lease).await,
            Ok(false) => Ok(Vec::new()),
            Err(e) => Err(e),
        };
        let claimed = match claimed {
            Ok(claimed) => claimed,
            Err(e) => {
                log_store_error("claiming", &e);
                Vec::new()
            }
        };
        if claimed.is_empty() {
            drop(permit);
            // Sleep until the next retry is due or the poll interval passes
            // (rows enqueued by other processes), unless woken.
            let next_due = blocking(&delivery.store, |s| s.next_due()).await.ok().flatten();
            let mut wait = settings.poll_interval;
            if let Some(due) = next_due {
                wait = wait.min(Duration::from_millis(due.saturating_sub(now_ms()).max(0) as u64));
            }
            // At least a moment, so a failing store is not polled in a loop.
            let wait = wait
                .min(next_sweep.saturating_duration_since(Instant::now()))
                .max(Duration::from_millis(5));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = delivery.wake.notified() => {}
            }
            continue;
        }
        // A claim takes one row: the loop's permit moves to its attempt.
        if let Some(row) = claimed.into_iter().next() {
            let guard = delivery.in_flight.enter();
            tokio::spawn(async move {
                let _guard = guard;
                let _permit = permit;
                attempt(delivery, row).await;
            });
        }
    }
}

/// Takes a start slot of the queue-wide rate (when there is one), waits for
/// it, then claims one row; a slot that found no row (another process
/// took it, or shutdown) is given back.
async fn claim_paced(
    delivery: &'static Delivery,
    interval: Option<i64>,
    lease: Duration,
) -> StoreResult<Vec<Claimed>> {
    let slot = match interval {
        Some(interval) => {
            let slot = blocking(&delivery.store, move |s| s.take_rate_slot(interval, now_ms())).await?;
            let until = tokio::time::Instant::now()
                + Duration::from_millis(slot.saturating_sub(now_ms()).max(0) as u64);
            // Only shutdown cuts the wait short; an enqueue's wake does not.
            while delivery.claiming() {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    _ = delivery.wake.notified() => {}
                }
            }
            Some((slot, interval))
        }
        None => None,
    };
    let pid = delivery.pid;
    let claimed = if delivery.claiming() {
        blocking(&delivery.store, move |s| {
            let now = now_ms();
            s.claim(pid, 1, now, now + ms(lease))
        })
        .await?
    } else {
        Vec::new()
    };
    if let (true, Some((slot, interval))) = (claimed.is_empty(), slot) {
        blocking(&delivery.store, move |s| s.give_back_rate_slot(slot, interval)).await?;
    }
    Ok(claimed)
}

async fn attempt(delivery: &'static Delivery, row: Claimed) {
    let mut cancelled = delivery.cancelled();
    let id = row.id;
    let attempts = row.attempts;
    let answer = tokio::select! {
        answer = send(&delivery.settings, &delivery.store, row) => answer,
        _ = async { drop(cancelled.wait_for(|cut| *cut).await) } => {
            let pid = delivery.pid;
            match blocking(&delivery.store, move |s| s.release(pid, Some(&[id]))).await {
                Ok(rows) => delivery.note_released(rows),
                Err(e) => log_store_error("releasing a cut attempt", &e),
            }
            return;
        }
    };
    let settings = &delivery.settings;
    let pid = delivery.pid;
    let result = match outcome(settings, answer) {
        Outcome::Delivered => blocking(&delivery.store, move |s| s.complete(id, pid)).await,
        Outcome::Dead { error } => blocking(&delivery.store, move |s| s.kill(id, pid, &error)).await,
        Outcome::Retry { error, retry_after } => {
            match next_attempt_in(settings, attempts, retry_after, random_unit()) {
                Some(wait) => {
                    let at = now_ms() + ms(wait);
                    let result = blocking(&delivery.store, move |s| s.retry(id, pid, at, &error)).await;
                    delivery.wake();
                    result
                }
                None => {
                    let error = format!("{error} (after {attempts} attempts)");
                    blocking(&delivery.store, move |s| s.kill(id, pid, &error)).await
                }
            }
        }
    };
    if let Err(e) = result {
        log_store_error("recording an attempt", &e);
    }
}

/// Sends the request once, bounded by `settings.timeout` as a whole.
pub async fn send(settings: &DeliverySettings, store: &Arc<dyn DeliveryStore>, row: Claimed) -> Answer {
    let deadline = tokio::time::Instant::now() + settings.timeout;
    // The URL was checked and made canonical when it was queued; parsed
    // here by the same one parser into the target the request goes to.
    let target = match origin_url::check(&row.url, Kind::Http) {
        Ok(target) => target,
        Err(message) => return Answer::Failed(message),
    };
    let url = target.url();
    let request = match build_request(store, row, &target) {
        Ok(request) => request,
        Err(error) => return Answer::Failed(error),
    };
    let client = match runtime::current().and_then(|proxy| {
        proxy
            .upstream
            .hyper
            .client(&TlsSettings::default(), settings.connect_timeout, &url)
    }) {
        Ok(client) => client,
        Err(e) => return Answer::Failed(e.to_string()),
    };
    let response = match tokio::time::timeout_at(deadline, client.request(request)).await {
        Err(_) => return Answer::Failed(format!("timed out after {:?}", settings.timeout)),
        Ok(Err(e)) => return Answer::Failed(origin::error::classify(&e, &url).to_string()),
        Ok(Ok(response)) => response,
    };
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    // The status decides; the body is read (and dropped) so the connection
    // can go back to the pool, within what is left of the timeout.
    let mut body = response.into_body();
    let _ = tokio::time::timeout_at(deadline, async {
        while let Some(frame) = body.frame().await {
            if frame.is_err() {
                break;
            }
        }
    })
    .await;
    Answer::Status { status, retry_after }
}

fn build_request(
    store: &Arc<dyn DeliveryStore>,
    row: Claimed,
    target: &Target,
) -> Result<http::Request<origin::RequestBody>, String> {
    let method = http::Method::from_bytes(row.method.as_bytes()).map_err(|e| format!("bad method: {e}"))?;
    let mut builder = http::Request::builder().method(method).uri(target.uri().clone());
    for (name, value) in &row.headers {
        let name = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| format!("bad header name {name:?}: {e}"))?;
        let value =
            http::HeaderValue::from_bytes(value).map_err(|e| format!("bad header value for {name}: {e}"))?;
        builder = builder.header(name, value);
    }
    let body = match row.body {
        ClaimedBody::Inline(bytes) if bytes.is_empty() => BodySource::Empty,
        ClaimedBody::Inline(bytes) => BodySource::Bytes(Bytes::from(bytes)),
        // Read from the queue while it is sent: memory per attempt stays
        // at a few chunks whatever the body's size.
        ClaimedBody::Stored { length } => {
            let store = store.clone();
            let id = row.id;
            BodySource::Chunks {
                length,
                chunk: BODY_CHUNK,
                read: Box::new(move |offset, max| {
                    store
                        .read_body(id, offset, max)
                        .map_err(|e| std::io::Error::other(e.to_string()))
                }),
            }
        }
    };
    builder
        .body(body.into_body().map_err(|e| e.to_string())?)
        .map_err(|e| format!("bad request: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> DeliverySettings {
        DeliverySettings {
            max_attempts: 3,
            backoff: Duration::from_secs(2),
            backoff_max: Duration::from_secs(60),
            ..DeliverySettings::default()
        }
    }

    #[test]
    fn outcomes() {
        let s = settings();
        let status = |status| Answer::Status {
            status,
            retry_after: None,
        };
        assert_eq!(outcome(&s, status(200)), Outcome::Delivered);
        assert_eq!(outcome(&s, status(204)), Outcome::Delivered);
        assert!(matches!(outcome(&s, status(503)), Outcome::Retry { .. }));
        assert!(matches!(outcome(&s, status(429)), Outcome::Retry { .. }));
        assert_eq!(
            outcome(&s, status(400)),
            Outcome::Dead {
                error: "HTTP 400".into()
            }
        );
        assert!(matches!(outcome(&s, status(301)), Outcome::Dead { .. }));
        assert!(matches!(
            outcome(&s, Answer::Failed("refused".into())),
            Outcome::Retry { .. }
        ));
    }

    #[test]
    fn retries_stop_at_max_attempts_and_honour_retry_after() {
        let s = settings();
        assert_eq!(next_attempt_in(&s, 1, None, 1.0), Some(Duration::from_secs(2)));
        assert_eq!(next_attempt_in(&s, 2, None, 0.0), Some(Duration::from_secs(2)));
        assert_eq!(next_attempt_in(&s, 3, None, 0.0), None);
        assert_eq!(
            next_attempt_in(&s, 1, Some(Duration::from_secs(30)), 0.0),
            Some(Duration::from_secs(30))
        );
        // Retry-After is capped by backoff_max, never shortens the backoff.
        assert_eq!(
            next_attempt_in(&s, 1, Some(Duration::from_secs(999)), 0.0),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            next_attempt_in(&s, 2, Some(Duration::from_millis(1)), 1.0),
            Some(Duration::from_secs(4))
        );
    }

    #[test]
    fn rate_interval() {
        assert_eq!(rate_interval_ms(10.0), Some(100));
        assert_eq!(rate_interval_ms(3.0), Some(333));
        assert_eq!(rate_interval_ms(5000.0), Some(1));
        assert_eq!(rate_interval_ms(0.0), None);
        assert_eq!(rate_interval_ms(f64::INFINITY), None);
    }

    #[test]
    fn liveness() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(u32::MAX));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Exited but not reaped: a zombie counts as dead.
        while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z")) {
            std::thread::yield_now();
        }
        assert!(!process_alive(pid));
        child.wait().unwrap();
        assert!(!process_alive(pid));
    }
}
