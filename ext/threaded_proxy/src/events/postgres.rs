//! Event streams across processes and machines (`events_url`): `publish`
//! stores the event in PostgreSQL and NOTIFYs; every process that serves
//! streams LISTENs on one connection and fans the events out to its own
//! subscribers.
//!
//! - Every event is a row (`threaded_proxy_events`, bigserial id) holding
//!   the encoded SSE bytes. The notification carries the row id and, when
//!   the whole fits in [`INLINE_MAX`] bytes of text, the event itself;
//!   otherwise the listener reads the row.
//! - Publishes take a transaction-level advisory lock before the insert, so
//!   ids are given out in commit order. PostgreSQL delivers notifications in
//!   commit order, so while connected the listener sees ids in order and
//!   skips only what it already fanned out (`id <= last`).
//! - After a lost connection (a database restart) the listener connects
//!   again, LISTENs, then reads every row after the last id it fanned out:
//!   nothing committed while it was connected, nor while it was away, is
//!   lost as long as the row is still there (rows older than
//!   [`RETENTION`] are pruned).
//! - The publisher is the blocking `postgres` client (called without the
//!   GVL), bounded by [`PUBLISH_TIMEOUT`]; the listener is a tokio-postgres
//!   task on the proxy's runtime.

use std::str::FromStr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use tokio_postgres::AsyncMessage;

use super::Hub;

/// The NOTIFY channel every process LISTENs on.
pub const NOTIFY_CHANNEL: &str = "threaded_proxy_events";
/// Notification payloads stay under PostgreSQL's 8,000-byte limit.
pub const INLINE_MAX: usize = 7000;
/// How long event rows are kept for listeners that reconnect.
pub const RETENTION: &str = "1 hour";

/// Serialises schema creation between processes starting at once.
const SCHEMA_LOCK: i64 = 0x7468_7270_7278_6531; // "thrprxe1"
/// Serialises publishes so row ids follow commit order (see the module doc).
const PUBLISH_LOCK: i64 = 0x7468_7270_7278_6532; // "thrprxe2"

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS threaded_proxy_events (
  id BIGSERIAL PRIMARY KEY,
  channel TEXT NOT NULL,
  event_id TEXT,
  payload BYTEA NOT NULL,
  created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
";

/// This process's publishing connection: (pid, url, client). The pid,
/// because a forked child must not talk on its parent's socket.
static PUBLISHER: Mutex<Option<(u32, String, postgres::Client)>> = Mutex::new(None);

/// The longest a publish waits on the database, so a stuck database fails
/// the publish instead of hanging the caller: for the connection, for a
/// lock (another process's publish that holds `PUBLISH_LOCK` and hangs;
/// `lock_timeout`), for a statement (`statement_timeout`), and for bytes
/// the database does not acknowledge (a lost network; `TCP_USER_TIMEOUT`).
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

fn connect_blocking(url: &str) -> Result<postgres::Client, String> {
    let mut config = postgres::Config::from_str(url).map_err(|e| format!("events_url: {e}"))?;
    let ms = PUBLISH_TIMEOUT.as_millis();
    // After the URL's own `options`, so these two win.
    let options = format!(
        "{} -c lock_timeout={ms} -c statement_timeout={ms}",
        config.get_options().unwrap_or("")
    );
    config.options(options.trim_start());
    config.connect_timeout(PUBLISH_TIMEOUT);
    config.tcp_user_timeout(PUBLISH_TIMEOUT);
    config.application_name("threaded-proxy events");
    let mut client = config.connect(postgres::NoTls).map_err(|e| db_message(&e))?;
    let mut tx = client.transaction().map_err(|e| db_message(&e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
        .and_then(|_| tx.batch_execute(SCHEMA))
        .map_err(|e| db_message(&e))?;
    tx.commit().map_err(|e| db_message(&e))?;
    Ok(client)
}

fn db_message(err: &postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => db.to_string(),
        None => err.to_string(),
    }
}

/// The notification text: the id alone, or `id channel_len id_len|-` and
/// then channel, event id and event, when all of it is text that fits.
pub fn notification(id: i64, channel: &str, event_id: Option<&str>, event: &[u8]) -> String {
    let inline = std::str::from_utf8(event).ok().and_then(|event| {
        let id_len = event_id.map_or("-".to_owned(), |e| e.len().to_string());
        let text = format!(
            "{id} {} {id_len} {channel}{}{event}",
            channel.len(),
            event_id.unwrap_or("")
        );
        (text.len() <= INLINE_MAX).then_some(text)
    });
    inline.unwrap_or_else(|| id.to_string())
}

/// What a notification says: the id, and the event when it was inline.
#[derive(Debug, PartialEq)]
pub struct Notice {
    /// The row id.
    pub id: i64,
    /// (channel, event id, encoded event).
    pub inline: Option<(String, Option<String>, Bytes)>,
}

pub fn parse_notification(text: &str) -> Option<Notice> {
    let mut parts = text.splitn(4, ' ');
    let id = parts.next()?.parse().ok()?;
    let Some(channel_len) = parts.next() else {
        return Some(Notice { id, inline: None });
    };
    let channel_len: usize = channel_len.parse().ok()?;
    let id_len = parts.next()?;
    let rest = parts.next()?;
    let channel = rest.get(..channel_len)?;
    let rest = &rest[channel_len..];
    let (event_id, event) = match id_len {
        "-" => (None, rest),
        n => {
            let n: usize = n.parse().ok()?;
            (Some(rest.get(..n)?.to_owned()), &rest[n..])
        }
    };
    Some(Notice {
        id,
        inline: Some((
            channel.to_owned(),
            event_id,
            Bytes::copy_from_slice(event.as_bytes()),
        )),
    })
}

/// Stores and NOTIFYs one encoded event (blocking; call without the GVL).
/// A connection found dead at BEGIN (nothing written yet) is opened again
/// once.
pub fn publish(url: &str, channel: &str, event_id: Option<&str>, event: &[u8]) -> Result<i64, String> {
    let mut slot = PUBLISHER.lock().unwrap_or_else(|e| e.into_inner());
    let pid = std::process::id();
    let reusable = matches!(&*slot, Some((p, u, c)) if *p == pid && u == url && !c.is_closed());
    if !reusable {
        if let Some((p, _, client)) = slot.take() {
            if p != pid {
                std::mem::forget(client); // the parent's socket: never close it from here
            }
        }
        *slot = Some((pid, url.to_owned(), connect_blocking(url)?));
    }
    let result = match insert(
        &mut slot.as_mut().expect("connected above").2,
        channel,
        event_id,
        event,
    ) {
        Err((false, _)) => {
            // BEGIN failed: the server went away since the last publish.
            *slot = Some((pid, url.to_owned(), connect_blocking(url)?));
            insert(
                &mut slot.as_mut().expect("connected above").2,
                channel,
                event_id,
                event,
            )
        }
        other => other,
    };
    result.map_err(|(_, e)| {
        *slot = None;
        e
    })
}

/// Err((began, message)): `began` tells whether BEGIN had succeeded.
fn insert(
    client: &mut postgres::Client,
    channel: &str,
    event_id: Option<&str>,
    event: &[u8],
) -> Result<i64, (bool, String)> {
    let mut tx = client.transaction().map_err(|e| (false, db_message(&e)))?;
    let run = |tx: &mut postgres::Transaction<'_>| -> Result<i64, postgres::Error> {
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PUBLISH_LOCK])?;
        let id: i64 = tx
            .query_one(
                "INSERT INTO threaded_proxy_events (channel, event_id, payload) VALUES ($1, $2, $3) RETURNING id",
                &[&channel, &event_id, &event],
            )?
            .get(0);
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&NOTIFY_CHANNEL, &notification(id, channel, event_id, event)],
        )?;
        if id % 1000 == 0 {
            tx.execute(
                &format!(
                    "DELETE FROM threaded_proxy_events WHERE created_at < now() - interval '{RETENTION}'"
                ),
                &[],
            )?;
        }
        Ok(id)
    };
    let id = run(&mut tx).map_err(|e| (true, db_message(&e)))?;
    tx.commit().map_err(|e| (true, db_message(&e)))?;
    Ok(id)
}

/// Starts this process's listener for `url` unless one runs (one per
/// process; a second url is refused).
pub fn ensure_listener(
    runtime: &tokio::runtime::Runtime,
    hub: &'static Hub,
    url: &str,
) -> Result<(), String> {
    let mut listening = hub.listening.lock().unwrap_or_else(|e| e.into_inner());
    match &*listening {
        Some(running) if running == url => return Ok(()),
        Some(running) => {
            return Err(format!(
                "already listening on {running}; events_url cannot change"
            ))
        }
        None => {}
    }
    let mut config = tokio_postgres::Config::from_str(url).map_err(|e| format!("events_url: {e}"))?;
    config.connect_timeout(Duration::from_secs(5));
    config.application_name("threaded-proxy events listener");
    *listening = Some(url.to_owned());
    runtime.spawn(listen(hub, config));
    Ok(())
}

/// Connects, LISTENs and fans out for ever, connecting again (100 ms to 2 s
/// apart) whenever the connection is lost.
async fn listen(hub: &'static Hub, config: tokio_postgres::Config) {
    let mut last: Option<i64> = None;
    let mut pause = Duration::from_millis(100);
    loop {
        // A session ends only when its connection was lost or refused
        // (an error or the server closing it): both count.
        let _ = session(hub, &config, &mut last, &mut pause).await;
        hub.stats.listener_errors.fetch_add(1, Relaxed);
        hub.stats.listener_alive.store(0, Relaxed);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

async fn session(
    hub: &'static Hub,
    config: &tokio_postgres::Config,
    last: &mut Option<i64>,
    pause: &mut Duration,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(tokio_postgres::NoTls).await?;
    let (notices, mut received) = tokio::sync::mpsc::unbounded_channel();
    // The connection must be polled for queries to progress; it hands the
    // notifications over and ends (closing the channel) when the server goes.
    let driver = tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let AsyncMessage::Notification(n) = message {
                if notices.send(n.payload().to_owned()).is_err() {
                    break;
                }
            }
        }
    });
    let result = async {
        client
            .batch_execute(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock({SCHEMA_LOCK}); {SCHEMA} COMMIT; LISTEN {NOTIFY_CHANNEL};"
            ))
            .await?;
        // After LISTEN: anything committed from now on is notified, anything
        // before is in the table (a row in both is skipped by id).
        match *last {
            None => {
                let max: i64 = client
                    .query_one("SELECT coalesce(max(id), 0) FROM threaded_proxy_events", &[])
                    .await?
                    .get(0);
                *last = Some(max);
            }
            Some(from) => {
                for row in client
                    .query(
                        "SELECT id, channel, event_id, payload FROM threaded_proxy_events WHERE id > $1 ORDER BY id",
                        &[&from],
                    )
                    .await?
                {
                    let (id, channel, event_id, payload): (i64, String, Option<String>, Vec<u8>) =
                        (row.get(0), row.get(1), row.get(2), row.get(3));
                    hub.publish(&channel, Bytes::from(payload), event_id.as_deref(), hub.replay());
                    hub.stats.caught_up.fetch_add(1, Relaxed);
                    *last = Some(id);
                }
            }
        }
        hub.stats.listener_alive.store(1, Relaxed);
        *pause = Duration::from_millis(100);
        while let Some(text) = received.recv().await {
            let Some(notice) = parse_notification(&text) else { continue };
            if last.is_some_and(|l| notice.id <= l) {
                continue;
            }
            let (channel, event_id, event) = match notice.inline {
                Some(inline) => inline,
                None => {
                    let Some(row) = client
                        .query_opt(
                            "SELECT channel, event_id, payload FROM threaded_proxy_events WHERE id = $1",
                            &[&notice.id],
                        )
                        .await?
                    else {
                        continue;
                    };
                    (row.get(0), row.get(1), Bytes::from(row.get::<_, Vec<u8>>(2)))
                }
            };
            hub.publish(&channel, event, event_id.as_deref(), hub.replay());
            *last = Some(notice.id);
        }
        Ok(())
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_text_events_travel_inline_and_round_trip() {
        let text = notification(42, "task:1", Some("7"), b"id: 7\ndata: a b\n\n");
        assert_eq!(text, "42 6 1 task:17id: 7\ndata: a b\n\n");
        let notice = parse_notification(&text).unwrap();
        assert_eq!(
            notice,
            Notice {
                id: 42,
                inline: Some((
                    "task:1".into(),
                    Some("7".into()),
                    Bytes::from_static(b"id: 7\ndata: a b\n\n")
                ))
            }
        );
        let text = notification(3, "c", None, b"data: x\n\n");
        assert_eq!(parse_notification(&text).unwrap().inline.unwrap().1, None);
    }

    #[test]
    fn large_or_binary_events_send_only_the_id() {
        assert_eq!(notification(9, "c", None, &vec![b'x'; INLINE_MAX]), "9");
        assert_eq!(notification(9, "c", None, b"\xff\xfe"), "9");
        assert_eq!(parse_notification("9"), Some(Notice { id: 9, inline: None }));
        assert_eq!(parse_notification("nine"), None);
    }
}
