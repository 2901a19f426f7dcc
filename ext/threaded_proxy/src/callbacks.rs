//! The bridge between tokio tasks and the gem-owned Ruby callback threads.
//!
//! Tokio tasks never touch the Ruby VM: they push a [`CallbackJob`] (plain
//! data) on a [`BlockingQueue`] and await a oneshot reply under a timeout.
//! Ruby dispatcher threads pop jobs with the GVL released (see
//! `ruby/nogvl.rs`), run the user's proc and send the reply. Nothing here
//! depends on magnus, so `cargo test` can play the Ruby side with a thread.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::errors::{ErrorReport, ProxyError};
use crate::headers::HeaderList;

/// A queue a Ruby thread can wait on with the GVL released and still be
/// interrupted (Thread#raise, process exit) through its own flag.
pub struct BlockingQueue<T> {
    /// The items and the closed flag, under one lock so a waiter cannot
    /// miss a push or a close between its check and its wait.
    state: Mutex<QueueState<T>>,
    /// Signalled on push (one waiter), close and interrupt (all waiters).
    ready: Condvar,
}

struct QueueState<T> {
    /// Waiting items, oldest first (jobs run in the order exchanges asked).
    items: VecDeque<T>,
    /// Set by `close`: pushes are refused and waiters return None.
    closed: bool,
}

impl<T> Default for BlockingQueue<T> {
    fn default() -> Self {
        BlockingQueue {
            state: Mutex::new(QueueState {
                items: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
        }
    }
}

impl<T> BlockingQueue<T> {
    /// Adds an item; gives it back when the queue is closed. Never blocks
    /// beyond the brief lock, so tokio threads may call it.
    pub fn push(&self, item: T) -> Result<(), T> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.closed {
            return Err(item);
        }
        state.items.push_back(item);
        drop(state);
        self.ready.notify_one();
        Ok(())
    }

    /// Refuses further pushes and wakes every waiter.
    pub fn close(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.ready.notify_all();
    }

    /// Waits for an item. `None` when the queue is closed and empty, when
    /// `interrupted` was set (see [`BlockingQueue::interrupt`]), or when the
    /// deadline passed.
    pub fn pop_wait(&self, interrupted: &AtomicBool, deadline: Option<Instant>) -> Option<T> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(item) = state.items.pop_front() {
                return Some(item);
            }
            if state.closed || interrupted.load(Ordering::Acquire) {
                return None;
            }
            state = match deadline {
                None => self.ready.wait(state).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return None;
                    }
                    self.ready
                        .wait_timeout(state, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// Wakes the waiter that owns `flag`. Safe to call from any thread, any
    /// number of times (Ruby may call an unblocking function repeatedly).
    pub fn interrupt(&self, flag: &AtomicBool) {
        flag.store(true, Ordering::Release);
        let _state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.ready.notify_all();
    }

    pub fn len(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The status line and end-to-end headers a callback may inspect and change.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub status: u16,
    /// The origin's reason phrase; None writes the standard one.
    pub reason: Option<String>,
    /// End-to-end headers only, as ordered pairs (repeats kept).
    pub headers: HeaderList,
}

/// How an exchange ended, for `on_complete`, instrumentation and logs.
/// The default is an exchange that moved no byte and reports no error,
/// with no method or URL: `exchange::empty_summary` starts from it, and
/// the tests take it for a placeholder.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub method: String,
    pub url: String,
    pub status: Option<u16>,
    /// The head the client got (when one went out).
    pub head: Option<ResponseHead>,
    pub bytes_from_origin: u64,
    pub bytes_to_client: u64,
    /// Bytes the client sent through a tunnel (0 for plain exchanges).
    pub bytes_from_client: u64,
    pub time_to_first_byte: Option<Duration>,
    pub total_time: Duration,
    pub error: Option<ErrorReport>,
}

pub enum CallbackEvent {
    /// `on_headers`: reply Continue with the (changed) head.
    Headers(ResponseHead),
    /// `on_response`: reply Continue, or Render; may read the body first.
    Response(ResponseHead),
    /// `on_error` before anything was sent: reply Render, or Continue for
    /// the default answer.
    Error(ErrorReport),
    /// The exchange is over; no reply. Ruby runs `on_complete`, publishes
    /// the instrumentation event and forgets the exchange's procs.
    Finished(Summary),
}

/// Each event's kind (the Symbol `Job#kind` gives Ruby) and the user's
/// callback it runs, in [`CallbackEvent`] order: the one list of them,
/// which Ruby reads as `Native::Job::CALLBACKS`.
pub const KINDS: [(&str, &str); 4] = [
    ("headers", "on_headers"),
    ("response", "on_response"),
    ("error", "on_error"),
    ("finished", "on_complete"),
];

impl CallbackEvent {
    fn index(&self) -> usize {
        match self {
            CallbackEvent::Headers(_) => 0,
            CallbackEvent::Response(_) => 1,
            CallbackEvent::Error(_) => 2,
            CallbackEvent::Finished(_) => 3,
        }
    }

    /// The kind, as `Job#kind` names it.
    pub fn name(&self) -> &'static str {
        KINDS[self.index()].0
    }

    /// The user's callback this event runs, to name it in error messages.
    pub fn callback(&self) -> &'static str {
        KINDS[self.index()].1
    }
}

/// A body a callback renders instead of the origin's.
pub enum RenderedBody {
    Bytes(Bytes),
    /// A file (or Tempfile) streamed from its current offset to its end.
    File(std::fs::File),
}

pub struct Rendered {
    pub status: u16,
    pub headers: HeaderList,
    pub body: RenderedBody,
}

/// A callback's answer. Ruby's `Job` sends it through named replies:
/// `pass` ([`CallbackReply::pass`]), `amend` (Continue with a changed
/// head), `render` / `render_file` (Render) and `fail` (Failed).
pub enum CallbackReply {
    /// Go on with this head (on_headers, on_response); for an error event
    /// the head is ignored and the default error answer goes out.
    Continue(ResponseHead),
    Render(Rendered),
    /// The callback raised: answer 500 (when nothing was sent yet).
    Failed {
        message: String,
    },
}

impl CallbackReply {
    /// "Leave the answer as it is": the event's own head unchanged, or for
    /// an error event (which has no head) the default error answer.
    pub fn pass(head: Option<ResponseHead>) -> CallbackReply {
        CallbackReply::Continue(head.unwrap_or(ResponseHead {
            status: 0,
            reason: None,
            headers: Vec::new(),
        }))
    }
}

/// Where Ruby's `response.body` gets the buffered origin body from.
pub type BodyResult = Result<Bytes, ErrorReport>;
pub type BodyRequest = Arc<BlockingQueue<BodyResult>>;

pub struct CallbackJob {
    /// The dispatcher's id for the exchange: where Ruby keeps its procs.
    pub exchange_id: u64,
    pub event: CallbackEvent,
    /// Where the answer goes; None for events that want none (Finished).
    /// Closed when the exchange stopped waiting (the job is stale).
    pub reply: Option<oneshot::Sender<CallbackReply>>,
    /// Present on `Response` jobs: send a slot, the exchange fills it with
    /// the whole body (up to `max_buffered_body`).
    pub body_access: Option<mpsc::UnboundedSender<BodyRequest>>,
}

impl CallbackJob {
    /// True when the exchange no longer waits for this job's reply (it
    /// timed out or ended while the job was queued): running the user's
    /// callback now would only occupy a callback thread for nothing.
    pub fn is_stale(&self) -> bool {
        self.reply.as_ref().is_some_and(|tx| tx.is_closed())
    }

    /// Sends the reply, if the job wants one and the exchange still waits.
    pub fn reply(&mut self, reply: CallbackReply) -> bool {
        match self.reply.take() {
            Some(tx) => tx.send(reply).is_ok(),
            None => false,
        }
    }
}

/// The per-process dispatcher queue plus the wait limit for replies.
pub struct CallbackBridge {
    /// Jobs from every exchange of the process, in order, for whichever
    /// Ruby callback thread waits first (`Native.next_job`); closed at
    /// shutdown so those threads stop waiting.
    pub queue: BlockingQueue<CallbackJob>,
    /// A callback that has not answered by then is treated as failed, so a
    /// dead or stuck dispatcher cannot hang an exchange.
    pub reply_timeout: Duration,
}

impl CallbackBridge {
    pub fn new(reply_timeout: Duration) -> Self {
        CallbackBridge {
            queue: BlockingQueue::default(),
            reply_timeout,
        }
    }

    /// Queues a job that needs no reply.
    pub fn notify(&self, exchange_id: u64, event: CallbackEvent) {
        let _ = self.queue.push(CallbackJob {
            exchange_id,
            event,
            reply: None,
            body_access: None,
        });
    }

    /// Queues a job and returns the receiver of its reply.
    pub fn request(
        &self,
        exchange_id: u64,
        event: CallbackEvent,
        body_access: Option<mpsc::UnboundedSender<BodyRequest>>,
        url: &str,
    ) -> Result<oneshot::Receiver<CallbackReply>, ProxyError> {
        let (tx, rx) = oneshot::channel();
        self.queue
            .push(CallbackJob {
                exchange_id,
                event,
                reply: Some(tx),
                body_access,
            })
            .map_err(|_| ProxyError::Callback {
                url: url.to_owned(),
                message: "callback threads are shut down".to_owned(),
            })?;
        Ok(rx)
    }

    /// Awaits a reply under the timeout; a dropped or late reply is an error
    /// that names the `callback` (on_error and the log show it).
    pub async fn await_reply(
        &self,
        rx: oneshot::Receiver<CallbackReply>,
        url: &str,
        callback: &str,
    ) -> Result<CallbackReply, ProxyError> {
        match tokio::time::timeout(self.reply_timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(ProxyError::Callback {
                url: url.to_owned(),
                message: format!("{callback} finished without answering"),
            }),
            Err(_) => Err(ProxyError::Callback {
                url: url.to_owned(),
                message: format!("{callback} did not answer within {:?}", self.reply_timeout),
            }),
        }
    }

    pub async fn call(
        &self,
        exchange_id: u64,
        event: CallbackEvent,
        url: &str,
    ) -> Result<CallbackReply, ProxyError> {
        let callback = event.callback();
        let rx = self.request(exchange_id, event, None, url)?;
        self.await_reply(rx, url, callback).await
    }
}

#[cfg(test)]
mod tests;
