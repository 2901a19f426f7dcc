//! [`SqliteStore`]'s tests: real files in a throw-away directory, several
//! connections (as sibling processes have) where locking is the point.

use std::fs::File;

use super::*;

fn store() -> (tempdir::Dir, SqliteStore) {
    let dir = tempdir::Dir::new();
    let store = SqliteStore::open(&dir.path.join("queue.sqlite3")).unwrap();
    (dir, store)
}

/// A throw-away directory removed on drop (no extra dev-dependency).
mod tempdir {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    pub struct Dir {
        pub path: PathBuf,
    }

    impl Dir {
        pub fn new() -> Dir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "threaded-proxy-store-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&path).unwrap();
            Dir { path }
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn new(url: &str, body: &[u8]) -> NewDelivery {
    NewDelivery {
        method: "POST".into(),
        url: url.into(),
        headers: vec![
            ("Content-Type".into(), b"text/plain".to_vec()),
            ("X-Empty".into(), vec![]),
        ],
        body: BodyInput::Bytes(body.to_vec()),
    }
}

const ALIVE: &dyn Fn(u32) -> bool = &|_| true;

#[test]
fn enqueue_claim_complete() {
    let (_dir, store) = store();
    let id = store.enqueue(new("http://a/1", b"hello")).unwrap();
    assert_eq!(store.stats().unwrap().queued, 1);
    let now = now_ms();
    assert!(store.has_due(now).unwrap());
    let claimed = store.claim(1, 10, now, now + 1000).unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].id, id);
    assert_eq!(claimed[0].body, ClaimedBody::Inline(b"hello".to_vec()));
    assert_eq!(claimed[0].attempts, 1);
    assert_eq!(
        claimed[0].headers[0],
        ("Content-Type".to_owned(), b"text/plain".to_vec())
    );
    // Claimed rows are nobody else's.
    assert!(store.claim(2, 10, now, now + 1000).unwrap().is_empty());
    assert_eq!(store.stats().unwrap().in_flight, 1);
    // Only the owner completes.
    assert!(!store.complete(id, 2).unwrap());
    assert!(store.complete(id, 1).unwrap());
    let stats = store.stats().unwrap();
    assert_eq!((stats.delivered, stats.in_flight, stats.queued), (1, 0, 0));
}

#[test]
fn claim_respects_limit_and_due_time() {
    let (_dir, store) = store();
    for i in 0..5 {
        store.enqueue(new(&format!("http://a/{i}"), b"")).unwrap();
    }
    let now = now_ms();
    let first = store.claim(1, 2, now, now + 1000).unwrap();
    assert_eq!(first.len(), 2);
    // A retry in the future is not due now.
    assert!(store.retry(first[0].id, 1, now + 60_000, "503").unwrap());
    let rest = store.claim(1, 10, now, now + 1000).unwrap();
    assert_eq!(rest.len(), 3);
    let stats = store.stats().unwrap();
    assert_eq!((stats.retrying, stats.in_flight), (1, 4));
    assert_eq!(store.next_due().unwrap(), Some(now + 60_000));
    let later = store.claim(1, 10, now + 60_000, now + 61_000).unwrap();
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].attempts, 2);
}

#[test]
fn expired_lease_and_dead_owner_go_back_to_the_queue() {
    let (_dir, store) = store();
    let a = store.enqueue(new("http://a/a", b"a")).unwrap();
    let b = store.enqueue(new("http://a/b", b"b")).unwrap();
    let now = now_ms();
    assert_eq!(store.claim(7, 1, now, now + 100).unwrap()[0].id, a);
    assert_eq!(store.claim(8, 1, now, now + 100_000).unwrap()[0].id, b);
    // Nothing expired yet, both owners alive.
    assert_eq!(store.recover(now, ALIVE).unwrap(), 0);
    // a's lease ran out.
    assert_eq!(store.recover(now + 101, ALIVE).unwrap(), 1);
    // b's owner died.
    assert_eq!(store.recover(now + 101, &|pid| pid != 8).unwrap(), 1);
    let again = store.claim(9, 10, now + 200, now + 10_000).unwrap();
    assert_eq!(
        again.iter().map(|c| (c.id, c.attempts)).collect::<Vec<_>>(),
        vec![(a, 2), (b, 2)]
    );
    // The old owner's late answer changes nothing.
    assert!(!store.complete(a, 7).unwrap());
    assert!(store.complete(a, 9).unwrap());
}

#[test]
fn release_does_not_count_the_attempt() {
    let (_dir, store) = store();
    let a = store.enqueue(new("http://a/a", b"")).unwrap();
    let b = store.enqueue(new("http://a/b", b"")).unwrap();
    let now = now_ms();
    store.claim(3, 10, now, now + 10_000).unwrap();
    assert_eq!(store.release(3, Some(&[a])).unwrap(), 1);
    assert_eq!(store.release(3, None).unwrap(), 1);
    let stats = store.stats().unwrap();
    assert_eq!((stats.queued, stats.in_flight), (2, 0));
    let claimed = store.claim(3, 10, now, now + 10_000).unwrap();
    assert_eq!(
        claimed.iter().map(|c| (c.id, c.attempts)).collect::<Vec<_>>(),
        vec![(a, 1), (b, 1)]
    );
}

#[test]
fn dead_rows_are_listed_and_requeued() {
    let (_dir, store) = store();
    let a = store.enqueue(new("http://a/a", b"")).unwrap();
    let b = store.enqueue(new("http://a/b", b"")).unwrap();
    let now = now_ms();
    store.claim(1, 10, now, now + 10_000).unwrap();
    assert!(store.kill(a, 1, "HTTP 400").unwrap());
    assert!(store.kill(b, 1, "HTTP 503").unwrap());
    let dead = store.dead(10).unwrap();
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0].url, "http://a/a");
    assert_eq!(dead[0].attempts, 1);
    assert_eq!(dead[0].last_error.as_deref(), Some("HTTP 400"));
    assert_eq!(store.stats().unwrap().dead, 2);
    assert_eq!(store.requeue(Some(a), now).unwrap(), 1);
    assert_eq!(store.requeue(Some(a), now).unwrap(), 0);
    assert_eq!(store.requeue(None, now).unwrap(), 1);
    let stats = store.stats().unwrap();
    assert_eq!((stats.dead, stats.queued), (0, 2));
}

#[test]
fn file_bodies_are_copied_from_the_offset() {
    let (dir, store) = store();
    let path = dir.path.join("body");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let id = store
        .enqueue(NewDelivery {
            method: "PUT".into(),
            url: "http://a/f".into(),
            headers: vec![],
            body: BodyInput::File {
                file: File::open(&path).unwrap(),
                offset: 10,
            },
        })
        .unwrap();
    let now = now_ms();
    let claimed = store.claim(1, 1, now, now + 1000).unwrap();
    assert_eq!(claimed[0].id, id);
    // Above INLINE_BODY_MAX: not in the claim, read back in chunks.
    let length = data.len() as u64 - 10;
    assert_eq!(claimed[0].body, ClaimedBody::Stored { length });
    let mut read = Vec::new();
    while (read.len() as u64) < length {
        let chunk = store.read_body(id, read.len() as u64, 100_000).unwrap();
        assert!(!chunk.is_empty() && chunk.len() <= 100_000);
        read.extend_from_slice(&chunk);
    }
    assert_eq!(read, &data[10..]);
    assert!(store.read_body(id, length, 10).unwrap().is_empty());
    // Delivered: the body goes with the row.
    assert!(store.complete(id, 1).unwrap());
    assert!(store.read_body(id, 0, 10).is_err());
}

#[test]
fn a_queue_file_with_bodies_in_the_row_is_migrated() {
    let dir = tempdir::Dir::new();
    let path = dir.path.join("old.sqlite3");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE threaded_proxy_deliveries (
               id INTEGER PRIMARY KEY AUTOINCREMENT, method TEXT NOT NULL, url TEXT NOT NULL,
               headers BLOB NOT NULL, body BLOB NOT NULL, state TEXT NOT NULL DEFAULT 'queued',
               attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at INTEGER NOT NULL,
               claimed_by INTEGER, lease_until INTEGER, last_error TEXT, created_at INTEGER NOT NULL);
             INSERT INTO threaded_proxy_deliveries (method, url, headers, body, next_attempt_at, created_at)
               VALUES ('POST', 'http://a/old', x'', x'6f6c64', 0, 0);",
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let now = now_ms();
    let claimed = store.claim(1, 5, now, now + 1000).unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].body, ClaimedBody::Inline(b"old".to_vec()));
    store.enqueue(new("http://a/new", b"new")).unwrap();
}

#[test]
fn rate_slots_are_spaced_across_connections_and_given_back() {
    let dir = tempdir::Dir::new();
    let path = dir.path.join("rate.sqlite3");
    let (a, b) = (
        SqliteStore::open(&path).unwrap(),
        SqliteStore::open(&path).unwrap(),
    );
    let now = 1_000_000;
    assert_eq!(a.take_rate_slot(100, now).unwrap(), now);
    assert_eq!(b.take_rate_slot(100, now).unwrap(), now + 100);
    assert_eq!(a.take_rate_slot(100, now + 50).unwrap(), now + 200);
    // The last slot goes back; an older one cannot (a later one was taken).
    a.give_back_rate_slot(now + 200, 100).unwrap();
    b.give_back_rate_slot(now, 100).unwrap();
    assert_eq!(b.take_rate_slot(100, now).unwrap(), now + 200);
    // An idle queue does not bank slots: the next one is now.
    assert_eq!(a.take_rate_slot(100, now + 10_000).unwrap(), now + 10_000);
}

#[test]
fn two_connections_never_claim_the_same_row() {
    let dir = tempdir::Dir::new();
    let path = dir.path.join("shared.sqlite3");
    let writer = SqliteStore::open(&path).unwrap();
    for i in 0..200 {
        writer.enqueue(new(&format!("http://a/{i}"), b"x")).unwrap();
    }
    let handles: Vec<_> = (0..4u32)
        .map(|owner| {
            let path = path.clone();
            std::thread::spawn(move || {
                let store = SqliteStore::open(&path).unwrap();
                let mut ids = Vec::new();
                loop {
                    let now = now_ms();
                    let got = store.claim(owner, 3, now, now + 60_000).unwrap();
                    if got.is_empty() {
                        return ids;
                    }
                    ids.extend(got.iter().map(|c| c.id));
                }
            })
        })
        .collect();
    let mut all: Vec<i64> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    all.sort_unstable();
    let len = all.len();
    all.dedup();
    assert_eq!(len, 200);
    assert_eq!(all.len(), 200);
}

/// A sibling holding the write lock of a fresh (rollback-journal) file,
/// as a sibling worker does while it switches the file to WAL: the WAL
/// switch here fails at once with SQLITE_BUSY, without the busy
/// handler (SQLite upgrades a read transaction to write the header);
/// opening must wait for the sibling and succeed once it commits.
#[test]
fn opening_waits_for_a_sibling_holding_the_write_lock() {
    let dir = tempdir::Dir::new();
    let path = dir.path.join("locked.sqlite3");
    let sibling = Connection::open(&path).unwrap();
    sibling
        .execute_batch("CREATE TABLE earlier (x); BEGIN IMMEDIATE; CREATE TABLE pending (x);")
        .unwrap();
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    let opener = {
        let path = path.clone();
        std::thread::spawn(move || {
            let result = SqliteStore::open(&path).map(|_| ());
            opened_tx.send(()).unwrap();
            result
        })
    };
    // Still waiting while the sibling holds the lock.
    assert!(opened_rx.recv_timeout(Duration::from_millis(300)).is_err());
    sibling.execute_batch("COMMIT;").unwrap();
    opener
        .join()
        .unwrap()
        .expect("open succeeds once the sibling commits");
    let store = SqliteStore::open(&path).unwrap();
    store.enqueue(new("http://a/after", b"x")).unwrap();
    let mode: String = store
        .conn()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

/// The schema step while a sibling's write transaction on the WAL file
/// is open: waits, then succeeds.
#[test]
fn opening_waits_for_a_sibling_writing_the_schema() {
    let dir = tempdir::Dir::new();
    let path = dir.path.join("schema.sqlite3");
    let sibling = Connection::open(&path).unwrap();
    let mode: String = sibling
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    sibling.execute_batch("BEGIN IMMEDIATE;").unwrap();
    sibling.execute_batch(SCHEMA).unwrap();
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    let opener = {
        let path = path.clone();
        std::thread::spawn(move || {
            let result = SqliteStore::open(&path).map(|_| ());
            opened_tx.send(()).unwrap();
            result
        })
    };
    assert!(opened_rx.recv_timeout(Duration::from_millis(200)).is_err());
    sibling.execute_batch("COMMIT;").unwrap();
    opener
        .join()
        .unwrap()
        .expect("open succeeds once the sibling commits");
}

/// Puma cluster workers booting together on a fresh file: every one
/// opens the queue (WAL switch, schema), none fails.
#[test]
fn many_openers_of_a_fresh_file_all_succeed() {
    for round in 0..20 {
        let dir = tempdir::Dir::new();
        let path = dir.path.join(format!("fresh-{round}.sqlite3"));
        let start = std::sync::Arc::new(std::sync::Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (path, start) = (path.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    SqliteStore::open(&path).map(|_| ())
                })
            })
            .collect();
        for handle in handles {
            handle.join().unwrap().expect("every opener succeeds");
        }
    }
}
