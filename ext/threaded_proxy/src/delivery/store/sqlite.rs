//! [`SqliteStore`], the embedded backend: one WAL-mode file shared by every
//! process of a machine.
//!
//! "Died" (a claimer whose rows go back to the queue) is checked with the
//! pid on this machine: the SQLite file is local to one machine (several
//! machines need the PostgreSQL backend).

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, DatabaseName, ErrorCode, OptionalExtension, TransactionBehavior};

use super::{
    copy_file, decode_headers, encode_headers, now_ms, BodyInput, Claimed, ClaimedBody, DeadRow,
    DeliveryStore, NewDelivery, QueueStats, StoreError, StoreResult, INLINE_BODY_MAX,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS threaded_proxy_deliveries (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  method TEXT NOT NULL,
  url TEXT NOT NULL,
  headers BLOB NOT NULL,
  state TEXT NOT NULL DEFAULT 'queued',
  attempts INTEGER NOT NULL DEFAULT 0,
  next_attempt_at INTEGER NOT NULL,
  claimed_by INTEGER,
  lease_until INTEGER,
  last_error TEXT,
  created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS threaded_proxy_deliveries_due
  ON threaded_proxy_deliveries (state, next_attempt_at);
CREATE TABLE IF NOT EXISTS threaded_proxy_delivery_bodies (
  id INTEGER PRIMARY KEY,
  body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS threaded_proxy_counters (
  name TEXT PRIMARY KEY,
  value INTEGER NOT NULL
);
";

/// A queue file written before bodies had their own table: moves them.
const MIGRATE_INLINE_BODIES: &str = "
INSERT OR IGNORE INTO threaded_proxy_delivery_bodies (id, body)
  SELECT id, body FROM threaded_proxy_deliveries;
ALTER TABLE threaded_proxy_deliveries DROP COLUMN body;
";

/// Bounds every lock wait of a queue connection, and the retries of
/// opening it.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `step` again while SQLite answers BUSY or LOCKED (the cases its busy
/// handler does not cover), with a growing pause, until `deadline`.
fn while_busy<T>(deadline: Instant, mut step: impl FnMut() -> rusqlite::Result<T>) -> StoreResult<T> {
    let mut pause = Duration::from_millis(2);
    loop {
        match step() {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if matches!(e.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
                    && Instant::now() + pause < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            result => return Ok(result?),
        }
    }
}

/// The embedded backend: one connection per process (never carried across
/// fork: the owner builds a new store in a forked child).
pub struct SqliteStore {
    /// A connection is not `Sync`; one per process behind a mutex is
    /// enough, as SQLite serialises writers to the file anyway.
    conn: Mutex<Connection>,
}

impl SqliteStore {
    pub fn open(path: &Path) -> StoreResult<SqliteStore> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut conn = Connection::open(path)?;
        // Before any statement: every later lock wait is bounded by it.
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let deadline = Instant::now() + BUSY_TIMEOUT;
        // WAL: readers never block the writer. FULL: a commit is fsynced
        // before enqueue returns, so an accepted request survives a power
        // loss too, not only a crash of the process. The switch is retried:
        // SQLite answers SQLITE_BUSY at once, without the busy handler, when
        // a sibling holds the write lock while this connection reads the
        // header (a sibling worker switching the same fresh file).
        let mode: String = while_busy(deadline, || {
            conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        })?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt(format!(
                "cannot switch {} to WAL (got {mode})",
                path.display()
            )));
        }
        conn.execute_batch("PRAGMA synchronous = FULL;")?;
        // IMMEDIATE: the write lock is taken (waiting for a sibling) before
        // the schema is read, so a sibling's schema commit cannot leave this
        // transaction on a stale snapshot (SQLITE_BUSY, not retried).
        while_busy(deadline, || {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute_batch(SCHEMA)?;
            let inline_bodies: bool = tx.query_row(
                "SELECT COUNT(*) > 0 FROM pragma_table_info('threaded_proxy_deliveries') WHERE name = 'body'",
                [],
                |r| r.get(0),
            )?;
            if inline_bodies {
                tx.execute_batch(MIGRATE_INLINE_BODIES)?;
            }
            tx.commit()
        })?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl DeliveryStore for SqliteStore {
    fn enqueue(&self, delivery: NewDelivery) -> StoreResult<i64> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = now_ms();
        let headers = encode_headers(&delivery.headers);
        tx.execute(
            "INSERT INTO threaded_proxy_deliveries (method, url, headers, next_attempt_at, created_at)
             VALUES (?1, ?2, ?3, ?4, ?4)",
            params![delivery.method, delivery.url, headers, now],
        )?;
        let id = tx.last_insert_rowid();
        match delivery.body {
            BodyInput::Empty => {
                tx.execute(
                    "INSERT INTO threaded_proxy_delivery_bodies (id, body) VALUES (?1, x'')",
                    [id],
                )?;
            }
            BodyInput::Bytes(bytes) => {
                tx.execute(
                    "INSERT INTO threaded_proxy_delivery_bodies (id, body) VALUES (?1, ?2)",
                    params![id, bytes],
                )?;
            }
            BodyInput::File { mut file, offset } => {
                let length = file.metadata()?.len().saturating_sub(offset);
                let length = i64::try_from(length)
                    .ok()
                    .filter(|l| *l <= i32::MAX as i64)
                    .ok_or_else(|| StoreError::Corrupt("request body larger than 2 GiB".into()))?;
                tx.execute(
                    "INSERT INTO threaded_proxy_delivery_bodies (id, body) VALUES (?1, zeroblob(?2))",
                    params![id, length],
                )?;
                let mut blob = tx.blob_open(
                    DatabaseName::Main,
                    "threaded_proxy_delivery_bodies",
                    "body",
                    id,
                    false,
                )?;
                copy_file(&mut file, offset, length as u64, &mut blob)?;
                blob.close()?;
            }
        }
        tx.commit()?;
        Ok(id)
    }

    fn has_due(&self, now: i64) -> StoreResult<bool> {
        Ok(self
            .conn()
            .query_row(
                "SELECT 1 FROM threaded_proxy_deliveries
                 WHERE state = 'queued' AND next_attempt_at <= ?1 LIMIT 1",
                [now],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    fn claim(&self, owner: u32, limit: usize, now: i64, lease_until: i64) -> StoreResult<Vec<Claimed>> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut claimed = Vec::new();
        {
            let mut stmt = tx.prepare(
                "UPDATE threaded_proxy_deliveries
                 SET state = 'in_flight', claimed_by = ?1, lease_until = ?2, attempts = attempts + 1
                 WHERE id IN (SELECT id FROM threaded_proxy_deliveries
                              WHERE state = 'queued' AND next_attempt_at <= ?3
                              ORDER BY next_attempt_at, id LIMIT ?4)
                 RETURNING id, method, url, headers, attempts",
            )?;
            // length() of a blob column reads no overflow pages: a large
            // body stays on disk until it is sent.
            let mut body = tx.prepare(
                "SELECT length(body), CASE WHEN length(body) <= ?2 THEN body END
                 FROM threaded_proxy_delivery_bodies WHERE id = ?1",
            )?;
            let mut rows = stmt.query(params![owner, lease_until, now, limit as i64])?;
            while let Some(row) = rows.next()? {
                let id: i64 = row.get(0)?;
                let headers: Vec<u8> = row.get(3)?;
                let (length, inline) = body
                    .query_row(params![id, INLINE_BODY_MAX as i64], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .optional()?
                    .unwrap_or((0, Some(Vec::new())));
                claimed.push(Claimed {
                    id,
                    method: row.get(1)?,
                    url: row.get(2)?,
                    headers: decode_headers(&headers)?,
                    body: ClaimedBody::from_parts(length, inline),
                    attempts: row.get(4)?,
                });
            }
        }
        tx.commit()?;
        claimed.sort_by_key(|c| c.id);
        Ok(claimed)
    }

    fn complete(&self, id: i64, owner: u32) -> StoreResult<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let removed = tx.execute(
            "DELETE FROM threaded_proxy_deliveries
             WHERE id = ?1 AND state = 'in_flight' AND claimed_by = ?2",
            params![id, owner],
        )?;
        if removed > 0 {
            tx.execute("DELETE FROM threaded_proxy_delivery_bodies WHERE id = ?1", [id])?;
            tx.execute(
                "INSERT INTO threaded_proxy_counters (name, value) VALUES ('delivered', 1)
                 ON CONFLICT (name) DO UPDATE SET value = value + 1",
                [],
            )?;
        }
        tx.commit()?;
        Ok(removed > 0)
    }

    fn retry(&self, id: i64, owner: u32, next_attempt_at: i64, error: &str) -> StoreResult<bool> {
        Ok(self.conn().execute(
            "UPDATE threaded_proxy_deliveries
             SET state = 'queued', claimed_by = NULL, lease_until = NULL,
                 next_attempt_at = ?3, last_error = ?4
             WHERE id = ?1 AND state = 'in_flight' AND claimed_by = ?2",
            params![id, owner, next_attempt_at, error],
        )? > 0)
    }

    fn kill(&self, id: i64, owner: u32, error: &str) -> StoreResult<bool> {
        Ok(self.conn().execute(
            "UPDATE threaded_proxy_deliveries
             SET state = 'dead', claimed_by = NULL, lease_until = NULL, last_error = ?3
             WHERE id = ?1 AND state = 'in_flight' AND claimed_by = ?2",
            params![id, owner, error],
        )? > 0)
    }

    fn release(&self, owner: u32, ids: Option<&[i64]>) -> StoreResult<usize> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let sql = "UPDATE threaded_proxy_deliveries
                   SET state = 'queued', claimed_by = NULL, lease_until = NULL,
                       attempts = MAX(attempts - 1, 0)
                   WHERE state = 'in_flight' AND claimed_by = ?1";
        let count = match ids {
            None => tx.execute(sql, [owner])?,
            Some(ids) => {
                let mut stmt = tx.prepare(&format!("{sql} AND id = ?2"))?;
                let mut count = 0;
                for id in ids {
                    count += stmt.execute(params![owner, id])?;
                }
                count
            }
        };
        tx.commit()?;
        Ok(count)
    }

    fn recover(&self, now: i64, is_alive: &dyn Fn(u32) -> bool) -> StoreResult<usize> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let owners: Vec<u32> = {
            let mut stmt = tx.prepare(
                "SELECT DISTINCT claimed_by FROM threaded_proxy_deliveries
                 WHERE state = 'in_flight' AND claimed_by IS NOT NULL",
            )?;
            let owners = stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
            owners
        };
        let mut count = tx.execute(
            "UPDATE threaded_proxy_deliveries
             SET state = 'queued', claimed_by = NULL, lease_until = NULL,
                 last_error = COALESCE(last_error, 'lease expired')
             WHERE state = 'in_flight' AND lease_until < ?1",
            [now],
        )?;
        for owner in owners.into_iter().filter(|o| !is_alive(*o)) {
            count += tx.execute(
                "UPDATE threaded_proxy_deliveries
                 SET state = 'queued', claimed_by = NULL, lease_until = NULL
                 WHERE state = 'in_flight' AND claimed_by = ?1",
                [owner],
            )?;
        }
        tx.commit()?;
        Ok(count)
    }

    fn stats(&self) -> StoreResult<QueueStats> {
        let conn = self.conn();
        let mut stats = QueueStats::default();
        let mut stmt = conn
            .prepare("SELECT state, attempts > 0, COUNT(*) FROM threaded_proxy_deliveries GROUP BY 1, 2")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?, r.get::<_, i64>(2)?))
        })?;
        for row in rows {
            let (state, tried, count) = row?;
            stats.add(&state, tried, count as u64);
        }
        stats.delivered = conn
            .query_row(
                "SELECT value FROM threaded_proxy_counters WHERE name = 'delivered'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .unwrap_or(0) as u64;
        Ok(stats)
    }

    fn dead(&self, limit: usize) -> StoreResult<Vec<DeadRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, method, url, attempts, last_error FROM threaded_proxy_deliveries
             WHERE state = 'dead' ORDER BY id LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit as i64], |r| {
            Ok(DeadRow {
                id: r.get(0)?,
                method: r.get(1)?,
                url: r.get(2)?,
                attempts: r.get(3)?,
                last_error: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn requeue(&self, id: Option<i64>, now: i64) -> StoreResult<usize> {
        let sql = "UPDATE threaded_proxy_deliveries
                   SET state = 'queued', attempts = 0, next_attempt_at = ?1
                   WHERE state = 'dead'";
        let conn = self.conn();
        Ok(match id {
            None => conn.execute(sql, [now])?,
            Some(id) => conn.execute(&format!("{sql} AND id = ?2"), params![now, id])?,
        })
    }

    fn next_due(&self) -> StoreResult<Option<i64>> {
        Ok(self.conn().query_row(
            "SELECT MIN(next_attempt_at) FROM threaded_proxy_deliveries WHERE state = 'queued'",
            [],
            |r| r.get(0),
        )?)
    }

    fn read_body(&self, id: i64, offset: u64, len: usize) -> StoreResult<Vec<u8>> {
        let conn = self.conn();
        let blob = conn.blob_open(
            DatabaseName::Main,
            "threaded_proxy_delivery_bodies",
            "body",
            id,
            true,
        )?;
        let size = blob.len() as u64;
        let start = offset.min(size);
        let mut buf = vec![0u8; len.min((size - start) as usize)];
        blob.read_at_exact(&mut buf, start as usize)?;
        Ok(buf)
    }

    fn take_rate_slot(&self, interval_ms: i64, now: i64) -> StoreResult<i64> {
        Ok(self.conn().query_row(
            "INSERT INTO threaded_proxy_counters (name, value) VALUES ('rate_next_at', ?1 + ?2)
             ON CONFLICT (name) DO UPDATE SET value = MAX(value, ?1) + ?2
             RETURNING value - ?2",
            params![now, interval_ms],
            |r| r.get(0),
        )?)
    }

    fn give_back_rate_slot(&self, slot: i64, interval_ms: i64) -> StoreResult<()> {
        self.conn().execute(
            "UPDATE threaded_proxy_counters SET value = ?1
             WHERE name = 'rate_next_at' AND value = ?1 + ?2",
            params![slot, interval_ms],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
