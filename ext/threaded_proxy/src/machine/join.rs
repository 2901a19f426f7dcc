//! After routing: connect to the remote (refused connects retried), send
//! the reply to the client and the buffer (or the block's `data:`) to the
//! remote, then join the two sockets both ways until both have closed.
//! No byte goes to Ruby from here on. On Linux the bytes move with
//! splice(2) (`crate::splice`), elsewhere (or with zero copy off) through
//! a buffer; half-closes are passed on either way, and
//! `inactivity_timeout` counts silence in both directions together.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{Job, Machine, Remote};
use crate::splice::{SpliceEnd, Spliced, Splicer};

/// Per direction when copying (splice uses a pipe instead).
const COPY_BUFFER: usize = 64 * 1024;

/// "No inactivity limit", still a finite duration for tokio's timers.
const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);

/// How a join ended, when not by both sides closing.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Inactive,
    /// A reset or broken pipe: a side that left, not an error of ours.
    Failed,
}

pub async fn run(machine: &Machine, mut client: TcpStream, buffer: Bytes, mut remote: Remote) {
    let stats = &machine.stats;
    let Some(mut upstream) = Box::pin(connect(machine, &remote)).await else {
        stats.connect_errors.fetch_add(1, Relaxed);
        machine.notify(Job::ConnectError {
            remote: remote.address,
        });
        return;
    };
    let _ = upstream.set_nodelay(true);
    if let Some(reply) = remote.reply.take() {
        if client.write_all(&reply).await.is_err() {
            return;
        }
        stats.bytes_to_client.fetch_add(reply.len() as u64, Relaxed);
    }
    // Taken, so the buffer is freed once sent: an idle joined connection
    // then holds no user-space buffer at all.
    let first = remote.data.take().unwrap_or(buffer);
    if upstream.write_all(&first).await.is_err() {
        return;
    }
    stats.bytes_to_remote.fetch_add(first.len() as u64, Relaxed);
    drop(first);
    let idle = remote.inactivity_timeout;
    // Each way boxed on its own: an idle joined connection holds the state
    // of the one it runs, not of the larger of the two (they are awaited
    // in one future, whose size is that of its largest state).
    let spliced = Box::pin(both_ways_spliced(machine, &client, &upstream, idle)).await;
    let end = match spliced {
        Ok(end) => end,
        // No pipe to be had, or zero copy switched off: copy instead.
        Err(_) => Box::pin(both_ways_copied(machine, &mut client, upstream, idle)).await,
    };
    if end == Err(End::Inactive) {
        stats.inactivity_cuts.fetch_add(1, Relaxed);
        machine.notify(Job::Inactivity {
            remote: remote.address,
        });
    }
}

/// Tries `connect_tries` times while the remote refuses; a timeout or any
/// other failure ends at once.
async fn connect(machine: &Machine, remote: &Remote) -> Option<TcpStream> {
    let settings = &machine.settings;
    let limit = remote.connect_timeout.unwrap_or(settings.connect_timeout);
    for attempt in 1..=settings.connect_tries.max(1) {
        match tokio::time::timeout(limit, TcpStream::connect(remote.address.as_str())).await {
            Ok(Ok(stream)) => return Some(stream),
            Ok(Err(e))
                if e.kind() == io::ErrorKind::ConnectionRefused && attempt < settings.connect_tries =>
            {
                if attempt == 1 {
                    machine.log(format!(
                        "{} refused the connection; trying {} more times",
                        remote.address,
                        settings.connect_tries - 1
                    ));
                }
                machine.stats.connect_retries.fetch_add(1, Relaxed);
                tokio::time::sleep(settings.connect_retry_delay).await;
            }
            Ok(Err(e)) => {
                machine.log(format!(
                    "cannot connect to {} ({e}) after {attempt} tries",
                    remote.address
                ));
                return None;
            }
            Err(_) => {
                machine.log(format!(
                    "connecting to {} timed out after {limit:?}",
                    remote.address
                ));
                return None;
            }
        }
    }
    None
}

/// The last time a byte moved either way.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Relaxed);
    }

    /// Resolves once nothing moved for `idle` (never for None).
    async fn silent_for(&self, idle: Option<Duration>) {
        let Some(idle) = idle else {
            return std::future::pending().await;
        };
        loop {
            let deadline = self.start + Duration::from_millis(self.last_ms.load(Relaxed)) + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Both directions by splice(2); `Err` when splicing is not available here
/// (nothing was moved yet, so the caller may copy instead).
async fn both_ways_spliced(
    machine: &Machine,
    client: &TcpStream,
    upstream: &TcpStream,
    idle: Option<Duration>,
) -> io::Result<Result<(), End>> {
    let to_upstream = Splicer::new(upstream.as_raw_fd())?;
    let to_client = Splicer::new(client.as_raw_fd())?;
    let stats = &machine.stats;
    let activity = Activity::new();
    let up = one_way(
        machine,
        &activity,
        to_upstream,
        client,
        upstream,
        &stats.bytes_to_remote,
    );
    let down = one_way(
        machine,
        &activity,
        to_client,
        upstream,
        client,
        &stats.bytes_to_client,
    );
    Ok(tokio::select! {
        joined = async { tokio::try_join!(up, down) } => joined.map(|_| ()),
        _ = activity.silent_for(idle) => Err(End::Inactive),
    })
}

/// What one spliced direction counts: its bytes, the machine's spliced
/// total, and the activity that keeps the connection from going inactive.
struct OneWay<'a> {
    /// The machine whose stats count spliced bytes.
    machine: &'a Machine,
    /// The inactivity clock both directions share.
    activity: &'a Activity,
    /// This direction's byte counter (to the remote or to the client).
    count: &'a AtomicU64,
}

impl Spliced for OneWay<'_> {
    fn spliced(&self, n: u64) {
        self.activity.touch();
        self.count.fetch_add(n, Relaxed);
        self.machine.stats.bytes_spliced.fetch_add(n, Relaxed);
    }
}

/// `from` → `to` until `from`'s EOF, which is passed on as a half-close.
async fn one_way(
    machine: &Machine,
    activity: &Activity,
    splicer: Splicer,
    from: &TcpStream,
    to: &TcpStream,
    count: &AtomicU64,
) -> Result<(), End> {
    let moved = OneWay {
        machine,
        activity,
        count,
    };
    match splicer.copy(from, u64::MAX, FOREVER, &moved).await {
        Err(SpliceEnd::OriginClosed(_)) | Ok(()) => {
            let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
            Ok(())
        }
        Err(_) => Err(End::Failed),
    }
}

/// Both directions through a user-space buffer. Not `crate::tunnel::run`:
/// that one waits for both directions even after one failed, and a client
/// that resets would leave the remote (still waiting for bytes) joined to
/// nobody until the inactivity limit; here a failure ends both.
async fn both_ways_copied(
    machine: &Machine,
    client: &mut TcpStream,
    mut upstream: TcpStream,
    idle: Option<Duration>,
) -> Result<(), End> {
    let activity = Activity::new();
    let stats = &machine.stats;
    let (mut client_rd, mut client_wr) = client.split();
    let (mut upstream_rd, mut upstream_wr) = upstream.split();
    let up = copy_one_way(
        &activity,
        &mut client_rd,
        &mut upstream_wr,
        &stats.bytes_to_remote,
    );
    let down = copy_one_way(
        &activity,
        &mut upstream_rd,
        &mut client_wr,
        &stats.bytes_to_client,
    );
    tokio::select! {
        joined = async { tokio::try_join!(up, down) } => joined.map(|_| ()),
        _ = activity.silent_for(idle) => Err(End::Inactive),
    }
}

/// Reads `from` until EOF, writes it all to `to`, then shuts `to` down.
async fn copy_one_way<R, W>(
    activity: &Activity,
    from: &mut R,
    to: &mut W,
    count: &AtomicU64,
) -> Result<(), End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let n = from.read(&mut buf).await.map_err(|_| End::Failed)?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        to.write_all(&buf[..n]).await.map_err(|_| End::Failed)?;
        activity.touch();
        count.fetch_add(n as u64, Relaxed);
    }
}
