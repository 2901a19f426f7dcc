//! After routing: connect to the remote (refused connects retried), send
//! the reply to the client and the buffer (or the block's `data:`) to the
//! remote (`connect`, in the routing task), then join the two sockets both
//! ways until both have closed (`Joined::run`, in a task of its own).
//! No byte goes to Ruby from here on. On Linux the bytes move with
//! splice(2) (`crate::splice`), elsewhere (or with zero copy off) through
//! a buffer; half-closes are passed on either way, and
//! `inactivity_timeout` counts silence in both directions together.

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{Job, Machine, MachineStats, Remote};
use crate::splice::{Filled, Pipe};

/// Per direction when copying (splice uses a pipe instead).
const COPY_BUFFER: usize = 64 * 1024;

/// How a join ended, when not by both sides closing.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Inactive,
    /// A reset or broken pipe: a side that left, not an error of ours.
    Failed,
}

/// A routed connection whose remote is connected and has its first bytes:
/// all an idle joined connection holds, in a task of its own (the routing
/// task and its larger state are gone by then; issue 18, RSS per idle
/// routed connection).
pub struct Joined {
    /// The accepted connection (its one registration, from accept).
    client: TcpStream,
    /// The connection to the remote.
    upstream: TcpStream,
    /// The remote as the block named it, for `proxy_inactivity_error`.
    address: String,
    /// The answer's `inactivity_timeout`.
    idle: Option<Duration>,
}

/// Connects to the remote, sends the reply to the client and the buffer
/// (or `data:`) to the remote; None when any of it failed (a connect error
/// is counted and reported here).
pub async fn connect(
    machine: &Machine,
    mut client: TcpStream,
    buffer: Bytes,
    mut remote: Remote,
) -> Option<Joined> {
    let stats = &machine.stats;
    let Some(mut upstream) = Box::pin(connect_remote(machine, &remote)).await else {
        stats.connect_errors.fetch_add(1, Relaxed);
        machine.notify(Job::ConnectError {
            remote: remote.address,
        });
        return None;
    };
    let _ = upstream.set_nodelay(true);
    if let Some(reply) = remote.reply.take() {
        client.write_all(&reply).await.ok()?;
        stats.bytes_to_client.fetch_add(reply.len() as u64, Relaxed);
    }
    let first = remote.data.take().unwrap_or(buffer);
    upstream.write_all(&first).await.ok()?;
    stats.bytes_to_remote.fetch_add(first.len() as u64, Relaxed);
    Some(Joined {
        client,
        upstream,
        address: remote.address,
        idle: remote.inactivity_timeout,
    })
}

impl Joined {
    /// Both ways until both sides closed, one failed or the connection was
    /// inactive too long (counted and reported).
    pub async fn run(self, machine: &Machine) {
        if both_ways(machine, &self.client, &self.upstream, self.idle).await == Err(End::Inactive) {
            machine.stats.inactivity_cuts.fetch_add(1, Relaxed);
            machine.notify(Job::Inactivity { remote: self.address });
        }
    }
}

/// Tries `connect_tries` times while the remote refuses; a timeout or any
/// other failure ends at once.
async fn connect_remote(machine: &Machine, remote: &Remote) -> Option<TcpStream> {
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

/// How one direction carries its bytes from one socket to the other.
enum Carrier {
    /// Nothing carried yet: a direction that has been silent since the
    /// join began holds neither a pipe nor a buffer (issue 18, RSS per
    /// idle routed connection).
    Empty,
    /// Through the kernel by splice(2). Kept once made: making one for each
    /// burst would cost four syscalls every time a busy join catches up.
    Pipe(Pipe),
    /// Through user space (zero copy off, no descriptor for a pipe, not
    /// Linux). Freed as soon as it is empty and the source has nothing
    /// more, so an idle joined connection holds no buffer.
    Buffer {
        /// `COPY_BUFFER` bytes.
        bytes: Box<[u8]>,
        /// Where the queued bytes begin (they were read to the end of the
        /// previous ones and are written from here).
        start: usize,
    },
}

/// What the source socket of a direction can still give.
#[derive(Debug, PartialEq, Eq)]
enum Source {
    Open,
    /// EOF: once the queued bytes are out, the destination is shut down
    /// for writing (the half-close passed on).
    Ended,
    /// A reset or another read error: the queued bytes still go out, then
    /// the join ends.
    Failed,
}

/// One direction of a join: `from` → `to` until `from`'s EOF. It waits on
/// the readiness of the sockets the join owns (their one registration
/// each: the read side of `from`, the write side of `to`).
struct Way<'a> {
    /// Read until EOF (its read readiness is this direction's).
    from: &'a TcpStream,
    /// Written, then shut down for writing (its write readiness is this
    /// direction's).
    to: &'a TcpStream,
    /// This direction's byte counter in the machine's stats (to the remote
    /// or to the client).
    count: &'a AtomicU64,
    /// Where the bytes read wait to be written.
    carrier: Carrier,
    /// Bytes taken from `from` and not yet given to `to` (in the pipe or
    /// the buffer).
    queued: usize,
    /// Whether to read on, and how the direction ends once drained.
    source: Source,
    /// The pipe's page slots ran out before its bytes ([`Filled::PipeFull`]):
    /// no fill until a drain frees some (`from`'s readiness was kept).
    pipe_full: bool,
}

impl<'a> Way<'a> {
    fn new(from: &'a TcpStream, to: &'a TcpStream, count: &'a AtomicU64) -> Way<'a> {
        Way {
            from,
            to,
            count,
            carrier: Carrier::Empty,
            queued: 0,
            source: Source::Open,
            pipe_full: false,
        }
    }

    /// Moves what both sockets allow now; `Ready(Ok)` once `from` ended and
    /// all of it reached `to` (then shut down for writing). Sets `moved`
    /// when a byte reached `to`. Reading and writing overlap: the pipe or
    /// buffer takes more from `from` while `to` is full.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        stats: &MachineStats,
        moved: &mut bool,
    ) -> Poll<Result<(), End>> {
        loop {
            let mut again = false;
            if self.source == Source::Open && self.has_room() {
                if let Poll::Ready(ready) = self.from.poll_read_ready(cx) {
                    match ready.and_then(|()| self.fill()) {
                        Ok(0) => self.source = Source::Ended,
                        Ok(n) => self.queued += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.release_buffer(),
                        Err(_) => self.source = Source::Failed,
                    }
                    // Ready again, or not ready any more: polled again to
                    // know which (and to leave a waker if not).
                    again = true;
                }
            }
            if self.queued > 0 {
                if let Poll::Ready(ready) = self.to.poll_write_ready(cx) {
                    match ready.and_then(|()| self.drain()) {
                        Ok(0) => return Poll::Ready(Err(End::Failed)),
                        Ok(n) => {
                            self.queued -= n;
                            self.pipe_full = false;
                            self.count.fetch_add(n as u64, Relaxed);
                            if matches!(self.carrier, Carrier::Pipe(_)) {
                                stats.bytes_spliced.fetch_add(n as u64, Relaxed);
                            }
                            *moved = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => return Poll::Ready(Err(End::Failed)),
                    }
                    again = true;
                }
            }
            if self.queued == 0 && self.source != Source::Open {
                if self.source == Source::Failed {
                    return Poll::Ready(Err(End::Failed));
                }
                let _ = socket2::SockRef::from(self.to).shutdown(std::net::Shutdown::Write);
                return Poll::Ready(Ok(()));
            }
            if !again {
                return Poll::Pending;
            }
        }
    }

    fn has_room(&self) -> bool {
        match &self.carrier {
            Carrier::Empty => true,
            Carrier::Pipe(pipe) => !self.pipe_full && self.queued < pipe.capacity(),
            Carrier::Buffer { bytes, start } => start + self.queued < bytes.len(),
        }
    }

    /// `from` → carrier, without waiting (`WouldBlock` when `from` has
    /// nothing; 0 at EOF). The carrier is made on first use: a pipe if one
    /// is to be had, else a buffer.
    fn fill(&mut self) -> io::Result<usize> {
        let from = self.from;
        if matches!(self.carrier, Carrier::Empty) {
            // Readiness may be left over from routing's last read: a peek
            // tells that from bytes (or EOF) before a pipe is made for it.
            let mut byte = [std::mem::MaybeUninit::uninit()];
            if from.try_io(Interest::READABLE, || {
                socket2::SockRef::from(from).peek(&mut byte)
            })? == 0
            {
                return Ok(0);
            }
            self.carrier = match Pipe::new() {
                Ok(pipe) => Carrier::Pipe(pipe),
                Err(_) => Carrier::Buffer {
                    bytes: vec![0; COPY_BUFFER].into_boxed_slice(),
                    start: 0,
                },
            };
        }
        match &mut self.carrier {
            Carrier::Empty => unreachable!("a carrier was just made"),
            Carrier::Pipe(pipe) => match pipe.fill(from, pipe.capacity() - self.queued, self.queued)? {
                Filled::Bytes(n) => Ok(n),
                Filled::PipeFull => {
                    // Nothing to read until a drain frees a slot.
                    self.pipe_full = true;
                    Err(io::ErrorKind::WouldBlock.into())
                }
            },
            Carrier::Buffer { bytes, start } => from.try_read(&mut bytes[*start + self.queued..]),
        }
    }

    /// Carrier → `to`, without waiting (`WouldBlock` when `to` is full).
    fn drain(&mut self) -> io::Result<usize> {
        let to = self.to;
        let queued = self.queued;
        match &mut self.carrier {
            Carrier::Empty => unreachable!("bytes are queued in a carrier"),
            Carrier::Pipe(pipe) => to.try_io(Interest::WRITABLE, || pipe.drain(to.as_raw_fd(), queued)),
            Carrier::Buffer { bytes, start } => {
                let n = to.try_write(&bytes[*start..*start + queued])?;
                // Emptied: the next read starts at the front again.
                *start = if n == queued { 0 } else { *start + n };
                Ok(n)
            }
        }
    }

    /// Frees an empty buffer (`from` has nothing more for now); a pipe is
    /// kept (see [`Carrier::Pipe`]).
    fn release_buffer(&mut self) {
        if self.queued == 0 && matches!(self.carrier, Carrier::Buffer { .. }) {
            self.carrier = Carrier::Empty;
        }
    }
}

/// Both directions until both ended, a failure ends both (a client that
/// resets would otherwise leave the remote, still waiting for bytes,
/// joined to nobody until the inactivity limit), or `idle` passed with no
/// byte moved either way.
async fn both_ways(
    machine: &Machine,
    client: &TcpStream,
    upstream: &TcpStream,
    idle: Option<Duration>,
) -> Result<(), End> {
    let stats = &machine.stats;
    let mut ways = [
        Way::new(client, upstream, &stats.bytes_to_remote),
        Way::new(upstream, client, &stats.bytes_to_client),
    ];
    let mut done = [false; 2];
    // One timer for both directions, none without a limit, and not reset
    // for every byte: when it fires, the silence is measured from the last
    // byte moved, and the timer set again if that was less than `idle` ago.
    let mut silence = idle.map(|idle| (idle, Box::pin(tokio::time::sleep(idle))));
    let mut last_moved = Instant::now();
    std::future::poll_fn(|cx| {
        let mut moved = false;
        for (way, done) in ways.iter_mut().zip(&mut done) {
            if !*done {
                match way.poll(cx, stats, &mut moved) {
                    Poll::Ready(Ok(())) => *done = true,
                    Poll::Ready(Err(end)) => return Poll::Ready(Err(end)),
                    Poll::Pending => {}
                }
            }
        }
        if done == [true, true] {
            return Poll::Ready(Ok(()));
        }
        if moved {
            last_moved = Instant::now();
        }
        if let Some((idle, timer)) = &mut silence {
            while timer.as_mut().poll(cx).is_ready() {
                let deadline = last_moved + *idle;
                if deadline <= Instant::now() {
                    return Poll::Ready(Err(End::Inactive));
                }
                timer.as_mut().reset(deadline);
            }
        }
        Poll::Pending
    })
    .await
}
