//! Durable storage of deferred requests: the [`DeliveryStore`] trait (what
//! the worker needs from any backend), the types it speaks in, and the
//! backends.
//!
//! - `sqlite`: [`SqliteStore`], the embedded backend shared by every
//!   process of a machine through one WAL-mode file.
//! - `postgres`: [`postgres::PostgresStore`], for processes on several
//!   machines (claims with `SKIP LOCKED`); holds its own error conversion.
//! - `codec`: the header list as one blob (both backends store it so).
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

mod codec;
pub mod postgres;
mod sqlite;

use std::fs::File;
use std::io::{Read, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use codec::{decode_headers, encode_headers};
pub use sqlite::SqliteStore;

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("delivery queue database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The server's own message when it sent one (the conversion is in
    /// `postgres`).
    #[error("delivery queue database: {0}")]
    Postgres(String),
    #[error("delivery queue body: {0}")]
    Io(#[from] std::io::Error),
    #[error("delivery queue: {0}")]
    Corrupt(String),
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
/// machine) or [`postgres::PostgresStore`] (several). `owner` is the
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

/// Copies `length` bytes of `file` from `offset` into `out` in 64 KiB steps
/// (a Tempfile body goes into the database without being held whole in
/// memory); a file that ends early is an error, not a short body.
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
