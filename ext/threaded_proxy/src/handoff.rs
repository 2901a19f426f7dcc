//! Turning a file descriptor duplicated from Ruby into a tokio stream.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use tokio::net::{TcpStream, UnixStream};

/// The hijacked client connection, by address family (Puma binds TCP or
/// Unix sockets).
pub enum ClientSocket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Duplicates `fd` with close-on-exec. The caller keeps its own descriptor
/// and may close it at once; the duplicate belongs to the exchange.
pub fn duplicate(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl with F_DUPFD_CLOEXEC only reads `fd`; a bad descriptor
    // yields -1 and errno, which we turn into an error.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dup` is a fresh descriptor nobody else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dup) })
}

/// Registers the socket with the current tokio runtime (must be called
/// from inside it).
pub fn adopt(fd: OwnedFd) -> io::Result<ClientSocket> {
    let sock = socket2::Socket::from(fd);
    let is_unix = sock.local_addr()?.as_socket().is_none();
    sock.set_nonblocking(true)?;
    if is_unix {
        let std: std::os::unix::net::UnixStream = OwnedFd::from(sock).into();
        Ok(ClientSocket::Unix(UnixStream::from_std(std)?))
    } else {
        sock.set_tcp_nodelay(true)?;
        let std: std::net::TcpStream = sock.into();
        Ok(ClientSocket::Tcp(TcpStream::from_std(std)?))
    }
}

impl ClientSocket {
    pub fn raw_fd(&self) -> RawFd {
        match self {
            ClientSocket::Tcp(s) => s.as_raw_fd(),
            ClientSocket::Unix(s) => s.as_raw_fd(),
        }
    }
}

/// Makes the next close send RST instead of FIN, so a client can never take
/// a cut-off body for a complete one.
pub fn set_abortive_close(fd: RawFd) {
    // SAFETY: `fd` is open for as long as the exchange holds its socket,
    // and the borrow ends with this call.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let sock = socket2::SockRef::from(&borrowed);
    let _ = sock.set_linger(Some(std::time::Duration::ZERO));
}
