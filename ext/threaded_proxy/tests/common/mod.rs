//! What the black-box tests share: a plain GET exchange to vary with
//! struct-update syntax, and a thread playing the Ruby dispatcher.
//!
//! Cargo's convention for integration tests: each test binary includes this
//! module (`mod common;`), which is no test binary of its own. The unit
//! tests in src/ keep their own few helpers in their `#[cfg(test)]`
//! modules; one module for both would have to be public in the library.

use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use threaded_proxy::callbacks::{CallbackEvent, CallbackReply, Summary};
use threaded_proxy::exchange::{CallbackSet, ExchangeSpec, Timeouts};
use threaded_proxy::headers::ClientRequest;
use threaded_proxy::origin::{BodySource, TlsSettings};
use threaded_proxy::origin_url::{self, Kind};

/// A GET of `url` for an HTTP/1.1 client: no headers, no callbacks,
/// 2 s to connect, 5 s for the head and between reads.
pub fn get(id: u64, url: &str) -> ExchangeSpec {
    ExchangeSpec {
        id,
        method: http::Method::GET,
        target: origin_url::check(url, Kind::Http).expect("a valid test URL"),
        headers: vec![],
        body: BodySource::Empty,
        client: ClientRequest {
            head_only: false,
            http10: false,
        },
        callbacks: CallbackSet::default(),
        timeouts: Timeouts {
            connect: Duration::from_secs(2),
            header: Duration::from_secs(5),
            idle: Duration::from_secs(5),
        },
        tls: TlsSettings::default(),
        max_buffered_body: 1 << 20,
        upgrade: None,
        tunnel: None,
    }
}

/// Plays the Ruby dispatcher on a thread of its own: takes the jobs of the
/// process's callback queue, gives each event that waits for an answer
/// to `answer` (its reply goes back to the exchange; None drops the job
/// unanswered) and hands each `Finished` summary to the receiver returned.
/// With `only`, it takes one exchange's jobs (dropping the others) and
/// ends after that exchange's `Finished`, its last job.
// Not every test binary that includes this module calls it.
#[allow(dead_code)]
pub fn dispatcher<F>(only: Option<u64>, mut answer: F) -> mpsc::Receiver<Summary>
where
    F: FnMut(CallbackEvent) -> Option<CallbackReply> + Send + 'static,
{
    let (summaries_tx, summaries) = mpsc::channel();
    thread::spawn(move || {
        let queue = &threaded_proxy::runtime::current().unwrap().callbacks.queue;
        while let Some(mut job) = queue.pop_wait(&AtomicBool::new(false), None) {
            if only.is_some_and(|id| job.exchange_id != id) {
                continue;
            }
            let placeholder = CallbackEvent::Finished(Summary::default());
            match std::mem::replace(&mut job.event, placeholder) {
                CallbackEvent::Finished(summary) => {
                    if summaries_tx.send(summary).is_err() || only.is_some() {
                        return;
                    }
                }
                event => {
                    if let Some(reply) = answer(event) {
                        job.reply(reply);
                    }
                }
            }
        }
    });
    summaries
}
