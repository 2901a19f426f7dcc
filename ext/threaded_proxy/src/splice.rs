//! Moving a plain-HTTP body of known length from the origin socket to the
//! client socket with splice(2): the bytes pass through a pipe inside the
//! kernel and never into user space. Only a body the proxy relays unchanged
//! qualifies (known length, no re-framing, no TLS on either side).
//!
//! splice(2) and pipe sizing exist on Linux only. Elsewhere, and on Linux
//! when zero copy is switched off (`zero_copy = false`, or
//! THREADED_PROXY_ZERO_COPY=0: see `runtime::Settings`), `Splicer::new`
//! refuses and the exchange copies the body, the same path either way, so the
//! path a Mac takes is the one CI runs with the switch.
//!
//! The machine's joins use [`Pipe`] alone: they drive readiness on the
//! sockets they own (one registration each), where an exchange's client
//! socket is registered by its split halves and needs the splicer's own.

use std::io;
use std::os::fd::RawFd;
#[cfg(target_os = "linux")]
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

#[cfg(target_os = "linux")]
use tokio::io::unix::AsyncFd;
#[cfg(target_os = "linux")]
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::errors::ProxyError;
#[cfg(target_os = "linux")]
use crate::handoff;
use crate::stats::Meter;

/// What a splice reports as each piece reaches the destination: an
/// exchange's `Meter` (origin and client bytes, stats).
pub trait Spliced {
    fn spliced(&self, n: u64);
}

impl Spliced for Meter {
    fn spliced(&self, n: u64) {
        Meter::spliced(self, n)
    }
}

/// Bodies below this size are copied: a pipe and a second registration of
/// the client socket cost more than copying a few pages.
pub const MIN_BODY: u64 = 128 * 1024;
/// Asked of the kernel per pipe (it may give less; the default is 64 KiB).
#[cfg(target_os = "linux")]
const PIPE_SIZE: i32 = 1024 * 1024;

/// How a splice stopped early.
#[derive(Debug)]
pub enum SpliceEnd {
    /// The origin closed with this many body bytes still to come.
    OriginClosed(u64),
    OriginIdle,
    OriginFailed(io::Error),
    ClientIdle,
    ClientFailed(io::Error),
}

impl SpliceEnd {
    /// The exchange's error for this end (the same as for a copied body).
    pub fn into_error(self, url: &str, idle: Duration) -> ProxyError {
        let url = url.to_owned();
        match self {
            SpliceEnd::OriginClosed(left) => ProxyError::Upstream {
                url,
                message: format!("origin closed the connection with {left} body bytes still to come"),
                errno: None,
            },
            SpliceEnd::OriginIdle => ProxyError::Timeout {
                url,
                phase: "waiting for the response body",
            },
            SpliceEnd::OriginFailed(e) => ProxyError::Upstream {
                url,
                message: format!("reading the response body: {e}"),
                errno: e.raw_os_error(),
            },
            SpliceEnd::ClientIdle => ProxyError::client_idle(idle),
            SpliceEnd::ClientFailed(e) => ProxyError::client(&e),
        }
    }
}

/// A pipe for splice(2): the kernel buffer bytes pass through between two
/// sockets.
#[cfg(target_os = "linux")]
pub struct Pipe {
    /// Where spliced bytes are taken out (towards the destination).
    read: OwnedFd,
    /// Where spliced bytes are put in (from the source).
    write: OwnedFd,
    /// The most bytes it holds (the kernel's answer to [`PIPE_SIZE`]):
    /// filling asks for no more, so a full pipe never blocks a splice in.
    capacity: usize,
}

#[cfg(target_os = "linux")]
impl Pipe {
    /// Fails when zero copy is switched off or no descriptor is left (the
    /// caller copies instead).
    pub fn new() -> io::Result<Pipe> {
        if !crate::runtime::zero_copy() {
            return Err(io::ErrorKind::Unsupported.into());
        }
        Pipe::sized(PIPE_SIZE)
    }

    /// A pipe asked to hold `size` bytes.
    fn sized(size: i32) -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are fresh and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ / F_GETPIPE_SZ only act on our own pipe; a
        // refusal (over the user's pipe budget) leaves the default size.
        let capacity = unsafe {
            libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size);
            libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ)
        };
        Ok(Pipe {
            read,
            write,
            capacity: usize::try_from(capacity).unwrap_or(64 * 1024).max(4096),
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Socket `from` → pipe, at most `want` bytes, without waiting, through
    /// `from`'s read readiness; `queued` is what the pipe holds now.
    /// `WouldBlock` (readiness cleared) when `from` has nothing. splice(2)
    /// also refuses with EAGAIN when the pipe's page slots ran out before
    /// its bytes did (many small segments, a page slot each); clearing
    /// readiness then would wait for bytes the origin may never send
    /// again, so a refusal while the pipe holds bytes and `from` has data
    /// is [`Filled::PipeFull`], readiness kept: fill again once a drain
    /// freed slots. (An empty pipe refusing with data unread happens too,
    /// briefly, under load; there no drain would come, so it is
    /// `WouldBlock`, and the data's arrival sets readiness again.)
    pub fn fill(&self, from: &TcpStream, want: usize, queued: usize) -> io::Result<Filled> {
        let fd = from.as_raw_fd();
        let mut pipe_full = false;
        let filled = from.try_io(Interest::READABLE, || {
            match splice(fd, self.write.as_raw_fd(), want) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && queued > 0 && unread(fd) > 0 => {
                    pipe_full = true;
                    Ok(0)
                }
                other => other,
            }
        })?;
        Ok(if pipe_full {
            Filled::PipeFull
        } else {
            Filled::Bytes(filled)
        })
    }

    /// Pipe → socket `to`, at most `queued` bytes (what the pipe holds),
    /// without waiting: `WouldBlock` when `to` takes nothing now.
    pub fn drain(&self, to: RawFd, queued: usize) -> io::Result<usize> {
        splice(self.read.as_raw_fd(), to, queued)
    }
}

/// Bytes a socket holds unread (FIONREAD); 0 when it cannot tell.
#[cfg(target_os = "linux")]
fn unread(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer we pass; `fd` is
    // open for the call (the caller's borrowed socket).
    let ok = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } == 0;
    if ok {
        usize::try_from(n).unwrap_or(0)
    } else {
        0
    }
}

/// A pipe and a writable-readiness registration of the client socket, for
/// one body.
#[cfg(target_os = "linux")]
pub struct Splicer {
    /// The body's way through the kernel.
    pipe: Pipe,
    /// A duplicate of the client's descriptor: the exchange's own
    /// registration belongs to its split halves, and epoll takes a second
    /// one only under another descriptor.
    client: AsyncFd<OwnedFd>,
}

#[cfg(target_os = "linux")]
impl Splicer {
    /// Fails (and the body is copied instead) when zero copy is switched
    /// off or no descriptor is left for the pipe.
    pub fn new(client_fd: RawFd) -> io::Result<Splicer> {
        let pipe = Pipe::new()?;
        let duplicate = handoff::duplicate(client_fd)?;
        // SAFETY: the AsyncFd owns the duplicate, so the descriptor stays
        // open and names the same socket until the AsyncFd is dropped.
        let client = unsafe { AsyncFd::register_with_interest(duplicate, Interest::WRITABLE) }
            .map_err(io::Error::from)?;
        Ok(Splicer { pipe, client })
    }

    /// Moves exactly `length` bytes from `origin` to the client, counting
    /// every piece that reached the client in `meter`. Reading the origin and
    /// writing the client overlap (the pipe is the buffer between them); the
    /// exchange fails when neither moves for `idle`.
    pub async fn copy(
        &self,
        origin: &TcpStream,
        length: u64,
        idle: Duration,
        meter: &impl Spliced,
    ) -> Result<(), SpliceEnd> {
        let mut to_read = length;
        let mut in_pipe = 0usize;
        // Set when the origin ended early: what is in the pipe still goes
        // out before the exchange fails.
        let mut origin_end = None;
        // The pipe's slots ran out (see `Pipe::fill`): no fill until a
        // drain frees some.
        let mut pipe_full = false;
        while (to_read > 0 && origin_end.is_none()) || in_pipe > 0 {
            let want = match origin_end {
                None if !pipe_full => to_read.min((self.pipe.capacity - in_pipe) as u64) as usize,
                _ => 0,
            };
            tokio::select! {
                biased;
                drained = self.drain(in_pipe), if in_pipe > 0 => match drained {
                    Ok(n) => {
                        in_pipe -= n;
                        pipe_full = false;
                        meter.spliced(n as u64);
                    }
                    Err(e) => return Err(SpliceEnd::ClientFailed(e)),
                },
                filled = self.fill(origin, want, in_pipe), if want > 0 => match filled {
                    Ok(Filled::Bytes(0)) => origin_end = Some(SpliceEnd::OriginClosed(to_read)),
                    Ok(Filled::Bytes(n)) => {
                        in_pipe += n;
                        to_read -= n as u64;
                    }
                    Ok(Filled::PipeFull) => pipe_full = true,
                    Err(e) => origin_end = Some(SpliceEnd::OriginFailed(e)),
                },
                _ = tokio::time::sleep(idle) => {
                    // A full pipe waits on the client; an empty one on the origin.
                    return Err(if in_pipe > 0 { SpliceEnd::ClientIdle } else { SpliceEnd::OriginIdle });
                }
            }
        }
        origin_end.map_or(Ok(()), Err)
    }

    /// Origin socket → pipe (holding `in_pipe`), once the socket has data:
    /// 0 at EOF.
    async fn fill(&self, origin: &TcpStream, want: usize, in_pipe: usize) -> io::Result<Filled> {
        loop {
            origin.readable().await?;
            match self.pipe.fill(origin, want, in_pipe) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }

    /// Pipe → client socket, once it takes more.
    async fn drain(&self, in_pipe: usize) -> io::Result<usize> {
        loop {
            let mut ready = self.client.writable().await?;
            let result = ready.try_io(|client| self.pipe.drain(client.as_raw_fd(), in_pipe));
            match result {
                Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(other) => return other,
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(target_os = "linux")]
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the call's duration (owned by
    // the caller's borrowed values); null offsets mean "the file position",
    // as required for pipes and sockets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// What [`Pipe::fill`] moved.
#[derive(Debug, PartialEq, Eq)]
pub enum Filled {
    /// This many bytes into the pipe; 0 at the socket's EOF.
    Bytes(usize),
    /// Nothing: the pipe has no page slot left, though it has bytes of
    /// room and the socket has data. It holds bytes, so a drain comes.
    PipeFull,
}

/// Without splice(2) there is never a pipe: `new` refuses, so the machine
/// copies, and the other methods cannot be reached (no value exists).
#[cfg(not(target_os = "linux"))]
pub struct Pipe(std::convert::Infallible);

#[cfg(not(target_os = "linux"))]
impl Pipe {
    pub fn new() -> io::Result<Pipe> {
        Err(io::ErrorKind::Unsupported.into())
    }

    pub fn capacity(&self) -> usize {
        match self.0 {}
    }

    pub fn fill(&self, _from: &TcpStream, _want: usize, _queued: usize) -> io::Result<Filled> {
        match self.0 {}
    }

    pub fn drain(&self, _to: RawFd, _queued: usize) -> io::Result<usize> {
        match self.0 {}
    }
}

/// Without splice(2) there is never a splicer: `new` refuses, so every body
/// is copied, and `copy` cannot be reached (no value of this type exists).
#[cfg(not(target_os = "linux"))]
pub struct Splicer(std::convert::Infallible);

#[cfg(not(target_os = "linux"))]
impl Splicer {
    pub fn new(_client_fd: RawFd) -> io::Result<Splicer> {
        Err(io::ErrorKind::Unsupported.into())
    }

    pub async fn copy(
        &self,
        _origin: &TcpStream,
        _length: u64,
        _idle: Duration,
        _meter: &impl Spliced,
    ) -> Result<(), SpliceEnd> {
        match self.0 {}
    }
}

/// Like the Linux splicer's pipe, released when the exchange drops it (a
/// no-op here: no value exists); keeps the exchange's `drop(splicer)` the
/// same on every system.
#[cfg(not(target_os = "linux"))]
impl Drop for Splicer {
    fn drop(&mut self) {
        match self.0 {}
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let near = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        (near, listener.accept().await.unwrap().0)
    }

    #[tokio::test]
    async fn a_pipe_out_of_slots_is_full_and_the_socket_stays_ready() {
        let checked = async {
            let (mut sender, from) = pair().await;
            let (sink, _sink_peer) = pair().await;
            // More than a one-page pipe can hold in any number of slots.
            let writer = tokio::spawn(async move {
                let _ = sender.write_all(&vec![7u8; 256 * 1024]).await;
                sender
            });
            let pipe = Pipe::sized(4096).unwrap();
            let mut filled = 0;
            loop {
                from.readable().await.unwrap();
                match pipe.fill(&from, 256 * 1024, filled) {
                    Ok(Filled::Bytes(n)) => {
                        assert!(n > 0, "EOF from a sender still sending");
                        filled += n;
                    }
                    Ok(Filled::PipeFull) => break,
                    // Not arrived yet: readiness cleared, the next bytes set it.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("fill: {e}"),
                }
            }
            assert!(filled > 0 && filled <= pipe.capacity());
            // The socket still has data, and says so: a cleared readiness
            // would wait here for bytes the sender may never send.
            assert!(unread(from.as_raw_fd()) > 0);
            let still_ready = tokio::time::timeout(Duration::ZERO, from.readable()).await;
            assert!(still_ready.is_ok(), "read readiness was cleared");
            // A drain frees the slots; the next fill moves bytes again.
            sink.writable().await.unwrap();
            let left = filled - pipe.drain(sink.as_raw_fd(), filled).unwrap();
            assert!(left < filled);
            assert!(matches!(pipe.fill(&from, 256 * 1024, left), Ok(Filled::Bytes(n)) if n > 0));
            writer.abort();
        };
        tokio::time::timeout(Duration::from_secs(10), checked)
            .await
            .expect("the fill waited for readiness it had cleared");
    }
}
