//! Byte tunnels: after a 101 (WebSocket or any Upgrade) or for
//! `proxy_tunnel`, bytes flow both ways until both sides have closed.
//! Half-closes are passed on (EOF one way shuts down that way's writer);
//! the tunnel ends when nothing moved in either direction for `idle`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

const BUFFER: usize = 64 * 1024;

/// Bytes moved each way, readable while the tunnel runs and after it ends.
#[derive(Default)]
pub struct TunnelCounts {
    pub to_origin: AtomicU64,
    pub to_client: AtomicU64,
}

/// Why a tunnel ended badly.
#[derive(Debug, PartialEq, Eq)]
pub enum TunnelEnd {
    /// Nothing moved for the idle timeout.
    Idle,
    /// A read or write failed (reset, broken pipe).
    Failed(String),
}

/// Last time a byte moved, in milliseconds since `start`.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Copies `client` ⇄ `origin` until both directions reached EOF.
pub async fn run<CR, CW, O>(
    client_rd: &mut CR,
    client_wr: &mut CW,
    origin: O,
    idle: Duration,
    counts: &TunnelCounts,
) -> Result<(), TunnelEnd>
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    O: AsyncRead + AsyncWrite,
{
    let (mut origin_rd, mut origin_wr) = tokio::io::split(origin);
    let activity = Arc::new(Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    });
    let up = pump(client_rd, &mut origin_wr, &activity, &counts.to_origin);
    let down = pump(&mut origin_rd, client_wr, &activity, &counts.to_client);
    let watchdog = async {
        loop {
            let deadline = activity.last() + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        (up, down) = async { tokio::join!(up, down) } => {
            up.and(down).map_err(|e| TunnelEnd::Failed(e.to_string()))
        }
        _ = watchdog => Err(TunnelEnd::Idle),
    }
}

/// One direction: read, write, and on EOF shut the writer down (half-close).
async fn pump<R, W>(rd: &mut R, wr: &mut W, activity: &Activity, count: &AtomicU64) -> std::io::Result<()>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = rd.read(&mut buf).await?;
        if n == 0 {
            let _ = wr.shutdown().await;
            return Ok(());
        }
        activity.touch();
        wr.write_all(&buf[..n]).await?;
        activity.touch();
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_flow_both_ways_and_half_close_is_passed_on() {
        let (client_side, mut client) = tokio::io::duplex(1024);
        let (origin_side, mut origin) = tokio::io::duplex(1024);
        let (mut crd, mut cwr) = tokio::io::split(client_side);
        let counts = TunnelCounts::default();
        let tunnel = run(&mut crd, &mut cwr, origin_side, Duration::from_secs(5), &counts);
        let peers = async {
            client.write_all(b"ping").await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            origin.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"ping");
            // The origin still answers after the client's half-close.
            origin.write_all(b"pong").await.unwrap();
            origin.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"pong");
        };
        let (result, ()) = tokio::join!(tunnel, peers);
        assert_eq!(result, Ok(()));
        assert_eq!(counts.to_origin.load(Ordering::Relaxed), 4);
        assert_eq!(counts.to_client.load(Ordering::Relaxed), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_tunnel_ends_after_the_idle_timeout() {
        let (client_side, _client) = tokio::io::duplex(1024);
        let (origin_side, _origin) = tokio::io::duplex(1024);
        let (mut crd, mut cwr) = tokio::io::split(client_side);
        let counts = TunnelCounts::default();
        let result = run(&mut crd, &mut cwr, origin_side, Duration::from_secs(30), &counts).await;
        assert_eq!(result, Err(TunnelEnd::Idle));
    }
}
