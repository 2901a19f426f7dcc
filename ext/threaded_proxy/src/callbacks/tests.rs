//! Tests of the callback bridge: the queue, replies across threads, timeouts.

use super::*;
use std::thread;

// What these tests share stays here, in this `#[cfg(test)]` module: the
// black-box tests in tests/ share theirs through tests/common (cargo's
// convention), and one module for both would have to be public in the
// library (doc-hidden, or behind a feature) for a few lines of helpers.

/// A head with `status`, no reason and no headers.
fn head(status: u16) -> ResponseHead {
    ResponseHead {
        status,
        reason: None,
        headers: vec![],
    }
}

/// An internal error's report, where any error event will do.
fn internal_error() -> ErrorReport {
    ErrorReport::from(&ProxyError::Internal {
        message: String::new(),
    })
}

/// The next job, waited for as a dispatcher thread waits (never
/// interrupted, no deadline).
fn next_job(queue: &BlockingQueue<CallbackJob>) -> Option<CallbackJob> {
    queue.pop_wait(&AtomicBool::new(false), None)
}

#[test]
fn every_event_has_its_own_kind_and_callback() {
    let summary = Summary {
        method: "GET".into(),
        url: "http://x".into(),
        ..Summary::default()
    };
    let events = [
        CallbackEvent::Headers(head(200)),
        CallbackEvent::Response(head(200)),
        CallbackEvent::Error(internal_error()),
        CallbackEvent::Finished(summary),
    ];
    let named: Vec<_> = events.iter().map(|e| (e.name(), e.callback())).collect();
    assert_eq!(named, KINDS.to_vec());
    assert_eq!(
        KINDS.map(|(kind, _)| kind),
        ["headers", "response", "error", "finished"]
    );
}

#[test]
fn pass_keeps_the_head_or_asks_for_the_default_answer() {
    let head = ResponseHead {
        status: 201,
        reason: Some("Made".into()),
        headers: vec![("x-a".into(), Bytes::from_static(b"1"))],
    };
    let CallbackReply::Continue(kept) = CallbackReply::pass(Some(head)) else {
        panic!("pass is a Continue")
    };
    assert_eq!(
        (kept.status, kept.reason.as_deref(), kept.headers.len()),
        (201, Some("Made"), 1)
    );
    assert!(matches!(CallbackReply::pass(None), CallbackReply::Continue(_)));
}

#[test]
fn pop_wait_returns_items_in_order() {
    let q = BlockingQueue::default();
    q.push(1).unwrap();
    q.push(2).unwrap();
    let flag = AtomicBool::new(false);
    assert_eq!(q.pop_wait(&flag, None), Some(1));
    assert_eq!(q.pop_wait(&flag, None), Some(2));
}

#[test]
fn interrupt_wakes_a_blocked_waiter() {
    let q = Arc::new(BlockingQueue::<u8>::default());
    let flag = Arc::new(AtomicBool::new(false));
    let (q2, f2) = (q.clone(), flag.clone());
    let waiter = thread::spawn(move || q2.pop_wait(&f2, None));
    // The waiter may or may not be parked yet; interrupt works either way.
    q.interrupt(&flag);
    assert_eq!(waiter.join().unwrap(), None);
}

#[test]
fn close_refuses_pushes_and_wakes_waiters() {
    let q = Arc::new(BlockingQueue::<u8>::default());
    let q2 = q.clone();
    let waiter = thread::spawn(move || q2.pop_wait(&AtomicBool::new(false), None));
    q.close();
    assert_eq!(waiter.join().unwrap(), None);
    assert_eq!(q.push(7), Err(7));
}

#[test]
fn deadline_bounds_the_wait() {
    let q = BlockingQueue::<u8>::default();
    let deadline = Instant::now() + Duration::from_millis(20);
    assert_eq!(q.pop_wait(&AtomicBool::new(false), Some(deadline)), None);
    assert!(Instant::now() >= deadline);
}

#[tokio::test]
async fn a_reply_from_another_thread_reaches_the_task() {
    let bridge = Arc::new(CallbackBridge::new(Duration::from_secs(5)));
    let worker_bridge = bridge.clone();
    let worker = thread::spawn(move || {
        let mut job = next_job(&worker_bridge.queue).unwrap();
        let CallbackEvent::Headers(mut head) =
            std::mem::replace(&mut job.event, CallbackEvent::Error(internal_error()))
        else {
            panic!("expected a headers job")
        };
        head.headers.push(("x-added".into(), Bytes::from_static(b"1")));
        job.reply(CallbackReply::Continue(head));
    });
    let reply = bridge
        .call(7, CallbackEvent::Headers(head(200)), "http://x")
        .await
        .unwrap();
    worker.join().unwrap();
    match reply {
        CallbackReply::Continue(head) => assert_eq!(head.headers.len(), 1),
        _ => panic!("expected Continue"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_silent_dispatcher_times_out_instead_of_hanging() {
    let bridge = CallbackBridge::new(Duration::from_secs(30));
    let err = bridge
        .call(1, CallbackEvent::Headers(head(200)), "http://x")
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("did not answer"), "{err}");
}

#[test]
fn a_job_whose_exchange_stopped_waiting_is_stale() {
    let bridge = CallbackBridge::new(Duration::from_secs(30));
    let rx = bridge
        .request(1, CallbackEvent::Headers(head(200)), None, "http://x")
        .unwrap();
    let _kept = bridge
        .request(2, CallbackEvent::Headers(head(200)), None, "http://x")
        .unwrap();
    bridge.notify(3, CallbackEvent::Error(internal_error()));
    drop(rx);
    let stale = next_job(&bridge.queue).unwrap();
    let live = next_job(&bridge.queue).unwrap();
    let notice = next_job(&bridge.queue).unwrap();
    assert!(stale.is_stale());
    assert!(!live.is_stale());
    assert!(!notice.is_stale(), "a job without a reply is never stale");
}

#[tokio::test]
async fn a_dropped_job_is_a_failure_not_a_hang() {
    let bridge = CallbackBridge::new(Duration::from_secs(30));
    let rx = bridge
        .request(1, CallbackEvent::Headers(head(200)), None, "http://x")
        .unwrap();
    drop(next_job(&bridge.queue));
    let err = bridge
        .await_reply(rx, "http://x", "on_headers")
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("on_headers finished without answering"),
        "{err}"
    );
}
