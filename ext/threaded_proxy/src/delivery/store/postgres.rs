//! [`PostgresStore`]: the deferred-delivery queue in PostgreSQL, for apps
//! whose processes run on several machines.
//!
//! Same rows and states as the SQLite store. What differs:
//! - claims take rows `FOR UPDATE SKIP LOCKED`, so any number of processes
//!   claim at once without waiting on each other or taking a row twice;
//! - a claim is owned by (host, pid): only rows claimed on this host are
//!   checked for a dead claimer, rows of other hosts come back when their
//!   lease runs out;
//! - a file body is streamed into its row with `COPY … FROM STDIN BINARY`,
//!   so a large upload is never held whole in memory; bodies are stored
//!   uncompressed out of line (`STORAGE EXTERNAL`) so `substring` reads
//!   only the chunk asked for while a large body is sent.
//!
//! One connection per process (a `Mutex`), opened again when the server
//! closed it. Every method blocks: call from `spawn_blocking` or without
//! the GVL, like the SQLite store.

use std::fs::File;
use std::io::Write;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use postgres::{Client, Config, GenericClient, NoTls, Row};

use super::{
    copy_file, decode_headers, encode_headers, now_ms, BodyInput, Claimed, ClaimedBody, DeadRow,
    DeliveryStore, NewDelivery, QueueStats, StoreError, StoreResult, INLINE_BODY_MAX,
};

/// The server's own message when it sent one: `postgres::Error`'s display
/// alone says only "db error".
impl From<postgres::Error> for StoreError {
    fn from(err: postgres::Error) -> StoreError {
        StoreError::Postgres(match err.as_db_error() {
            Some(db) => db.to_string(),
            None => err.to_string(),
        })
    }
}

/// Serialises schema creation between processes starting at once (two
/// `CREATE TABLE IF NOT EXISTS` can otherwise collide in the catalog).
const SCHEMA_LOCK: i64 = 0x7468_7270_7278_7131; // "thrprxq1"

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS threaded_proxy_deliveries (
  id BIGSERIAL PRIMARY KEY,
  method TEXT NOT NULL,
  url TEXT NOT NULL,
  headers BYTEA NOT NULL,
  state TEXT NOT NULL DEFAULT 'queued',
  attempts INTEGER NOT NULL DEFAULT 0,
  next_attempt_at BIGINT NOT NULL,
  claimed_host TEXT,
  claimed_by BIGINT,
  lease_until BIGINT,
  last_error TEXT,
  created_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS threaded_proxy_deliveries_due
  ON threaded_proxy_deliveries (state, next_attempt_at, id);
CREATE TABLE IF NOT EXISTS threaded_proxy_delivery_bodies (
  id BIGINT PRIMARY KEY,
  body BYTEA NOT NULL
);
ALTER TABLE threaded_proxy_delivery_bodies ALTER COLUMN body SET STORAGE EXTERNAL;
CREATE TABLE IF NOT EXISTS threaded_proxy_counters (
  name TEXT PRIMARY KEY,
  value BIGINT NOT NULL
);
";

/// The PostgreSQL backend: one connection per process, opened again when
/// the server closed it.
pub struct PostgresStore {
    /// The parsed URL, with the connect timeout and application name
    /// filled in: kept to connect again.
    config: Config,
    /// This machine's name: with the pid, who holds a claim.
    host: String,
    /// None until connected, and again after the server closed the
    /// connection; the mutex serialises the process's queue calls on it.
    client: Mutex<Option<Client>>,
}

/// A URL with its password replaced, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.find(':') {
                Some(colon) => format!("{}:***{}", &url[..scheme + 3 + colon], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// One field of a binary COPY tuple: its length, then its bytes.
fn copy_field(out: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    out.write_all(&(bytes.len() as i32).to_be_bytes())?;
    out.write_all(bytes)
}

/// The machine's host name (claims are owned by host and pid).
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let len = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

impl PostgresStore {
    /// Connects (bounded by `connect_timeout` unless the URL sets one) and
    /// creates the tables when missing.
    pub fn open(url: &str, connect_timeout: Duration) -> StoreResult<PostgresStore> {
        let mut config = Config::from_str(url)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("threaded-proxy");
        }
        let store = PostgresStore {
            config,
            host: host_name(),
            client: Mutex::new(None),
        };
        store.with_client(|client| {
            let mut tx = client.transaction()?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
            tx.batch_execute(SCHEMA)?;
            tx.commit()?;
            Ok(())
        })?;
        Ok(store)
    }

    /// Runs `work` on the connection, connecting first when there is none
    /// or the server closed it.
    fn with_client<T>(&self, work: impl FnOnce(&mut Client) -> StoreResult<T>) -> StoreResult<T> {
        let mut slot = self.client.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = Some(self.config.connect(NoTls)?);
        }
        let client = slot.as_mut().expect("connected above");
        let result = work(client);
        if result.is_err() && client.is_closed() {
            *slot = None;
        }
        result
    }

    /// Streams a file body into row `id`'s body with binary COPY.
    fn copy_file_body(
        client: &mut impl GenericClient,
        id: i64,
        mut file: File,
        offset: u64,
    ) -> StoreResult<()> {
        let length = file.metadata()?.len().saturating_sub(offset);
        let length = i32::try_from(length)
            .map_err(|_| StoreError::Corrupt("request body larger than 2 GiB".into()))?;
        let mut writer =
            client.copy_in("COPY threaded_proxy_delivery_bodies (id, body) FROM STDIN (FORMAT binary)")?;
        // The binary COPY format: signature, flags, header extension
        // length; one tuple (field count, then length + bytes per field);
        // the -1 trailer.
        writer.write_all(b"PGCOPY\n\xff\r\n\0")?;
        writer.write_all(&0i32.to_be_bytes())?;
        writer.write_all(&0i32.to_be_bytes())?;
        writer.write_all(&2i16.to_be_bytes())?;
        copy_field(&mut writer, &id.to_be_bytes())?;
        writer.write_all(&length.to_be_bytes())?;
        copy_file(&mut file, offset, length as u64, &mut writer)?;
        writer.write_all(&(-1i16).to_be_bytes())?;
        writer.finish()?;
        Ok(())
    }

    /// A claimed row with its body, or its length when it is large.
    fn claimed(client: &mut Client, row: &Row) -> StoreResult<Claimed> {
        let id: i64 = row.try_get(0)?;
        let headers: Vec<u8> = row.try_get(3)?;
        let body = client.query_opt(
            "SELECT length(body)::BIGINT, CASE WHEN length(body) <= $2 THEN body END
             FROM threaded_proxy_delivery_bodies WHERE id = $1",
            &[&id, &(INLINE_BODY_MAX as i32)],
        )?;
        let body = match body {
            Some(body) => ClaimedBody::from_parts(body.try_get(0)?, body.try_get(1)?),
            None => ClaimedBody::Inline(Vec::new()),
        };
        Ok(Claimed {
            id,
            method: row.try_get(1)?,
            url: row.try_get(2)?,
            headers: decode_headers(&headers)?,
            body,
            attempts: row.try_get::<_, i32>(4)?.max(0) as u32,
        })
    }
}

impl DeliveryStore for PostgresStore {
    fn enqueue(&self, delivery: NewDelivery) -> StoreResult<i64> {
        let headers = encode_headers(&delivery.headers);
        let now = now_ms();
        self.with_client(|client| {
            let mut tx = client.transaction()?;
            let id: i64 = tx
                .query_one(
                    "INSERT INTO threaded_proxy_deliveries (method, url, headers, next_attempt_at, created_at)
                     VALUES ($1, $2, $3, $4, $4) RETURNING id",
                    &[&delivery.method, &delivery.url, &headers, &now],
                )?
                .get(0);
            match delivery.body {
                BodyInput::File { file, offset } => Self::copy_file_body(&mut tx, id, file, offset)?,
                BodyInput::Empty | BodyInput::Bytes(_) => {
                    let body = match delivery.body {
                        BodyInput::Bytes(bytes) => bytes,
                        _ => Vec::new(),
                    };
                    tx.execute(
                        "INSERT INTO threaded_proxy_delivery_bodies (id, body) VALUES ($1, $2)",
                        &[&id, &body],
                    )?;
                }
            }
            tx.commit()?;
            Ok(id)
        })
    }

    fn has_due(&self, now: i64) -> StoreResult<bool> {
        self.with_client(|client| {
            Ok(!client
                .query(
                    "SELECT 1 FROM threaded_proxy_deliveries
                     WHERE state = 'queued' AND next_attempt_at <= $1 LIMIT 1",
                    &[&now],
                )?
                .is_empty())
        })
    }

    fn claim(&self, owner: u32, limit: usize, now: i64, lease_until: i64) -> StoreResult<Vec<Claimed>> {
        let limit = limit as i64;
        let owner = i64::from(owner);
        self.with_client(|client| {
            let rows = client.query(
                "UPDATE threaded_proxy_deliveries
                 SET state = 'in_flight', claimed_host = $1, claimed_by = $2, lease_until = $3,
                     attempts = attempts + 1
                 WHERE id IN (SELECT id FROM threaded_proxy_deliveries
                              WHERE state = 'queued' AND next_attempt_at <= $4
                              ORDER BY next_attempt_at, id LIMIT $5
                              FOR UPDATE SKIP LOCKED)
                 RETURNING id, method, url, headers, attempts",
                &[&self.host, &owner, &lease_until, &now, &limit],
            )?;
            let mut claimed = rows
                .iter()
                .map(|row| Self::claimed(client, row))
                .collect::<StoreResult<Vec<_>>>()?;
            claimed.sort_by_key(|c| c.id);
            Ok(claimed)
        })
    }

    fn complete(&self, id: i64, owner: u32) -> StoreResult<bool> {
        self.with_client(|client| {
            let mut tx = client.transaction()?;
            let removed = tx.execute(
                "DELETE FROM threaded_proxy_deliveries
                 WHERE id = $1 AND state = 'in_flight' AND claimed_host = $2 AND claimed_by = $3",
                &[&id, &self.host, &i64::from(owner)],
            )?;
            if removed > 0 {
                tx.execute("DELETE FROM threaded_proxy_delivery_bodies WHERE id = $1", &[&id])?;
                tx.execute(
                    "INSERT INTO threaded_proxy_counters (name, value) VALUES ('delivered', 1)
                     ON CONFLICT (name) DO UPDATE
                     SET value = threaded_proxy_counters.value + 1",
                    &[],
                )?;
            }
            tx.commit()?;
            Ok(removed > 0)
        })
    }

    fn retry(&self, id: i64, owner: u32, next_attempt_at: i64, error: &str) -> StoreResult<bool> {
        self.with_client(|client| {
            Ok(client.execute(
                "UPDATE threaded_proxy_deliveries
                 SET state = 'queued', claimed_host = NULL, claimed_by = NULL, lease_until = NULL,
                     next_attempt_at = $4, last_error = $5
                 WHERE id = $1 AND state = 'in_flight' AND claimed_host = $2 AND claimed_by = $3",
                &[&id, &self.host, &i64::from(owner), &next_attempt_at, &error],
            )? > 0)
        })
    }

    fn kill(&self, id: i64, owner: u32, error: &str) -> StoreResult<bool> {
        self.with_client(|client| {
            Ok(client.execute(
                "UPDATE threaded_proxy_deliveries
                 SET state = 'dead', claimed_host = NULL, claimed_by = NULL, lease_until = NULL,
                     last_error = $4
                 WHERE id = $1 AND state = 'in_flight' AND claimed_host = $2 AND claimed_by = $3",
                &[&id, &self.host, &i64::from(owner), &error],
            )? > 0)
        })
    }

    fn release(&self, owner: u32, ids: Option<&[i64]>) -> StoreResult<usize> {
        let ids: Option<Vec<i64>> = ids.map(<[i64]>::to_vec);
        self.with_client(|client| {
            Ok(client.execute(
                "UPDATE threaded_proxy_deliveries
                 SET state = 'queued', claimed_host = NULL, claimed_by = NULL, lease_until = NULL,
                     attempts = GREATEST(attempts - 1, 0)
                 WHERE state = 'in_flight' AND claimed_host = $1 AND claimed_by = $2
                   AND ($3::BIGINT[] IS NULL OR id = ANY($3))",
                &[&self.host, &i64::from(owner), &ids],
            )? as usize)
        })
    }

    fn recover(&self, now: i64, is_alive: &dyn Fn(u32) -> bool) -> StoreResult<usize> {
        self.with_client(|client| {
            let mut count = client.execute(
                "UPDATE threaded_proxy_deliveries
                 SET state = 'queued', claimed_host = NULL, claimed_by = NULL, lease_until = NULL,
                     last_error = COALESCE(last_error, 'lease expired')
                 WHERE state = 'in_flight' AND lease_until < $1",
                &[&now],
            )? as usize;
            let owners: Vec<i64> = client
                .query(
                    "SELECT DISTINCT claimed_by FROM threaded_proxy_deliveries
                     WHERE state = 'in_flight' AND claimed_host = $1",
                    &[&self.host],
                )?
                .iter()
                .map(|row| row.try_get(0))
                .collect::<Result<_, _>>()?;
            let gone: Vec<i64> = owners
                .into_iter()
                .filter(|pid| u32::try_from(*pid).map_or(true, |pid| !is_alive(pid)))
                .collect();
            if !gone.is_empty() {
                count += client.execute(
                    "UPDATE threaded_proxy_deliveries
                     SET state = 'queued', claimed_host = NULL, claimed_by = NULL, lease_until = NULL
                     WHERE state = 'in_flight' AND claimed_host = $1 AND claimed_by = ANY($2)",
                    &[&self.host, &gone],
                )? as usize;
            }
            Ok(count)
        })
    }

    fn stats(&self) -> StoreResult<QueueStats> {
        self.with_client(|client| {
            let mut stats = QueueStats::default();
            for row in client.query(
                "SELECT state, attempts > 0, COUNT(*) FROM threaded_proxy_deliveries GROUP BY 1, 2",
                &[],
            )? {
                let state: String = row.try_get(0)?;
                let tried: bool = row.try_get(1)?;
                let count = row.try_get::<_, i64>(2)? as u64;
                stats.add(&state, tried, count);
            }
            stats.delivered = client
                .query_opt(
                    "SELECT value FROM threaded_proxy_counters WHERE name = 'delivered'",
                    &[],
                )?
                .map_or(Ok(0), |row| row.try_get::<_, i64>(0))? as u64;
            Ok(stats)
        })
    }

    fn dead(&self, limit: usize) -> StoreResult<Vec<DeadRow>> {
        self.with_client(|client| {
            client
                .query(
                    "SELECT id, method, url, attempts, last_error FROM threaded_proxy_deliveries
                     WHERE state = 'dead' ORDER BY id LIMIT $1",
                    &[&(limit as i64)],
                )?
                .iter()
                .map(|row| {
                    Ok(DeadRow {
                        id: row.try_get(0)?,
                        method: row.try_get(1)?,
                        url: row.try_get(2)?,
                        attempts: row.try_get::<_, i32>(3)?.max(0) as u32,
                        last_error: row.try_get(4)?,
                    })
                })
                .collect()
        })
    }

    fn requeue(&self, id: Option<i64>, now: i64) -> StoreResult<usize> {
        self.with_client(|client| {
            Ok(client.execute(
                "UPDATE threaded_proxy_deliveries
                 SET state = 'queued', attempts = 0, next_attempt_at = $1
                 WHERE state = 'dead' AND ($2::BIGINT IS NULL OR id = $2)",
                &[&now, &id],
            )? as usize)
        })
    }

    fn next_due(&self) -> StoreResult<Option<i64>> {
        self.with_client(|client| {
            Ok(client
                .query_one(
                    "SELECT MIN(next_attempt_at) FROM threaded_proxy_deliveries WHERE state = 'queued'",
                    &[],
                )?
                .try_get(0)?)
        })
    }

    fn read_body(&self, id: i64, offset: u64, len: usize) -> StoreResult<Vec<u8>> {
        let from =
            i32::try_from(offset + 1).map_err(|_| StoreError::Corrupt("body offset beyond 2 GiB".into()))?;
        let len = i32::try_from(len).unwrap_or(i32::MAX);
        self.with_client(|client| {
            let row = client
                .query_opt(
                    "SELECT substring(body FROM $2 FOR $3) FROM threaded_proxy_delivery_bodies WHERE id = $1",
                    &[&id, &from, &len],
                )?
                .ok_or_else(|| StoreError::Corrupt(format!("the body of request {id} is gone")))?;
            Ok(row.try_get(0)?)
        })
    }

    fn take_rate_slot(&self, interval_ms: i64, now: i64) -> StoreResult<i64> {
        self.with_client(|client| {
            Ok(client
                .query_one(
                    "INSERT INTO threaded_proxy_counters (name, value)
                     VALUES ('rate_next_at', $1::BIGINT + $2::BIGINT)
                     ON CONFLICT (name) DO UPDATE
                     SET value = GREATEST(threaded_proxy_counters.value, $1::BIGINT) + $2::BIGINT
                     RETURNING value - $2::BIGINT",
                    &[&now, &interval_ms],
                )?
                .try_get(0)?)
        })
    }

    fn give_back_rate_slot(&self, slot: i64, interval_ms: i64) -> StoreResult<()> {
        self.with_client(|client| {
            client.execute(
                "UPDATE threaded_proxy_counters SET value = $1::BIGINT
                 WHERE name = 'rate_next_at' AND value = $1::BIGINT + $2::BIGINT",
                &[&slot, &interval_ms],
            )?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://app:s3cret@db.internal:5432/app"),
            "postgres://app:***@db.internal:5432/app"
        );
        assert_eq!(redact("postgres://app@db/app"), "postgres://app@db/app");
        assert_eq!(redact("postgres:///app?host=/run"), "postgres:///app?host=/run");
    }

    #[test]
    fn a_bad_url_is_an_error_not_a_panic() {
        assert!(PostgresStore::open("postgres://[bad", Duration::from_millis(100)).is_err());
    }

    #[test]
    fn host_name_is_known() {
        assert!(!host_name().is_empty());
    }
}
