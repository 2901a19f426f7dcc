//! Durable storage of deferred requests: the [`DeliveryStore`] trait (what
//! the worker needs from any backend) and [`SqliteStore`], the embedded
//! backend shared by every process of a machine through one WAL-mode file.
//!
//! Every method blocks (file I/O, lock waits bounded by the busy timeout):
//! call them from `spawn_blocking` or with the GVL released, never on a
//! tokio worker thread.
//!
//! A request's body sits in its own table: changing a row's state never
//! rewrites the body, and a large body is read back in chunks while it is
//! sent ([`ClaimedBody::Stored`]), so memory per attempt stays bounded.
//!
//! Row life: `queued` → (claim) `in_flight` → deleted and counted as
//! delivered, or back to `queued` with a later `next_attempt_at` (retry), or
//! `dead`. A claim carries the claimer's pid and a lease; a row whose lease
//! ran out or whose claimer died goes back to `queued` (at-least-once).
//! "Died" is checked with the pid on this machine: the SQLite file is
//! local to one machine (several machines need another backend).

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, DatabaseName, ErrorCode, OptionalExtension, TransactionBehavior};

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("delivery queue database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The server's own message when it sent one ("db error" alone says
    /// nothing).
    #[error("delivery queue database: {0}")]
    Postgres(String),
    #[error("delivery queue body: {0}")]
    Io(#[from] std::io::Error),
    #[error("delivery queue: {0}")]
    Corrupt(String),
}

impl From<postgres::Error> for StoreError {
    fn from(err: postgres::Error) -> StoreError {
        StoreError::Postgres(match err.as_db_error() {
            Some(db) => db.to_string(),
            None => err.to_string(),
        })
    }
}

/// Milliseconds since the Unix epoch: the store's clock (shared by all
/// processes of the machine, unlike `Instant`).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub fn ms(duration: Duration) -> i64 {
    duration.as_millis().min(i64::MAX as u128) as i64
}

/// The request body of a new delivery.
pub enum BodyInput {
    Empty,
    Bytes(Vec<u8>),
    /// Read from `offset` to the end of the file (Puma's Tempfile, a dup of
    /// its fd): copied into the database without holding it whole in memory.
    File {
        file: File,
        offset: u64,
    },
}

/// A request to store.
pub struct NewDelivery {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: BodyInput,
}

/// Bodies up to this size come with the claim; larger ones are read from
/// the store while they are sent.
pub const INLINE_BODY_MAX: usize = 256 * 1024;

/// Chunk size for reading a stored body back.
pub const BODY_CHUNK: usize = 256 * 1024;

/// A claimed row's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimedBody {
    Inline(Vec<u8>),
    /// `length` bytes to read with [`DeliveryStore::read_body`].
    Stored {
        length: u64,
    },
}

impl ClaimedBody {
    /// From a body's length and, when small enough, its bytes.
    pub fn from_parts(length: i64, inline: Option<Vec<u8>>) -> ClaimedBody {
        match inline {
            Some(bytes) => ClaimedBody::Inline(bytes),
            None => ClaimedBody::Stored {
                length: length.max(0) as u64,
            },
        }
    }
}

/// A claimed row, ready to send.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: i64,
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: ClaimedBody,
    /// Attempts including this one.
    pub attempts: u32,
}

/// A request that will not be tried again unless requeued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadRow {
    pub id: i64,
    pub method: String,
    pub url: String,
    pub attempts: u32,
    pub last_error: Option<String>,
}

/// Machine-wide counts (all processes sharing the store).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Waiting for a first attempt.
    pub queued: u64,
    pub in_flight: u64,
    pub delivered: u64,
    /// Waiting for a later attempt after a failed one.
    pub retrying: u64,
    pub dead: u64,
}

impl QueueStats {
    /// Counts `count` rows in `state` (`tried`: attempted at least once),
    /// as both backends group them.
    pub fn add(&mut self, state: &str, tried: bool, count: u64) {
        match (state, tried) {
            ("queued", false) => self.queued += count,
            ("queued", true) => self.retrying += count,
            ("in_flight", _) => self.in_flight += count,
            ("dead", _) => self.dead += count,
            _ => {}
        }
    }
}

/// What the delivery worker needs from a backend: [`SqliteStore`] (one
/// machine) or [`super::postgres::PostgresStore`] (several). `owner` is the
/// claiming process's pid.
pub trait DeliveryStore: Send + Sync {
    /// Stores a request durably (committed before returning); its id.
    fn enqueue(&self, delivery: NewDelivery) -> StoreResult<i64>;
    /// True when some queued row is due at `now` (a cheap read, no lock).
    fn has_due(&self, now: i64) -> StoreResult<bool>;
    /// Moves up to `limit` due rows to `in_flight` for `owner` until
    /// `lease_until`, counting an attempt on each, atomically.
    fn claim(&self, owner: u32, limit: usize, now: i64, lease_until: i64) -> StoreResult<Vec<Claimed>>;
    /// The attempt succeeded: the row is removed and counted as delivered.
    fn complete(&self, id: i64, owner: u32) -> StoreResult<bool>;
    /// The attempt failed and may be repeated at `next_attempt_at`.
    fn retry(&self, id: i64, owner: u32, next_attempt_at: i64, error: &str) -> StoreResult<bool>;
    /// The request will not be tried again.
    fn kill(&self, id: i64, owner: u32, error: &str) -> StoreResult<bool>;
    /// Gives rows claimed by `owner` back to the queue without counting the
    /// attempt (shutdown); `ids` None releases all of them.
    fn release(&self, owner: u32, ids: Option<&[i64]>) -> StoreResult<usize>;
    /// Requeues in-flight rows whose lease ran out at `now` or whose owner
    /// `is_alive` says is gone.
    fn recover(&self, now: i64, is_alive: &dyn Fn(u32) -> bool) -> StoreResult<usize>;
    fn stats(&self) -> StoreResult<QueueStats>;
    /// Dead rows, oldest first, at most `limit`.
    fn dead(&self, limit: usize) -> StoreResult<Vec<DeadRow>>;
    /// Dead rows back to queued with a fresh attempt count: one id or all.
    fn requeue(&self, id: Option<i64>, now: i64) -> StoreResult<usize>;
    /// When the next queued row is due, if any.
    fn next_due(&self) -> StoreResult<Option<i64>>;
    /// Up to `len` bytes of row `id`'s body from `offset` (a
    /// [`ClaimedBody::Stored`] body, read while it is sent).
    fn read_body(&self, id: i64, offset: u64, len: usize) -> StoreResult<Vec<u8>>;
    /// The outgoing rate, shared by every process of the queue: takes the
    /// next start slot (ms since the epoch, never before `now`) and moves
    /// the queue's next slot `interval_ms` later.
    fn take_rate_slot(&self, interval_ms: i64, now: i64) -> StoreResult<i64>;
    /// Gives `slot` back when nothing was sent in it, unless a later slot
    /// was taken meanwhile (then it is simply unused).
    fn give_back_rate_slot(&self, slot: i64, interval_ms: i64) -> StoreResult<()>;
}

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

/// Headers as one blob: per pair, u32 name length, name, u32 value length,
/// value (big-endian lengths).
pub fn encode_headers(headers: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        out.extend_from_slice(&(name.len() as u32).to_be_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        out.extend_from_slice(value);
    }
    out
}

pub fn decode_headers(mut data: &[u8]) -> StoreResult<Vec<(String, Vec<u8>)>> {
    fn take<'a>(data: &mut &'a [u8]) -> StoreResult<&'a [u8]> {
        let corrupt = || StoreError::Corrupt("truncated headers".into());
        let len_bytes: [u8; 4] = data
            .get(..4)
            .ok_or_else(corrupt)?
            .try_into()
            .map_err(|_| corrupt())?;
        let len = u32::from_be_bytes(len_bytes) as usize;
        let field = data.get(4..4 + len).ok_or_else(corrupt)?;
        *data = &data[4 + len..];
        Ok(field)
    }
    let mut headers = Vec::new();
    while !data.is_empty() {
        let name = String::from_utf8(take(&mut data)?.to_vec())
            .map_err(|_| StoreError::Corrupt("header name is not UTF-8".into()))?;
        let value = take(&mut data)?.to_vec();
        headers.push((name, value));
    }
    Ok(headers)
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

pub(crate) fn copy_file(file: &mut File, offset: u64, length: u64, out: &mut impl Write) -> StoreResult<()> {
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::Start(offset))?;
    let mut left = length;
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 {
        let want = buf.len().min(left as usize);
        let n = file.read(&mut buf[..want])?;
        if n == 0 {
            return Err(StoreError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "request body file shrank",
            )));
        }
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
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
    fn headers_round_trip() {
        let headers = vec![("A".to_owned(), b"1".to_vec()), ("B".to_owned(), vec![0, 255])];
        assert_eq!(decode_headers(&encode_headers(&headers)).unwrap(), headers);
        assert!(decode_headers(&[0, 0, 0, 9, b'x']).is_err());
    }

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
}
