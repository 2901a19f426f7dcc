//! Before routing: buffer what the client sends, show the whole buffer to
//! the Ruby block each time more arrives, and carry out its answer. The
//! buffer is capped (`max_route_bytes`) and so is the wait for the block
//! (`route_timeout`): a block that raises, hangs or answers garbage costs
//! its own connection only.

use std::sync::atomic::Ordering::Relaxed;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::{join, Answer, Job, Machine};

/// The most read at once while routing (from a scratch buffer on the
/// stack: the connection's own buffer grows by what arrived only, so a
/// client that sent "GO" holds 2 bytes, not a read-sized allocation whose
/// hole stays in the allocator after routing; issue 18, idle RSS).
const CHUNK: usize = 16 * 1024;

/// Serves one connection until it is routed (then the join is returned,
/// its remote connected) or closed.
pub async fn run(machine: &Machine, mut client: TcpStream) -> Option<join::Joined> {
    let max = machine.settings.max_route_bytes;
    let mut buffer = BytesMut::new();
    loop {
        // One byte past the cap is enough to know it was passed.
        let room = (max + 1).saturating_sub(buffer.len()).min(CHUNK);
        match read_some(&client, &mut buffer, room).await {
            // A client that leaves before the block decided: not an error.
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        if buffer.len() > max {
            machine.stats.route_overflows.fetch_add(1, Relaxed);
            machine.log(format!(
                "client sent more than max_route_bytes ({max}) before the block decided; closed"
            ));
            return None;
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
                return None;
            }
            Ok(Answer::Remote(remote)) => {
                machine.stats.routed.fetch_add(1, Relaxed);
                // Boxed: connecting is not room in every routing
                // connection's task (issue 18).
                return Box::pin(join::connect(machine, client, buffer.freeze(), remote)).await;
            }
            Ok(Answer::Failed) => {
                machine.stats.route_failures.fetch_add(1, Relaxed);
                return None;
            }
            Err(message) => {
                machine.stats.route_failures.fetch_add(1, Relaxed);
                machine.log(format!("routing block failed: {message}; connection closed"));
                return None;
            }
        }
    }
}

/// Appends what the client sent (at most `room` bytes, at least one
/// unless at EOF) to `buffer`; 0 at EOF.
async fn read_some(client: &TcpStream, buffer: &mut BytesMut, room: usize) -> std::io::Result<usize> {
    loop {
        client.readable().await?;
        // Not held across an await, so not part of the connection's future.
        let mut scratch = [0u8; CHUNK];
        match client.try_read(&mut scratch[..room.min(CHUNK)]) {
            Ok(n) => {
                buffer.extend_from_slice(&scratch[..n]);
                return Ok(n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
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
