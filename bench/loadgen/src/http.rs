//! A minimal HTTP/1.1 client: exactly what the scenarios need and nothing
//! that costs time per request (no header maps, no allocation per read).
//!
//! Every await is bounded by a timeout: a stuck server shows up as a
//! `timeout` failure in the results, never as a hung benchmark.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response head larger than this is treated as a bad response.
const MAX_HEAD: usize = 64 * 1024;
/// After a `Connection: close` answer we wait this long for the server's
/// FIN, so the server (not the load driver) closes first and holds the
/// TIME_WAIT: otherwise tens of thousands of short connections would use up
/// the driver's ephemeral ports.
const EOF_WAIT: Duration = Duration::from_secs(2);

/// Where to send requests: `http://127.0.0.1:PORT/path?query`.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("only http:// URLs: {url}"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let addr: SocketAddr = authority
            .parse()
            .map_err(|_| format!("need an IP:port authority (no DNS): {url}"))?;
        Ok(Target {
            addr,
            host: authority.to_owned(),
            path: path.to_owned(),
        })
    }

    /// The request bytes; `keep_alive: false` adds `Connection: close`.
    pub fn request(&self, keep_alive: bool) -> Vec<u8> {
        format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: bench-loadgen\r\nAccept: */*\r\n{}\r\n",
            self.path,
            self.host,
            if keep_alive { "" } else { "Connection: close\r\n" }
        )
        .into_bytes()
    }
}

/// Why an exchange failed, by kind (the results count each kind).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Failure {
    Connect,
    Timeout,
    Io,
    BadResponse,
    ShortBody,
    /// The server closed a keep-alive connection between requests.
    Closed,
}

impl Failure {
    pub fn name(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Timeout => "timeout",
            Failure::Io => "io",
            Failure::BadResponse => "bad_response",
            Failure::ShortBody => "short_body",
            Failure::Closed => "closed",
        }
    }
}

/// The parts of a response head the driver acts on.
#[derive(Clone, Copy, Debug)]
pub struct Head {
    pub status: u16,
    pub content_length: Option<u64>,
    pub chunked: bool,
    pub close: bool,
}

impl Head {
    /// Whether the body's end is marked in-band (so the connection could be
    /// reused), rather than by the server closing it.
    pub fn framed(&self) -> bool {
        self.chunked || self.content_length.is_some()
    }
}

/// A finished exchange.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub status: u16,
    pub body_bytes: u64,
    /// From the start of connect (or of the write, on a reused connection)
    /// to the last body byte.
    pub latency: Duration,
    /// The body, when asked for (small answers such as /stats only).
    pub body: Vec<u8>,
}

pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, Failure> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(_)) => Err(Failure::Connect),
        Err(_) => Err(Failure::Timeout),
    }
}

/// Parses a complete head (`buf[..end]`, without the blank line).
fn parse_head(head: &[u8]) -> Result<Head, Failure> {
    let text = std::str::from_utf8(head).map_err(|_| Failure::BadResponse)?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().ok_or(Failure::BadResponse)?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().ok_or(Failure::BadResponse)?;
    if !version.starts_with("HTTP/1.") {
        return Err(Failure::BadResponse);
    }
    let status: u16 = parts
        .next()
        .and_then(|code| code.parse().ok())
        .ok_or(Failure::BadResponse)?;
    let mut parsed = Head {
        status,
        content_length: None,
        chunked: false,
        close: version == "HTTP/1.0",
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            parsed.content_length = Some(value.parse().map_err(|_| Failure::BadResponse)?);
        } else if name.eq_ignore_ascii_case("connection") {
            parsed.close = value.eq_ignore_ascii_case("close");
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            parsed.chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    Ok(parsed)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}

/// Reads until the end of the response head. On return `buf` holds the
/// bytes after the head (the start of the body).
pub async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Head, Failure> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = parse_head(&buf[..end])?;
            buf.drain(..end + 4);
            return Ok(head);
        }
        if buf.len() > MAX_HEAD {
            return Err(Failure::BadResponse);
        }
        match stream.read(&mut chunk).await {
            Ok(0) => {
                return Err(if buf.is_empty() {
                    Failure::Closed
                } else {
                    Failure::BadResponse
                })
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return Err(Failure::Io),
        }
    }
}

/// Reads more bytes into `buf`; EOF is a short body here.
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>, read_buf: &mut [u8]) -> Result<(), Failure> {
    match stream.read(read_buf).await {
        Ok(0) => Err(Failure::ShortBody),
        Ok(n) => {
            buf.extend_from_slice(&read_buf[..n]);
            Ok(())
        }
        Err(_) => Err(Failure::Io),
    }
}

/// Decodes a chunked body (Puma chunks the inline action's answer) and
/// returns its size; chunk data is counted and dropped, never buffered whole.
/// Every turn of each loop consumes bytes or reads from the socket, and the
/// caller's timeout bounds the whole.
async fn read_chunked(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    read_buf: &mut [u8],
) -> Result<u64, Failure> {
    let mut body = 0u64;
    loop {
        let line_end = loop {
            if let Some(i) = find(buf, b"\r\n") {
                break i;
            }
            if buf.len() > 1024 {
                return Err(Failure::BadResponse);
            }
            read_more(stream, buf, read_buf).await?;
        };
        let line = std::str::from_utf8(&buf[..line_end]).map_err(|_| Failure::BadResponse)?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(size_text, 16).map_err(|_| Failure::BadResponse)?;
        buf.drain(..line_end + 2);
        if size == 0 {
            // Trailer lines, then the empty line that ends the body.
            loop {
                if let Some(i) = find(buf, b"\r\n") {
                    buf.drain(..i + 2);
                    if i == 0 {
                        return Ok(body);
                    }
                    continue;
                }
                if buf.len() > MAX_HEAD {
                    return Err(Failure::BadResponse);
                }
                read_more(stream, buf, read_buf).await?;
            }
        }
        // The chunk's data and its closing CRLF.
        let mut remaining = size + 2;
        let buffered = (buf.len() as u64).min(remaining) as usize;
        buf.drain(..buffered);
        remaining -= buffered as u64;
        while remaining > 0 {
            let n = match stream.read(read_buf).await {
                Ok(0) => return Err(Failure::ShortBody),
                Ok(n) => n,
                Err(_) => return Err(Failure::Io),
            };
            let used = (n as u64).min(remaining) as usize;
            remaining -= used as u64;
            buf.extend_from_slice(&read_buf[used..n]);
        }
        body += size;
    }
}

/// Reads the body after `read_head`: Content-Length bytes, a chunked body,
/// or to EOF when the answer is framed neither way. `keep` collects up to
/// that many body bytes (not for chunked bodies).
async fn read_body(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    head: &Head,
    read_buf: &mut [u8],
    keep: usize,
) -> Result<(u64, Vec<u8>), Failure> {
    if head.chunked {
        let size = read_chunked(stream, buf, read_buf).await?;
        if !buf.is_empty() {
            return Err(Failure::BadResponse);
        }
        return Ok((size, Vec::new()));
    }
    let mut body = Vec::new();
    let mut received = buf.len() as u64;
    body.extend_from_slice(&buf[..buf.len().min(keep)]);
    buf.clear();
    match head.content_length {
        Some(length) => {
            if received > length {
                // Extra bytes after the body: a pipelining bug somewhere.
                return Err(Failure::BadResponse);
            }
            while received < length {
                match stream.read(read_buf).await {
                    Ok(0) => return Err(Failure::ShortBody),
                    Ok(n) => {
                        received += n as u64;
                        if body.len() < keep {
                            let take = n.min(keep - body.len());
                            body.extend_from_slice(&read_buf[..take]);
                        }
                    }
                    Err(_) => return Err(Failure::Io),
                }
            }
            if received > length {
                return Err(Failure::BadResponse);
            }
        }
        None => loop {
            match stream.read(read_buf).await {
                Ok(0) => break,
                Ok(n) => {
                    received += n as u64;
                    if body.len() < keep {
                        let take = n.min(keep - body.len());
                        body.extend_from_slice(&read_buf[..take]);
                    }
                }
                Err(_) => return Err(Failure::Io),
            }
        },
    }
    Ok((received, body))
}

/// One request on a fresh connection that is closed afterwards (the way
/// every client of `proxy_fetch` must work: it answers `Connection: close`).
pub async fn fetch_close(
    target: &Target,
    request: &[u8],
    timeout: Duration,
    read_buf: &mut [u8],
    keep: usize,
) -> Result<Outcome, Failure> {
    let start = Instant::now();
    let exchange = async {
        let mut stream = connect(target.addr, timeout).await?;
        stream.write_all(request).await.map_err(|_| Failure::Io)?;
        let mut buf = Vec::with_capacity(1024);
        let head = read_head(&mut stream, &mut buf).await?;
        let (body_bytes, body) = read_body(&mut stream, &mut buf, &head, read_buf, keep).await?;
        let latency = start.elapsed();
        // Not part of the latency: let the server close first (see EOF_WAIT).
        if head.framed() {
            let _ = tokio::time::timeout(EOF_WAIT, stream.read(read_buf)).await;
        }
        Ok(Outcome {
            status: head.status,
            body_bytes,
            latency,
            body,
        })
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(Failure::Timeout),
    }
}

/// One request on an open keep-alive connection. The answer must carry a
/// Content-Length or be chunked; `Err(Closed)` when the server
/// closed the connection instead of answering (reconnect and retry).
pub async fn fetch_keep_alive(
    stream: &mut TcpStream,
    request: &[u8],
    timeout: Duration,
    read_buf: &mut [u8],
) -> Result<(Outcome, bool), Failure> {
    let start = Instant::now();
    let exchange = async {
        stream.write_all(request).await.map_err(|_| Failure::Io)?;
        let mut buf = Vec::with_capacity(1024);
        let head = read_head(stream, &mut buf).await?;
        if !head.framed() {
            return Err(Failure::BadResponse);
        }
        let (body_bytes, _) = read_body(stream, &mut buf, &head, read_buf, 0).await?;
        Ok((
            Outcome {
                status: head.status,
                body_bytes,
                latency: start.elapsed(),
                body: Vec::new(),
            },
            !head.close,
        ))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(Failure::Timeout),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        let target = Target::parse("http://127.0.0.1:8080/bench/proxy/bytes?n=1").unwrap();
        assert_eq!(target.addr.port(), 8080);
        assert_eq!(target.path, "/bench/proxy/bytes?n=1");
        assert!(Target::parse("https://127.0.0.1:1/").is_err());
        assert!(Target::parse("http://localhost:1/").is_err());
    }

    #[test]
    fn parses_heads() {
        let head = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: close").unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(head.content_length, Some(12));
        assert!(head.close);
        assert!(parse_head(b"SSH-2.0").is_err());
    }

    #[tokio::test]
    async fn reads_chunked_bodies_split_anywhere() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let answer: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                                  5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-T: 1\r\n\r\n";
            for piece in answer.chunks(3) {
                socket.write_all(piece).await.unwrap();
                socket.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        let target = Target::parse(&format!("http://{addr}/")).unwrap();
        let mut read_buf = [0u8; 64];
        let outcome = fetch_close(
            &target,
            &target.request(false),
            Duration::from_secs(5),
            &mut read_buf,
            0,
        )
        .await
        .unwrap();
        assert_eq!((outcome.status, outcome.body_bytes), (200, 12));
        server.await.unwrap();
    }
}
