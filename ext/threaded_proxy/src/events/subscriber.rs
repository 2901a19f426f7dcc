//! One stream's queue: what `publish` queued and its task has not written
//! yet, bounded in bytes. Shared by the hub (which pushes) and the stream's
//! task (which pops and waits on `wake`).

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::Notify;

/// What the queue holds, under its lock.
#[derive(Default)]
struct Queue {
    /// Events waiting to be written, oldest first (each a shared buffer).
    events: VecDeque<Bytes>,
    /// Their total size, checked against the bound on every push.
    bytes: usize,
    /// Passed its bound: the stream must end; nothing is queued any more.
    cut: bool,
    /// The stream ended: publishes skip it until it leaves the hub.
    closed: bool,
}

/// One stream as the hub sees it.
pub struct Subscriber {
    /// Finds this subscriber in the channel lists when it leaves.
    id: u64,
    /// `event_queue_bytes`: past it the subscriber is cut, so a client that
    /// does not read can neither grow memory nor slow the publisher.
    limit: usize,
    /// The queue (a short lock per push and per pop; no I/O under it).
    queue: Mutex<Queue>,
    /// Wakes the stream's task: an event was queued, or it was cut.
    /// `notify_one` keeps a permit when the task is not waiting yet, so a
    /// push between its last pop and its wait is not missed.
    wake: Notify,
}

/// The outcome of offering an event to a subscriber.
pub enum Offer {
    Queued,
    /// Over the bound: cut now, with this many events dropped (the queued
    /// ones and this one).
    Cut(u64),
    /// Already cut or ended.
    Closed,
}

/// The next thing for the stream's task to do.
pub enum Pop {
    Event(Bytes),
    Empty,
    Cut,
}

impl Subscriber {
    pub fn new(id: u64, limit: usize) -> Subscriber {
        Subscriber {
            id,
            limit,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn offer(&self, event: &Bytes) -> Offer {
        let mut queue = self.lock();
        if queue.cut || queue.closed {
            return Offer::Closed;
        }
        if queue.bytes + event.len() > self.limit {
            let dropped = queue.events.len() as u64 + 1;
            queue.events = VecDeque::new();
            queue.bytes = 0;
            queue.cut = true;
            drop(queue);
            self.wake.notify_one();
            return Offer::Cut(dropped);
        }
        queue.bytes += event.len();
        queue.events.push_back(event.clone());
        drop(queue);
        self.wake.notify_one();
        Offer::Queued
    }

    pub fn pop(&self) -> Pop {
        let mut queue = self.lock();
        if queue.cut {
            return Pop::Cut;
        }
        match queue.events.pop_front() {
            Some(event) => {
                queue.bytes -= event.len();
                if queue.events.is_empty() && queue.events.capacity() > 8 {
                    // Give a burst's memory back: an idle stream holds none.
                    queue.events = VecDeque::new();
                }
                Pop::Event(event)
            }
            None => Pop::Empty,
        }
    }

    pub fn is_cut(&self) -> bool {
        self.lock().cut
    }

    /// Waits for the next push or cut.
    pub async fn woken(&self) {
        self.wake.notified().await
    }

    /// Marks the stream ended; the number of events still queued (dropped).
    pub fn close(&self) -> u64 {
        let mut queue = self.lock();
        queue.closed = true;
        let left = queue.events.len() as u64;
        queue.events = VecDeque::new();
        queue.bytes = 0;
        left
    }
}
