//! Request bodies: where the bytes sent to the origin come from (nothing,
//! bytes in memory, a file read from an offset, or a reader of stored
//! chunks) and the body type both origin clients send.

use std::error::Error as StdError;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use tokio::sync::mpsc;

pub type BoxError = Box<dyn StdError + Send + Sync>;
pub type RequestBody = BoxBody<Bytes, BoxError>;

/// Where the request body comes from.
pub enum BodySource {
    Empty,
    Bytes(Bytes),
    /// A file (Puma's Tempfile for a large upload, or a user's File) read
    /// from `offset` to its end, never whole into memory.
    File {
        file: std::fs::File,
        offset: u64,
    },
    /// `length` bytes fetched piece by piece on a blocking thread:
    /// `read(offset, max)` returns up to `max` bytes from `offset` (a
    /// deferred delivery's body, read back from its queue).
    Chunks {
        length: u64,
        chunk: usize,
        read: ChunkReader,
    },
}

impl BodySource {
    /// A second source for the same bytes, to send a request again (an
    /// HTTP/2 origin refused it unprocessed); None for a source that can be
    /// read only once.
    pub fn try_clone(&self) -> Option<BodySource> {
        match self {
            BodySource::Empty => Some(BodySource::Empty),
            BodySource::Bytes(bytes) => Some(BodySource::Bytes(bytes.clone())),
            BodySource::File { file, offset } => file.try_clone().ok().map(|file| BodySource::File {
                file,
                offset: *offset,
            }),
            BodySource::Chunks { .. } => None,
        }
    }

    /// No bytes to send (nil, or an empty string).
    pub fn is_empty(&self) -> bool {
        match self {
            BodySource::Empty => true,
            BodySource::Bytes(bytes) => bytes.is_empty(),
            _ => false,
        }
    }
}

pub type ChunkReader = Box<dyn FnMut(u64, usize) -> std::io::Result<Vec<u8>> + Send>;

const FILE_CHUNK: usize = 64 * 1024;

impl BodySource {
    pub fn into_body(self) -> Result<RequestBody, std::io::Error> {
        Ok(match self {
            BodySource::Empty => Empty::new().map_err(|never| match never {}).boxed(),
            BodySource::Bytes(bytes) => Full::new(bytes).map_err(|never| match never {}).boxed(),
            BodySource::File { file, offset } => {
                let length = file.metadata()?.len().saturating_sub(offset);
                // Positioned reads: a clone of this source (a retried
                // request) shares the descriptor's file offset.
                let read = move |position, max| {
                    let mut buf = vec![0u8; max];
                    let n = file.read_at(&mut buf, offset + position)?;
                    buf.truncate(n);
                    Ok(buf)
                };
                ChannelBody::spawn(length, FILE_CHUNK, Box::new(read))
            }
            BodySource::Chunks { length, chunk, read } => ChannelBody::spawn(length, chunk, read),
        })
    }
}

/// A request body fed by a reader thread, with an exact length so hyper
/// sends Content-Length rather than chunked.
struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    left: u64,
}

impl ChannelBody {
    /// Starts the reader: a blocking thread reads ahead at most the
    /// channel's four chunks and stops when the request is dropped or a
    /// read fails (a source that ends early is an error, never a short
    /// body).
    fn spawn(length: u64, chunk: usize, mut read: ChunkReader) -> RequestBody {
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let mut offset = 0u64;
            while offset < length {
                let want = chunk.max(1).min((length - offset) as usize);
                let item = match read(offset, want) {
                    Ok(buf) if buf.is_empty() => Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "request body source shrank",
                    )),
                    Ok(buf) => {
                        offset += buf.len() as u64;
                        Ok(Bytes::from(buf))
                    }
                    Err(e) => Err(e),
                };
                let failed = item.is_err();
                if tx.blocking_send(item).is_err() || failed {
                    return;
                }
            }
        });
        ChannelBody { rx, left: length }.boxed()
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(bytes))) => {
                self.left = self.left.saturating_sub(bytes.len() as u64);
                Poll::Ready(Some(Ok(Frame::data(bytes))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(Some(Err("request body reader stopped".into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(source: BodySource) -> Vec<u8> {
        source
            .into_body()
            .unwrap()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec()
    }

    #[tokio::test]
    async fn a_cloned_file_body_sends_the_same_bytes_even_read_at_the_same_time() {
        let path = std::env::temp_dir().join(format!("threaded-proxy-body-{}", std::process::id()));
        let content: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let source = BodySource::File { file, offset: 7 };
        let copy = source.try_clone().expect("a file body can be sent twice");
        // Both read concurrently through descriptors sharing one offset.
        let (a, b) = tokio::join!(read_all(source), read_all(copy));
        assert!(a == content[7..] && b == content[7..]);
        let chunks = BodySource::Chunks {
            length: 1,
            chunk: 1,
            read: Box::new(|_, _| Ok(vec![0])),
        };
        assert!(chunks.try_clone().is_none(), "a one-shot source is not replayed");
    }
}
