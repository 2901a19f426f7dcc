//! The benchmark origin: a small hand-rolled HTTP/1.1 server on tokio.
//!
//! Why hand-rolled: the benchmark compares three ways of reaching this
//! server (directly, through nginx, through `proxy_fetch` under Puma), so the
//! origin must cost as little and as predictably as possible, must speak
//! keep-alive (nginx's upstream pool and the gem's hyper pool both reuse
//! connections), and must *count* what it holds: the SSE scenario asks how
//! many origin streams are still open after the clients left, which only the
//! origin can tell.
//!
//! Routes (GET; any request body is read and discarded):
//!
//! - `/bytes?n=N`          N bytes of `x`, with Content-Length (1 GiB download, 1 KiB answers)
//! - `/delay?ms=M&n=N`     waits M ms, then answers like `/bytes`
//! - `/sse?interval_ms=I&max_secs=S`  `text/event-stream`, chunked: one event at
//!   once, then one every I ms, until the peer closes (or S seconds pass)
//! - `/stats`              JSON counters: open connections, open SSE streams, …
//! - `/health`             `ok`
//!
//! Usage: `bench-origin [--port 0] [--threads 2] [--backlog 4096] [--lifetime-secs 3600]`.
//! Prints `LISTENING 127.0.0.1:PORT` on stdout once it accepts connections.
//!
//! `bench-origin --relay-to HOST:PORT [--port 0] [--lifetime-secs 3600]` is not
//! an origin but a bare TCP relay to one (relay.rs): the yardstick for what a
//! proxy hop costs here.
//!
//! `bench-origin --mode fanout [--port 0] [--threads 2]` is a bare SSE fan-out
//! (fanout.rs): the yardstick for what one publish to many streams costs here.

mod fanout;
mod relay;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Connections currently open (any state, idle keep-alive included).
static OPEN_CONNECTIONS: AtomicI64 = AtomicI64::new(0);
/// SSE responses currently streaming: the "origin streams still open" figure.
static OPEN_SSE: AtomicI64 = AtomicI64::new(0);
static TOTAL_CONNECTIONS: AtomicU64 = AtomicU64::new(0);
static TOTAL_REQUESTS: AtomicU64 = AtomicU64::new(0);
static TOTAL_SSE: AtomicU64 = AtomicU64::new(0);

/// A request head larger than this is refused: the load driver and the
/// proxies send a few hundred bytes.
const MAX_HEAD: usize = 16 * 1024;
/// An idle keep-alive connection is closed after this long; longer than the
/// proxies' own pool idle timeouts (nginx 60 s, the gem 60 s) so the origin
/// never closes a pooled connection under them.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(75);
/// A write that makes no progress for this long ends the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on requests served over one keep-alive connection.
const MAX_REQUESTS_PER_CONNECTION: u64 = 10_000_000;
/// Size of the shared body buffer: big writes keep syscalls per GiB low.
const BODY_CHUNK: usize = 1 << 20;
/// Largest `/bytes` answer (and `/delay` n), so a typo cannot stream forever.
const MAX_BODY: u64 = 64 << 30;
const MAX_DELAY_MS: u64 = 600_000;
const DEFAULT_SSE_MAX_SECS: u64 = 900;

/// Decrements a gauge when the connection (or stream) ends, however it ends
/// (error, timeout, task cancelled), so the counters cannot drift.
struct Gauge(&'static AtomicI64);

impl Gauge {
    fn enter(gauge: &'static AtomicI64) -> Self {
        gauge.fetch_add(1, Ordering::SeqCst);
        Gauge(gauge)
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Options {
    port: u16,
    threads: usize,
    backlog: u32,
    lifetime: Duration,
    /// Set: run as the bare relay to this origin instead (relay.rs).
    relay_to: Option<SocketAddr>,
    /// `--mode fanout`: run as the bare SSE fan-out instead (fanout.rs).
    fanout: bool,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        port: 0,
        threads: 2,
        backlog: 4096,
        lifetime: Duration::from_secs(3600),
        relay_to: None,
        fanout: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |_| format!("bad value for {flag}: {value}");
        match flag.as_str() {
            "--port" => options.port = value.parse().map_err(bad)?,
            "--threads" => options.threads = value.parse().map_err(bad)?,
            "--backlog" => options.backlog = value.parse().map_err(bad)?,
            "--mode" => match value.as_str() {
                "fanout" => options.fanout = true,
                "origin" => options.fanout = false,
                _ => return Err(format!("unknown mode {value} (origin, fanout)")),
            },
            "--lifetime-secs" => options.lifetime = Duration::from_secs(value.parse().map_err(bad)?),
            "--relay-to" => {
                options.relay_to = Some(
                    value
                        .parse()
                        .map_err(|_| format!("bad value for {flag}: {value}"))?,
                )
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if options.threads == 0 {
        return Err("--threads must be at least 1".into());
    }
    Ok(options)
}

/// Raises the soft RLIMIT_NOFILE to the hard limit: the SSE scenario holds
/// about ten thousand connections here.
fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
        limit.rlim_cur
    }
}

fn main() {
    let options = match parse_options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("bench-origin: {message}");
            std::process::exit(2);
        }
    };
    let fd_limit = raise_fd_limit();
    if options.relay_to.is_some() || options.fanout {
        // As the origin does: a harness that died cannot leave it running.
        let lifetime = options.lifetime;
        std::thread::spawn(move || {
            std::thread::sleep(lifetime);
            eprintln!("bench-origin: lifetime over, exiting");
            std::process::exit(0);
        });
        let served = match options.relay_to {
            Some(upstream) => relay::serve(options.port, upstream),
            None => fanout::serve(options.port, options.threads),
        };
        if let Err(message) = served {
            eprintln!("bench-origin: {message}");
            std::process::exit(1);
        }
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        // The origin stops itself after its lifetime: a harness that died
        // without stopping it cannot leave it running for ever.
        tokio::time::timeout(options.lifetime, serve(&options, fd_limit)).await
    });
    match result {
        Ok(Err(message)) => {
            eprintln!("bench-origin: {message}");
            std::process::exit(1);
        }
        Ok(Ok(())) => {}
        Err(_) => eprintln!("bench-origin: lifetime over, exiting"),
    }
    // Open streams must not delay exit.
    runtime.shutdown_timeout(Duration::from_millis(100));
}

async fn serve(options: &Options, fd_limit: u64) -> Result<(), String> {
    let addr: SocketAddr = ([127, 0, 0, 1], options.port).into();
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    socket
        .set_reuseaddr(true)
        .map_err(|e| format!("SO_REUSEADDR: {e}"))?;
    socket.bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    // A deep backlog: the thread-freedom scenario connects 1,000 clients at
    // once, and SYNs dropped from a full queue would add seconds of retry.
    let listener = socket
        .listen(options.backlog)
        .map_err(|e| format!("listen: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    println!("LISTENING {local} fd_limit={fd_limit}");
    use std::io::Write;
    let _ = std::io::stdout().flush();

    // Accepting is the server's whole life; it ends with the lifetime timeout.
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                tokio::spawn(connection(stream));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("bench-origin: accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// One parsed request head: only what the routes need.
struct Request {
    path: String,
    query: String,
    keep_alive: bool,
    content_length: u64,
}

/// Serves requests on one connection until the peer closes, asks to close,
/// idles past KEEPALIVE_IDLE or an error occurs.
async fn connection(mut stream: TcpStream) {
    let _open = Gauge::enter(&OPEN_CONNECTIONS);
    TOTAL_CONNECTIONS.fetch_add(1, Ordering::Relaxed);
    let _ = stream.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    for _ in 0..MAX_REQUESTS_PER_CONNECTION {
        let request = match read_request(&mut stream, &mut buf).await {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(status) => {
                let _ = respond_small(&mut stream, status, "text/plain", b"bad request\n", false).await;
                return;
            }
        };
        TOTAL_REQUESTS.fetch_add(1, Ordering::Relaxed);
        if discard_body(&mut stream, &mut buf, request.content_length)
            .await
            .is_err()
        {
            return;
        }
        let keep_going = match route(&mut stream, &request).await {
            Ok(keep_going) => keep_going,
            Err(_) => return,
        };
        if !keep_going || !request.keep_alive {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// Reads one request head from `buf` + the socket. `Ok(None)`: the peer
/// closed (or idled out) between requests. `Err(status)`: answer and close.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Option<Request>, u16> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            return parse_request(&head).map(Some);
        }
        if buf.len() > MAX_HEAD {
            return Err(431);
        }
        match tokio::time::timeout(KEEPALIVE_IDLE, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Ok(None),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn parse_request(head: &str) -> Result<Request, u16> {
    let mut lines = head.split("\r\n");
    let request_line = lines.next().ok_or(400u16)?;
    let mut parts = request_line.split(' ');
    let _method = parts.next().ok_or(400u16)?;
    let target = parts.next().ok_or(400u16)?;
    let version = parts.next().ok_or(400u16)?;
    let mut keep_alive = version == "HTTP/1.1";
    let mut content_length = 0;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("connection") {
            let value = value.to_ascii_lowercase();
            if value.contains("close") {
                keep_alive = false;
            } else if value.contains("keep-alive") {
                keep_alive = true;
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            content_length = value.parse().map_err(|_| 400u16)?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // No route takes a body; a chunked one is not worth parsing.
            return Err(501);
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Ok(Request {
        path: path.to_owned(),
        query: query.to_owned(),
        keep_alive,
        content_length,
    })
}

async fn discard_body(stream: &mut TcpStream, buf: &mut Vec<u8>, length: u64) -> Result<(), ()> {
    let buffered = (buf.len() as u64).min(length);
    buf.drain(..buffered as usize);
    let mut remaining = length - buffered;
    let mut chunk = [0u8; 8192];
    while remaining > 0 {
        let want = remaining.min(chunk.len() as u64) as usize;
        match tokio::time::timeout(KEEPALIVE_IDLE, stream.read(&mut chunk[..want])).await {
            Ok(Ok(n)) if n > 0 => remaining -= n as u64,
            _ => return Err(()),
        }
    }
    Ok(())
}

fn query_u64(query: &str, name: &str) -> Option<u64> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .and_then(|(_, value)| value.parse().ok())
}

/// Answers one request. `Ok(false)`: the connection must close afterwards.
async fn route(stream: &mut TcpStream, request: &Request) -> std::io::Result<bool> {
    let keep = request.keep_alive;
    match request.path.as_str() {
        "/bytes" => {
            let n = query_u64(&request.query, "n").unwrap_or(1024).min(MAX_BODY);
            respond_bytes(stream, n, keep).await?;
            Ok(true)
        }
        "/delay" => {
            let ms = query_u64(&request.query, "ms").unwrap_or(1000).min(MAX_DELAY_MS);
            let n = query_u64(&request.query, "n").unwrap_or(1024).min(MAX_BODY);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            respond_bytes(stream, n, keep).await?;
            Ok(true)
        }
        "/sse" => {
            let interval = query_u64(&request.query, "interval_ms").unwrap_or(5000).max(10);
            let max_secs = query_u64(&request.query, "max_secs").unwrap_or(DEFAULT_SSE_MAX_SECS);
            sse(
                stream,
                Duration::from_millis(interval),
                Duration::from_secs(max_secs),
            )
            .await?;
            Ok(false)
        }
        "/stats" => {
            let body = format!(
                "{{\"open_connections\":{},\"open_sse\":{},\"total_connections\":{},\"total_requests\":{},\"total_sse\":{}}}\n",
                OPEN_CONNECTIONS.load(Ordering::SeqCst),
                OPEN_SSE.load(Ordering::SeqCst),
                TOTAL_CONNECTIONS.load(Ordering::Relaxed),
                TOTAL_REQUESTS.load(Ordering::Relaxed),
                TOTAL_SSE.load(Ordering::Relaxed),
            );
            respond_small(stream, 200, "application/json", body.as_bytes(), keep).await?;
            Ok(true)
        }
        "/health" => {
            respond_small(stream, 200, "text/plain", b"ok\n", keep).await?;
            Ok(true)
        }
        _ => {
            respond_small(stream, 404, "text/plain", b"not found\n", keep).await?;
            Ok(true)
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        _ => "Unknown",
    }
}

fn connection_header(keep_alive: bool) -> &'static str {
    if keep_alive {
        ""
    } else {
        "Connection: close\r\n"
    }
}

async fn write_timed(stream: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(bytes)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

async fn respond_small(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{}\r\n",
        reason(status),
        body.len(),
        connection_header(keep_alive)
    )
    .into_bytes();
    out.extend_from_slice(body);
    write_timed(stream, &out).await
}

/// The shared body buffer (`x` bytes), allocated once.
fn body_chunk() -> &'static [u8] {
    static CHUNK: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    CHUNK.get_or_init(|| vec![b'x'; BODY_CHUNK])
}

async fn respond_bytes(stream: &mut TcpStream, n: u64, keep_alive: bool) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n{}\r\n",
        connection_header(keep_alive)
    );
    let chunk = body_chunk();
    if n <= 64 * 1024 {
        // Small answers in one write: one syscall, one segment.
        let mut out = head.into_bytes();
        out.extend_from_slice(&chunk[..n as usize]);
        return write_timed(stream, &out).await;
    }
    write_timed(stream, head.as_bytes()).await?;
    let mut remaining = n;
    // Bounded: at most MAX_BODY / BODY_CHUNK iterations.
    while remaining > 0 {
        let len = remaining.min(chunk.len() as u64) as usize;
        write_timed(stream, &chunk[..len]).await?;
        remaining -= len as u64;
    }
    stream.flush().await
}

fn chunk_frame(data: &str) -> Vec<u8> {
    format!("{:x}\r\n{data}\r\n", data.len()).into_bytes()
}

/// An SSE stream: one event at once (so a client knows the stream is
/// established end to end), then one per `interval`. It watches the socket
/// for EOF at the same time, so a peer that leaves is counted out at once,
/// not at the next event: the benchmark measures how fast the *proxy* closes
/// its origin connection, and that must not be hidden behind our interval.
async fn sse(stream: &mut TcpStream, interval: Duration, max: Duration) -> std::io::Result<()> {
    let _open = Gauge::enter(&OPEN_SSE);
    TOTAL_SSE.fetch_add(1, Ordering::Relaxed);
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";
    let mut first = head.as_bytes().to_vec();
    first.extend_from_slice(&chunk_frame("data: open 0\n\n"));
    write_timed(stream, &first).await?;

    let deadline = tokio::time::Instant::now() + max;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sequence: u64 = 0;
    let mut scratch = [0u8; 512];
    let (mut reader, mut writer) = stream.split();
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                sequence += 1;
                let event = chunk_frame(&format!("data: tick {sequence}\n\n"));
                match tokio::time::timeout(WRITE_TIMEOUT, writer.write_all(&event)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e),
                    Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
                }
            }
            read = reader.read(&mut scratch) => {
                match read {
                    // Peer closed (or reset): the stream is over.
                    Ok(0) | Err(_) => return Ok(()),
                    // Anything the peer sends mid-stream is ignored.
                    Ok(_) => {}
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                let _ = writer.write_all(b"0\r\n\r\n").await;
                return Ok(());
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}

/// CLOCK_MONOTONIC in nanoseconds: the clock Ruby's
/// `Process.clock_gettime(Process::CLOCK_MONOTONIC, :nanosecond)` and the
/// load driver read, so a timestamp in an event means the same to both.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
