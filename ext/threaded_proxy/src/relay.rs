//! Writing the response to the client: the writer chooses the framing for
//! the client, encodes the head, frames the body, and finishes cleanly or
//! aborts. Every write is bounded by the idle timeout so a client that
//! stops reading cannot pin the exchange (or its buffers) forever, and
//! every byte written is counted in the exchange's [`Meter`].

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::errors::ProxyError;
use crate::headers::{self, ClientRequest, Framing, HeaderList};
use crate::stats::Meter;

/// What is known of a body's length before it is sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BodyLength {
    /// The exact length the body will have (its size hint): framing by
    /// Content-Length needs it.
    pub exact: Option<u64>,
    /// The Content-Length the origin's head declared, kept on a bodiless
    /// answer (HEAD, 304) where there is no body to measure.
    pub declared: Option<u64>,
}

impl BodyLength {
    /// A body of `n` bytes, declared so as well (rendered and buffered
    /// bodies).
    pub fn known(n: u64) -> BodyLength {
        BodyLength {
            exact: Some(n),
            declared: Some(n),
        }
    }
}

pub struct ClientWriter<W> {
    /// The client's write half (borrowed: tokio's owned half would send a
    /// FIN on drop and make an aborted body look complete).
    io: W,
    /// The longest any write may wait for the client.
    idle: Duration,
    /// What the client asked in a way that decides the framing (a HEAD,
    /// HTTP/1.0).
    client: ClientRequest,
    /// The framing chosen with the head; governs every body chunk.
    framing: Framing,
    /// The exchange's byte counts: every byte written here, head included,
    /// goes in (and on into the stats).
    meter: Meter,
    /// Body bytes written, to check a Content-Length promise was kept.
    body_written: u64,
    /// Once true, an error must abort the connection: a clean close could
    /// make a cut-off body look complete.
    pub head_sent: bool,
    /// A head given to `hold_head`, not written yet: it goes out in the same
    /// writev as the next bytes (one segment, one syscall for a small
    /// answer), or alone from `flush_head` before anything waits.
    held_head: Option<Bytes>,
}

impl<W: AsyncWrite + Unpin> ClientWriter<W> {
    pub fn new(io: W, idle: Duration, client: ClientRequest, meter: Meter) -> Self {
        ClientWriter {
            io,
            idle,
            client,
            framing: Framing::None,
            meter,
            body_written: 0,
            head_sent: false,
            held_head: None,
        }
    }

    /// The exchange's byte counts.
    pub fn meter(&self) -> &Meter {
        &self.meter
    }

    /// Writes `buf`, after the held head if there is one.
    async fn write_buf<B: Buf>(&mut self, buf: B) -> Result<(), ProxyError> {
        let mut buf = Buf::chain(self.held_head.take().unwrap_or_default(), buf);
        let len = buf.remaining() as u64;
        match tokio::time::timeout(self.idle, self.io.write_all_buf(&mut buf)).await {
            Ok(Ok(())) => {
                self.meter.to_client(len);
                Ok(())
            }
            Ok(Err(e)) => Err(ProxyError::client(&e)),
            Err(_) => Err(ProxyError::client_idle(self.idle)),
        }
    }

    /// The framing this client gets for a `status` answer with a body of
    /// `exact` length (None: unknown).
    pub fn framing_for(&self, status: u16, exact: Option<u64>) -> Framing {
        headers::framing(status, self.client, exact)
    }

    /// Chooses the framing, encodes the head and holds it: it goes out
    /// with the first body bytes (or `flush_head`, or `finish`), so a small
    /// answer is one writev. The caller must flush it before waiting for
    /// anything. Returns the framing (`Framing::None`: send no body).
    pub fn hold_head(
        &mut self,
        status: u16,
        reason: Option<&str>,
        headers: &HeaderList,
        length: BodyLength,
    ) -> Framing {
        let framing = self.framing_for(status, length.exact);
        let mut buf = BytesMut::new();
        headers::write_head(&mut buf, status, reason, headers, framing, length.declared);
        self.hold_encoded(buf, framing);
        framing
    }

    /// Sends a 101 (or 200 for CONNECT) that starts a tunnel, naming the
    /// `protocol` switched to; nothing is framed after it.
    pub async fn send_switch_head(
        &mut self,
        status: u16,
        headers: &HeaderList,
        protocol: Option<&[u8]>,
    ) -> Result<(), ProxyError> {
        let mut buf = BytesMut::new();
        headers::write_switch_head(&mut buf, status, headers, protocol);
        self.send_encoded(buf, Framing::None).await
    }

    /// Sends an encoded head; `framing` then governs every body chunk.
    async fn send_encoded(&mut self, head: BytesMut, framing: Framing) -> Result<(), ProxyError> {
        self.hold_encoded(head, framing);
        self.flush_head().await
    }

    /// Holds an encoded head (see `hold_head`).
    fn hold_encoded(&mut self, head: BytesMut, framing: Framing) {
        self.framing = framing;
        self.head_sent = true;
        self.held_head = Some(head.freeze());
    }

    pub fn head_held(&self) -> bool {
        self.held_head.is_some()
    }

    /// Writes a held head now.
    pub async fn flush_head(&mut self) -> Result<(), ProxyError> {
        match self.held_head {
            Some(_) => self.write_buf(Bytes::new()).await,
            None => Ok(()),
        }
    }

    /// The raw client writer and the meter, for a tunnel (after the head
    /// went out), which writes and counts around this writer.
    pub fn tunnel_halves(&mut self) -> (&mut W, &Meter) {
        (&mut self.io, &self.meter)
    }

    /// Counts body bytes that reached the client around this writer
    /// (splice, which counted them in the meter), so `finish` still checks
    /// the Content-Length promise.
    pub fn add_spliced(&mut self, n: u64) {
        self.body_written += n;
    }

    /// Sends one piece of body in the chosen framing.
    pub async fn send_body(&mut self, data: Bytes) -> Result<(), ProxyError> {
        if data.is_empty() {
            return Ok(());
        }
        let len = data.len() as u64;
        match self.framing {
            Framing::None => return Ok(()),
            Framing::Chunked => {
                let mut prefix = [0u8; 18];
                let prefix = chunk_prefix(data.len(), &mut prefix);
                self.write_buf(Buf::chain(prefix, data).chain(&b"\r\n"[..]))
                    .await?;
            }
            Framing::Length(total) => {
                if self.body_written + len > total {
                    return Err(ProxyError::Internal {
                        message: format!("body longer than its Content-Length {total}"),
                    });
                }
                self.write_buf(data).await?;
            }
            Framing::Close => self.write_buf(data).await?,
        }
        self.body_written += len;
        Ok(())
    }

    /// Ends the body (last chunk), flushes and half-closes. An error if a
    /// Content-Length promise was not kept.
    pub async fn finish(&mut self) -> Result<(), ProxyError> {
        if self.framing != Framing::Chunked {
            // (The last chunk carries it otherwise.)
            self.flush_head().await?;
        }
        match self.framing {
            Framing::Chunked => self.write_buf(&b"0\r\n\r\n"[..]).await?,
            Framing::Length(total) if self.body_written != total => {
                return Err(ProxyError::Internal {
                    message: format!("body ended after {} of {total} bytes", self.body_written),
                })
            }
            _ => {}
        }
        let _ = tokio::time::timeout(self.idle, self.io.flush()).await;
        let _ = tokio::time::timeout(self.idle, self.io.shutdown()).await;
        Ok(())
    }
}

/// `<hex length>\r\n` in `buf`, without allocating (one per chunk).
fn chunk_prefix(len: usize, buf: &mut [u8; 18]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1) as usize;
    for i in 0..digits {
        buf[digits - 1 - i] = HEX[(len >> (4 * i)) & 0xf];
    }
    buf[digits] = b'\r';
    buf[digits + 1] = b'\n';
    &buf[..digits + 2]
}

/// Completes when the client closes its side (EOF or error). Data a client
/// sends after its request (pipelining) is read and discarded.
pub async fn client_gone<R: AsyncRead + Unpin>(rd: &mut R) {
    let mut buf = [0u8; 512];
    loop {
        match rd.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// After a clean finish: wait briefly for the client to close so unread
/// input does not turn our close into an RST.
pub async fn drain<R: AsyncRead + Unpin>(rd: &mut R, limit: Duration) {
    let _ = tokio::time::timeout(limit, client_gone(rd)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_writer<W: AsyncWrite + Unpin>(io: W) -> ClientWriter<W> {
        let stats: &'static crate::stats::Stats = Box::leak(Box::default());
        let client = ClientRequest {
            head_only: false,
            http10: false,
        };
        ClientWriter::new(io, Duration::from_secs(3), client, Meter::new(stats))
    }

    async fn written(framing: Framing, chunks: &[&[u8]]) -> (Vec<u8>, Result<(), ProxyError>) {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let mut writer = test_writer(client);
        writer
            .send_encoded(BytesMut::from(&b"HEAD\r\n\r\n"[..]), framing)
            .await
            .unwrap();
        let mut result = Ok(());
        for c in chunks {
            result = writer.send_body(Bytes::copy_from_slice(c)).await;
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() {
            result = writer.finish().await;
        }
        drop(writer);
        let mut out = Vec::new();
        server.read_to_end(&mut out).await.unwrap();
        (out, result)
    }

    #[test]
    fn chunk_prefixes_are_lowercase_hex() {
        let mut buf = [0u8; 18];
        assert_eq!(chunk_prefix(0, &mut buf), b"0\r\n");
        assert_eq!(chunk_prefix(5, &mut buf), b"5\r\n");
        assert_eq!(chunk_prefix(65536, &mut buf), b"10000\r\n");
        assert_eq!(chunk_prefix(0xabc, &mut buf), b"abc\r\n");
    }

    #[tokio::test]
    async fn chunked_framing_wraps_each_piece_and_ends_with_zero_chunk() {
        let (out, result) = written(Framing::Chunked, &[b"hello", b"", b" world!"]).await;
        result.unwrap();
        assert_eq!(out, b"HEAD\r\n\r\n5\r\nhello\r\n7\r\n world!\r\n0\r\n\r\n");
    }

    #[tokio::test]
    async fn length_framing_passes_bytes_and_checks_the_promise() {
        let (out, result) = written(Framing::Length(5), &[b"he", b"llo"]).await;
        result.unwrap();
        assert_eq!(out, b"HEAD\r\n\r\nhello");
        let (_, short) = written(Framing::Length(6), &[b"hello"]).await;
        assert!(short.is_err());
        let (_, long) = written(Framing::Length(4), &[b"hello"]).await;
        assert!(long.is_err());
    }

    #[tokio::test]
    async fn no_body_framing_writes_nothing_after_the_head() {
        let (out, result) = written(Framing::None, &[b"ignored"]).await;
        result.unwrap();
        assert_eq!(out, b"HEAD\r\n\r\n");
    }

    /// Keeps every write call's bytes apart, to see what went out together.
    #[derive(Default)]
    struct WriteCalls(Vec<Vec<u8>>);

    impl AsyncWrite for WriteCalls {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.0.push(buf.to_vec());
            std::task::Poll::Ready(Ok(buf.len()))
        }

        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let call = bufs.iter().flat_map(|b| b.iter().copied()).collect::<Vec<u8>>();
            let n = call.len();
            self.0.push(call);
            std::task::Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn held(framing: Framing) -> ClientWriter<WriteCalls> {
        let mut writer = test_writer(WriteCalls::default());
        writer.hold_encoded(BytesMut::from(&b"HEAD\r\n\r\n"[..]), framing);
        writer
    }

    #[tokio::test]
    async fn a_held_head_leaves_in_one_write_with_the_first_body_bytes() {
        let mut writer = held(Framing::Length(7));
        assert!(writer.head_held() && writer.head_sent);
        writer.send_body(Bytes::from_static(b"hello")).await.unwrap();
        writer.send_body(Bytes::from_static(b"!!")).await.unwrap();
        writer.finish().await.unwrap();
        assert_eq!(writer.io.0, [&b"HEAD\r\n\r\nhello"[..], b"!!"]);
        assert_eq!(writer.meter().client_bytes(), 8 + 7);

        let mut chunked = held(Framing::Chunked);
        chunked.send_body(Bytes::from_static(b"abc")).await.unwrap();
        chunked.finish().await.unwrap();
        assert_eq!(chunked.io.0, [&b"HEAD\r\n\r\n3\r\nabc\r\n"[..], b"0\r\n\r\n"]);
    }

    #[tokio::test]
    async fn a_held_head_goes_out_alone_when_flushed_or_at_the_end() {
        let mut flushed = held(Framing::Close);
        flushed.flush_head().await.unwrap();
        assert!(!flushed.head_held());
        flushed.flush_head().await.unwrap();
        flushed.send_body(Bytes::from_static(b"data")).await.unwrap();
        assert_eq!(flushed.io.0, [&b"HEAD\r\n\r\n"[..], b"data"]);

        let mut bodiless = held(Framing::None);
        bodiless.finish().await.unwrap();
        assert_eq!(bodiless.io.0, [b"HEAD\r\n\r\n"]);

        let mut empty_chunked = held(Framing::Chunked);
        empty_chunked.finish().await.unwrap();
        assert_eq!(empty_chunked.io.0, [b"HEAD\r\n\r\n0\r\n\r\n"]);

        // A broken promise still sends the head first, as an unheld one would.
        let mut short = held(Framing::Length(3));
        assert!(short.finish().await.is_err());
        assert_eq!(short.io.0, [b"HEAD\r\n\r\n"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_reads_nothing_times_out() {
        let (client, _server) = tokio::io::duplex(16);
        let mut writer = test_writer(client);
        let err = writer
            .send_encoded(BytesMut::from(&[b'x'; 64][..]), Framing::Close)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("read nothing"), "{err}");
    }
}
