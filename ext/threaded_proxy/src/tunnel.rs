//! Byte tunnels: after a 101 (WebSocket or any Upgrade) or for
//! `proxy_tunnel`, bytes flow both ways until both sides have closed.
//! Half-closes are passed on (EOF one way shuts down that way's writer);
//! the tunnel ends when nothing moved in either direction for `idle`.
//! Bytes are counted in the exchange's [`Meter`] as they move.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::stats::Meter;

const BUFFER: usize = 64 * 1024;

/// Which way a pump moves bytes, which decides how the meter counts them.
#[derive(Clone, Copy)]
enum Way {
    /// Client → origin: bytes from the client.
    Up,
    /// Origin → client: bytes from the origin, and to the client.
    Down,
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
    meter: &Meter,
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
    let up = pump(client_rd, &mut origin_wr, &activity, meter, Way::Up);
    let down = pump(&mut origin_rd, client_wr, &activity, meter, Way::Down);
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
async fn pump<R, W>(
    rd: &mut R,
    wr: &mut W,
    activity: &Activity,
    meter: &Meter,
    way: Way,
) -> std::io::Result<()>
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
        match way {
            Way::Up => meter.from_client(n as u64),
            Way::Down => meter.relayed(n as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_meter() -> Meter {
        Meter::new(Box::leak(Box::default()))
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_and_half_close_is_passed_on() {
        let (client_side, mut client) = tokio::io::duplex(1024);
        let (origin_side, mut origin) = tokio::io::duplex(1024);
        let (mut crd, mut cwr) = tokio::io::split(client_side);
        let meter = test_meter();
        let tunnel = run(&mut crd, &mut cwr, origin_side, Duration::from_secs(5), &meter);
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
        assert_eq!(
            (meter.tunnel_bytes(), meter.origin_bytes(), meter.client_bytes()),
            (4, 4, 4)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_tunnel_ends_after_the_idle_timeout() {
        let (client_side, _client) = tokio::io::duplex(1024);
        let (origin_side, _origin) = tokio::io::duplex(1024);
        let (mut crd, mut cwr) = tokio::io::split(client_side);
        let meter = test_meter();
        let result = run(&mut crd, &mut cwr, origin_side, Duration::from_secs(30), &meter).await;
        assert_eq!(result, Err(TunnelEnd::Idle));
    }
}
