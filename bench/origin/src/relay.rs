//! `bench-origin --relay-to HOST:PORT`: a bare TCP relay, the benchmark's
//! yardstick for what one proxy hop costs on this machine.
//!
//! Why it exists: the 1 GiB target compares proxy_fetch with the direct path,
//! but any proxy adds a hop (a third process and two more TCP streams on the
//! same 2 cores). This relay is about the least a user-space hop can do: no
//! HTTP, no runtime, no Ruby; each direction is one thread moving bytes
//! socket → pipe → socket with splice(2), so they never enter user space.
//! What it reaches against the direct path bounds what any proxy can reach
//! in the same run.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::thread;

/// As the gem's splice path asks for (ext/threaded_proxy/src/splice.rs).
const PIPE_SIZE: i32 = 1024 * 1024;

/// Accepts for ever (the caller's lifetime timer ends the process); one
/// thread per direction per connection.
pub fn serve(port: u16, upstream: SocketAddr) -> Result<(), String> {
    let listener = TcpListener::bind(("127.0.0.1", port)).map_err(|e| format!("bind: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    println!("LISTENING {local} relay_to={upstream}");
    use std::io::Write;
    let _ = io::stdout().flush();
    accept_loop(listener, upstream);
    Ok(())
}

fn accept_loop(listener: TcpListener, upstream: SocketAddr) {
    for accepted in listener.incoming() {
        match accepted {
            Ok(client) => {
                thread::spawn(move || {
                    if let Err(e) = relay(client, upstream) {
                        eprintln!("bench-origin relay: {e}");
                    }
                });
            }
            Err(e) => {
                eprintln!("bench-origin relay: accept: {e}");
                thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

fn relay(client: TcpStream, upstream: SocketAddr) -> io::Result<()> {
    let origin = TcpStream::connect(upstream)?;
    client.set_nonblocking(true)?;
    origin.set_nonblocking(true)?;
    let (client_in, origin_out) = (client.try_clone()?, origin.try_clone()?);
    let requests = thread::spawn(move || one_way(&client_in, &origin_out));
    let answers = one_way(&origin, &client);
    let requests = requests
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("request thread panicked")));
    answers.and(requests)
}

/// Moves bytes from `from` to `to` until `from` ends, then ends `to`'s
/// sending side so the peer sees the close. One thread, both sockets
/// non-blocking: poll(2) for whichever side can move (the origin has data
/// and the pipe room; the pipe has data and the client room), then splice
/// that side, so reading and writing overlap with the pipe as the buffer.
fn one_way(from: &TcpStream, to: &TcpStream) -> io::Result<()> {
    let (pipe_read, pipe_write, capacity) = pipe()?;
    let result = (|| {
        let (mut in_pipe, mut ended) = (0usize, false);
        while !ended || in_pipe > 0 {
            let read = !ended && in_pipe < capacity;
            let mut fds = [
                poll_fd(from.as_raw_fd(), if read { libc::POLLIN } else { 0 }),
                poll_fd(to.as_raw_fd(), if in_pipe > 0 { libc::POLLOUT } else { 0 }),
            ];
            poll(&mut fds)?;
            // Reported whatever was asked: the peer is gone, and an unasked
            // poll would not wait any more.
            if fds[1].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            if read && fds[0].revents != 0 {
                match splice(from.as_raw_fd(), pipe_write.as_raw_fd(), capacity - in_pipe) {
                    Ok(0) => ended = true,
                    Ok(n) => in_pipe += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            if in_pipe > 0 && fds[1].revents != 0 {
                match splice(pipe_read.as_raw_fd(), to.as_raw_fd(), in_pipe) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => in_pipe -= n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    })();
    let _ = to.shutdown(Shutdown::Write);
    result
}

fn poll_fd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// Waits until one of `fds` is ready (retrying when a signal interrupts).
fn poll(fds: &mut [libc::pollfd; 2]) -> io::Result<()> {
    loop {
        // SAFETY: the array holds two valid pollfds and the count says two.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } >= 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// A non-blocking pipe of PIPE_SIZE (or the kernel's default when refused),
/// with the capacity it got.
fn pipe() -> io::Result<(OwnedFd, OwnedFd, usize)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETPIPE_SZ / F_GETPIPE_SZ only act on our own pipe; a
    // refusal keeps the default.
    let capacity = unsafe {
        libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE);
        libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ)
    };
    Ok((
        read,
        write,
        usize::try_from(capacity).unwrap_or(64 * 1024).max(4096),
    ))
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors stay open for the call (borrowed from values
    // the caller owns); null offsets mean "the file position", as pipes and
    // sockets require.
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::Duration;

    #[test]
    fn relays_both_ways_and_passes_the_close_on() {
        // An origin that reads one request line, answers 3 MiB (more than
        // the pipe holds) and closes.
        let origin = TcpListener::bind("127.0.0.1:0").unwrap();
        let upstream = origin.local_addr().unwrap();
        let body: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
        let answer = [
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes(),
            body,
        ]
        .concat();
        let expected = answer.clone();
        let origin_thread = thread::spawn(move || {
            let (mut conn, _) = origin.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap() == 1 {
                request.push(byte[0]);
            }
            conn.write_all(&answer).unwrap();
            request
        });
        let relay = TcpListener::bind("127.0.0.1:0").unwrap();
        let relay_addr = relay.local_addr().unwrap();
        thread::spawn(move || accept_loop(relay, upstream));

        let mut client = TcpStream::connect(relay_addr).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        client
            .write_all(b"GET /bytes HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        let mut received = Vec::new();
        client.read_to_end(&mut received).unwrap();
        assert_eq!(
            origin_thread.join().unwrap(),
            b"GET /bytes HTTP/1.1\r\nhost: x\r\n\r\n"
        );
        assert_eq!(received.len(), expected.len());
        assert!(received == expected, "the relayed bytes differ from the origin's");
    }
}
