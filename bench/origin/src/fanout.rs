//! `bench-origin --mode fanout`: the least an SSE fan-out can cost on this
//! machine, the yardstick beside the events scenario's rows.
//!
//! Why it exists: one publish to 10,000 subscribers costs at least one
//! send(2) per subscriber in the server and one read per subscriber in the
//! clients, all on the same 2 cores. This server does nothing else: no
//! runtime, no queue, no task, no Ruby; a publish writes the event to every
//! held socket with blocking writes, the list split over `--threads`
//! threads. What the same clients measure against it bounds what any
//! server can reach in the same run.
//!
//! Routes (GET, one request per connection):
//! - `/publish?seq=S&count=C`: writes C events `data: <seq> <CLOCK_MONOTONIC
//!   ns>` to every stream (as bench/events/publish_endpoint.rb does), then
//!   answers 200 and closes.
//! - anything else: an SSE response head, then the connection is held.
//!
//! Each publish logs its own send loop's time on stderr (the bench keeps it
//! in the run's fanout.log): the server's share of the clients' latency.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// A held stream whose writes block this long (a client that stopped
/// reading) is dropped, so one stuck client cannot stall the others.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

const SSE_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nconnection: close\r\n\r\n";

/// Accepts for ever (the caller's lifetime timer ends the process).
pub fn serve(port: u16, threads: usize) -> Result<(), String> {
    let listener = TcpListener::bind(("127.0.0.1", port)).map_err(|e| format!("bind: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    println!("LISTENING {local} fanout threads={threads}");
    let _ = io::stdout().flush();
    let streams: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    for accepted in listener.incoming() {
        let Ok(stream) = accepted else {
            thread::sleep(Duration::from_millis(20));
            continue;
        };
        let streams = Arc::clone(&streams);
        // A thread per request head only: a stream's thread ends once the
        // stream is in the list.
        thread::spawn(move || {
            if let Err(e) = answer(stream, &streams, threads) {
                eprintln!("bench-origin fanout: {e}");
            }
        });
    }
    Ok(())
}

fn answer(mut stream: TcpStream, streams: &Mutex<Vec<TcpStream>>, threads: usize) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let target = {
        let mut reader = BufReader::new(&stream);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let target = line.split(' ').nth(1).unwrap_or("/").to_owned();
        while line != "\r\n" && !line.is_empty() {
            line.clear();
            reader.read_line(&mut line)?;
        }
        target
    };
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    if path != "/publish" {
        stream.write_all(SSE_HEAD)?;
        streams.lock().unwrap_or_else(|e| e.into_inner()).push(stream);
        return Ok(());
    }
    let number = |name: &str| crate::query_u64(query, name);
    let (seq, count) = (number("seq").unwrap_or(0), number("count").unwrap_or(1));
    let mut held = streams.lock().unwrap_or_else(|e| e.into_inner());
    let began = std::time::Instant::now();
    for n in 0..count {
        let event = format!("data: {} {}\n\n", seq + n, crate::mono_ns());
        let event = event.as_bytes();
        let share = held.len().div_ceil(threads.max(1)).max(1);
        let gone: Vec<bool> = thread::scope(|s| {
            let workers: Vec<_> = held
                .chunks(share)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .map(|mut c| c.write_all(event).is_err())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap_or_default())
                .collect()
        });
        let mut gone = gone.into_iter();
        held.retain(|_| !gone.next().unwrap_or(true));
    }
    let reached = held.len();
    eprintln!("fanout: {count} to {reached} in {:?}", began.elapsed());
    drop(held);
    let body = format!("published {count}, last to {reached} subscribers\n");
    write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}
