//! Opening many long-lived streams, as the `sse` and `events` modes both
//! do: at most `window` of them between connect and open at a time, so the
//! server's accept queue never overflows, each stream's task racing the
//! driver's closing signal, a failure tallied by kind.

use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::http::Failure;
use crate::report::Tally;

/// A stream's state, in its [`Stream::state`].
pub const CONNECTING: u8 = 0;
/// Its response head arrived (the stream's task stores it).
pub const OPEN: u8 = 1;
/// It failed before it opened.
pub const FAILED: u8 = 2;
/// It failed (or the peer ended it) after it opened.
pub const ENDED: u8 = 3;

/// One stream as the ramp sees it.
pub trait Stream: Send + Sync + 'static {
    fn state(&self) -> &AtomicU8;
}

/// How many of `streams` are in `state` now.
pub fn count_state<S: Stream>(streams: &[Arc<S>], state: u8) -> u64 {
    streams
        .iter()
        .filter(|s| s.state().load(Ordering::SeqCst) == state)
        .count() as u64
}

/// What a ramp left running and how it went.
pub struct Ramp {
    /// The streams' tasks; dropping it (or the closing signal) ends them.
    pub tasks: JoinSet<()>,
    /// Streams started before the deadline (a prefix of the list).
    pub started: usize,
    /// From the first connect until none is connecting any more.
    pub secs: f64,
    /// The most streams seen open at once (some may end during the ramp).
    pub open_peak: u64,
}

/// Starts a task per stream in order, each running `open(stream, permit)`
/// (which releases the permit once the stream is open) until it fails or
/// `closing` turns true (dropping the work closes its socket), until all
/// are started or `deadline`; then waits, up to `deadline`, until none is
/// still connecting. A progress line on stderr every 2 s, named `label`.
pub async fn ramp<S, F, W>(
    label: &str,
    streams: &[Arc<S>],
    window: usize,
    deadline: tokio::time::Instant,
    closing: &watch::Receiver<bool>,
    failures: &Arc<Mutex<Tally>>,
    mut open: F,
) -> Ramp
where
    S: Stream,
    F: FnMut(Arc<S>, OwnedSemaphorePermit) -> W,
    W: Future<Output = Result<(), Failure>> + Send + 'static,
{
    let start = Instant::now();
    let window = Arc::new(Semaphore::new(window.max(1)));
    let mut tasks = JoinSet::new();
    let (mut started, mut open_peak) = (0usize, 0u64);
    let mut last_report = Instant::now();
    for stream in streams {
        let permit = match tokio::time::timeout_at(deadline, Arc::clone(&window).acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            _ => break,
        };
        started += 1;
        let work = open(Arc::clone(stream), permit);
        let (stream, failures, mut closing) = (Arc::clone(stream), Arc::clone(failures), closing.clone());
        tasks.spawn(async move {
            tokio::select! {
                result = work => {
                    if let Err(failure) = result {
                        let was_open = stream.state().load(Ordering::SeqCst) == OPEN;
                        stream.state().store(if was_open { ENDED } else { FAILED }, Ordering::SeqCst);
                        failures.lock().unwrap_or_else(|e| e.into_inner()).failure(failure);
                    }
                }
                _ = closing.wait_for(|closing| *closing) => {}
            }
        });
        if last_report.elapsed() > Duration::from_secs(2) {
            last_report = Instant::now();
            let open = count_state(streams, OPEN);
            open_peak = open_peak.max(open);
            eprintln!(
                "{label}: {started} started, {open} open, {} failed",
                count_state(streams, FAILED)
            );
        }
    }
    while count_state(&streams[..started], CONNECTING) > 0 && tokio::time::Instant::now() < deadline {
        open_peak = open_peak.max(count_state(streams, OPEN));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ramp {
        tasks,
        started,
        secs: start.elapsed().as_secs_f64(),
        open_peak: open_peak.max(count_state(streams, OPEN)),
    }
}
