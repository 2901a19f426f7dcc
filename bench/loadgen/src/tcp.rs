//! Raw TCP modes for the machine scenario (issue 18): a sink to route to,
//! and a client that speaks first (the routing prefix) through a proxy.
//!
//! - `tcp-sink --port P`: accepts forever; to each connection it sends
//!   `+\n` at once (so a client knows it was routed and joined), counts
//!   what it reads until EOF, answers `OK <n>\n` and closes.
//! - `tcp --addr H:P --what push --bytes N`: one connection, the prefix
//!   then N bytes, half-close, reads the answer; MB/s.
//! - `tcp --addr H:P --what short --connections C --duration-secs S`:
//!   closed loop of C connections, each connect, prefix, half-close, read
//!   to EOF; completed exchanges per second.
//! - `tcp --addr H:P --what idle --idle N --hold-secs S --watch-pid PID`:
//!   N connections routed (greeting seen) and then left idle; RSS of the
//!   watched process before, while held, and its delta per connection.
//!
//! Common: `--prefix GO` (the bytes the proxy routes on).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::report::{rss_kb, JsonObject};
use crate::Args;

/// What the sink sends first: proof that the route reached it.
const GREETING: &[u8] = b"+\n";

pub async fn sink(args: &Args) -> Result<String, String> {
    let port: u16 = args.number("--port", 0u16)?;
    crate::raise_fd_limit();
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| format!("bind {port}: {e}"))?;
    eprintln!(
        "tcp-sink listening on {}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            // Out of descriptors: wait rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(async move {
            let _ = conn.set_nodelay(true);
            if conn.write_all(GREETING).await.is_err() {
                return;
            }
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(_) => return,
                }
            }
            let _ = conn.write_all(format!("OK {total}\n").as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

pub async fn client(args: &Args) -> Result<String, String> {
    let addr = args.required("--addr")?.to_owned();
    let prefix = args.string("--prefix").unwrap_or("GO").as_bytes().to_vec();
    match args.required("--what")? {
        "push" => push(&addr, &prefix, args.number("--bytes", 1u64 << 30)?).await,
        "short" => {
            let connections = args.number("--connections", 50usize)?;
            let secs = args.number("--duration-secs", 10.0f64)?;
            short(addr, prefix, connections, Duration::from_secs_f64(secs)).await
        }
        "idle" => {
            let pid: u32 = args
                .required("--watch-pid")?
                .parse()
                .map_err(|_| "bad --watch-pid")?;
            let count = args.number("--idle", 2000usize)?;
            let hold = Duration::from_secs_f64(args.number("--hold-secs", 2.0f64)?);
            idle(&addr, &prefix, count, hold, pid).await
        }
        other => Err(format!("unknown --what {other:?}: push | short | idle")),
    }
}

async fn connect(addr: &str, prefix: &[u8]) -> Result<TcpStream, String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    stream
        .write_all(prefix)
        .await
        .map_err(|e| format!("write prefix: {e}"))?;
    Ok(stream)
}

/// Reads until EOF (at most 30 s); what was read.
async fn read_to_end(stream: &mut TcpStream) -> Result<Vec<u8>, String> {
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut back))
        .await
        .map_err(|_| "no EOF within 30 s".to_owned())?
        .map_err(|e| format!("read: {e}"))?;
    Ok(back)
}

async fn push(addr: &str, prefix: &[u8], bytes: u64) -> Result<String, String> {
    let started = Instant::now();
    let mut stream = connect(addr, prefix).await?;
    let chunk = vec![b'x'; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        stream
            .write_all(&chunk[..n])
            .await
            .map_err(|e| format!("write: {e}"))?;
        left -= n as u64;
    }
    stream.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    let back = read_to_end(&mut stream).await?;
    let secs = started.elapsed().as_secs_f64();
    // The sink counts the prefix too (the proxy replays it).
    let expected = format!("+\nOK {}\n", bytes + prefix.len() as u64);
    if back != expected.as_bytes() {
        return Err(format!(
            "answer {:?}, wanted {expected:?}",
            String::from_utf8_lossy(&back)
        ));
    }
    let mut object = JsonObject::new();
    object
        .num("driver_cpu_s", crate::report::own_cpu_seconds())
        .int("bytes", bytes)
        .num("secs", Some(secs))
        .num("mb_per_s", Some(bytes as f64 / secs / 1e6));
    Ok(object.finish())
}

async fn short(
    addr: String,
    prefix: Vec<u8>,
    connections: usize,
    length: Duration,
) -> Result<String, String> {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let addr = Arc::new(addr);
    let prefix = Arc::new(prefix);
    let started = Instant::now();
    let stop = started + length;
    let mut workers = Vec::new();
    for _ in 0..connections {
        let (done, failed, addr, prefix) = (done.clone(), failed.clone(), addr.clone(), prefix.clone());
        workers.push(tokio::spawn(async move {
            while Instant::now() < stop {
                let one = async {
                    let mut stream = connect(&addr, &prefix).await?;
                    stream.shutdown().await.map_err(|e| e.to_string())?;
                    let back = read_to_end(&mut stream).await?;
                    if back.starts_with(GREETING) && back.ends_with(b"\n") && back.len() > GREETING.len() {
                        Ok(())
                    } else {
                        Err(format!("bad answer {:?}", String::from_utf8_lossy(&back)))
                    }
                };
                match one.await {
                    Ok(()) => done.fetch_add(1, Relaxed),
                    Err(_) => failed.fetch_add(1, Relaxed),
                };
            }
        }));
    }
    for worker in workers {
        worker.await.map_err(|e| e.to_string())?;
    }
    let secs = started.elapsed().as_secs_f64();
    let done = done.load(Relaxed);
    let mut object = JsonObject::new();
    object
        .num("driver_cpu_s", crate::report::own_cpu_seconds())
        .int("exchanges", done)
        .int("failed", failed.load(Relaxed))
        .int("connections", connections as u64)
        .num("secs", Some(secs))
        .num("per_s", Some(done as f64 / secs));
    Ok(object.finish())
}

async fn idle(addr: &str, prefix: &[u8], count: usize, hold: Duration, pid: u32) -> Result<String, String> {
    crate::raise_fd_limit();
    let baseline = rss_kb(pid).ok_or("cannot read the watched process's RSS")?;
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let mut stream = connect(addr, prefix)
            .await
            .map_err(|e| format!("connection {i}: {e}"))?;
        let mut greeting = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut greeting))
            .await
            .map_err(|_| format!("connection {i}: not routed within 10 s"))?
            .map_err(|e| format!("connection {i}: {e}"))?;
        held.push(stream);
    }
    tokio::time::sleep(hold).await;
    let plateau = rss_kb(pid).ok_or("cannot read the watched process's RSS")?;
    drop(held);
    let mut object = JsonObject::new();
    object
        .int("connections", count as u64)
        .int("rss_baseline_kb", baseline)
        .int("rss_plateau_kb", plateau)
        .num(
            "rss_kib_per_connection",
            Some((plateau as f64 - baseline as f64) / count as f64),
        );
    Ok(object.finish())
}
