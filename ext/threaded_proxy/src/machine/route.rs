//! Before routing: buffer what the client sends, show the whole buffer to
//! the Ruby block each time more arrives, and carry out its answer. The
//! buffer is capped (`max_route_bytes`) and so is the wait for the block
//! (`route_timeout`): a block that raises, hangs or answers garbage costs
//! its own connection only.

use std::sync::atomic::Ordering::Relaxed;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::{join, Answer, Job, Machine};

/// Read sizes while routing: routing patterns sit in the first bytes, so
/// the first read is small (the buffer is what an idle connection's
/// allocator high-water mark is made of) and later ones double up to CHUNK.
const FIRST_READ: usize = 2 * 1024;
const CHUNK: usize = 16 * 1024;

/// Serves one connection to its end.
pub async fn run(machine: &Machine, mut client: TcpStream) {
    let max = machine.settings.max_route_bytes;
    let mut buffer = BytesMut::new();
    loop {
        // One byte past the cap is enough to know it was passed.
        let want = buffer.len().clamp(FIRST_READ, CHUNK);
        let room = (max + 1).saturating_sub(buffer.len()).min(want);
        let start = buffer.len();
        buffer.resize(start + room, 0);
        let n = match client.read(&mut buffer[start..]).await {
            // A client that leaves before the block decided: not an error.
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buffer.truncate(start + n);
        if buffer.len() > max {
            machine.stats.route_overflows.fetch_add(1, Relaxed);
            machine.log(format!(
                "client sent more than max_route_bytes ({max}) before the block decided; closed"
            ));
            return;
        }
        match ask(machine, Bytes::copy_from_slice(&buffer)).await {
            Ok(Answer::Noop) => continue,
            Ok(Answer::Close(bytes)) => {
                machine.stats.closed_by_block.fetch_add(1, Relaxed);
                if let Some(bytes) = bytes {
                    if client.write_all(&bytes).await.is_ok() {
                        machine
                            .stats
                            .bytes_to_client
                            .fetch_add(bytes.len() as u64, Relaxed);
                    }
                }
                let _ = client.shutdown().await;
                return;
            }
            Ok(Answer::Remote(remote)) => {
                machine.stats.routed.fetch_add(1, Relaxed);
                join::run(machine, client, buffer.freeze(), remote).await;
                return;
            }
            Ok(Answer::Failed) => {
                machine.stats.route_failures.fetch_add(1, Relaxed);
                return;
            }
            Err(message) => {
                machine.stats.route_failures.fetch_add(1, Relaxed);
                machine.log(format!("routing block failed: {message}; connection closed"));
                return;
            }
        }
    }
}

/// Asks the block, waiting at most `route_timeout`.
async fn ask(machine: &Machine, data: Bytes) -> Result<Answer, String> {
    let (reply, answer) = oneshot::channel();
    machine
        .jobs
        .push(Job::Route { data, reply })
        .map_err(|_| "the machine is stopping".to_owned())?;
    let limit = machine.settings.route_timeout;
    match tokio::time::timeout(limit, answer).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(_)) => Err("it ended without answering".to_owned()),
        Err(_) => Err(format!("it did not answer within {limit:?}")),
    }
}
