//! The response body read straight off the origin socket (Content-Length,
//! chunked or close-delimited), which gives the connection back to the
//! pool once complete, and hands the socket to `splice` when asked.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::Method;
use http_body::{Body, Frame, SizeHint};
use tokio::net::TcpStream;

use super::codec::{content_length, has_token, last_transfer_coding, parse_chunk_size, ResponseHead};
use super::pool::PoolShared;
use crate::origin::body::BoxError;

/// Longest chunk-size line or trailer section.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 64 * 1024;
/// Bytes asked of the socket per read while a body flows.
const READ_SIZE: usize = 64 * 1024;

/// How the rest of the body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyFraming {
    /// This many bytes still to come.
    Length(u64),
    Chunked(ChunkState),
    /// Until the origin closes.
    Close,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Expecting `<hex size>[;ext]\r\n`.
    Size,
    /// This many bytes of the current chunk still to come.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one; the bytes of
    /// trailers seen so far.
    Trailers(usize),
}

/// The response body read straight from the origin socket; gives the
/// connection back to the pool once complete.
pub struct PlainBody {
    /// None once the body is complete (the connection pooled or closed).
    stream: Option<TcpStream>,
    /// Bytes read from the socket but not yet handed out.
    buf: BytesMut,
    framing: BodyFraming,
    /// Where a reusable connection goes back after a complete body.
    pool: Option<(Arc<PoolShared>, String)>,
    /// The first data, decoded by `check_start` before the head was
    /// handed over.
    first: Option<Bytes>,
}

impl PlainBody {
    pub(super) fn new(
        stream: TcpStream,
        buf: BytesMut,
        method: &Method,
        head: &ResponseHead,
        pool: &Arc<PoolShared>,
        key: String,
    ) -> Result<PlainBody, String> {
        let headers = &head.headers;
        let status = head.status.as_u16();
        let mut keep_alive = !has_token(headers, http::header::CONNECTION, "close");
        let framing = if *method == Method::HEAD || status == 204 || status == 304 {
            BodyFraming::Done
        } else if let Some(last) = last_transfer_coding(headers) {
            if last.eq_ignore_ascii_case("chunked") {
                // With a Content-Length too, the exchange refuses the
                // response; never reuse such a connection.
                keep_alive &= !headers.contains_key(http::header::CONTENT_LENGTH);
                BodyFraming::Chunked(ChunkState::Size)
            } else {
                keep_alive = false;
                BodyFraming::Close
            }
        } else if headers.contains_key(http::header::CONTENT_LENGTH) {
            BodyFraming::Length(content_length(headers)?)
        } else {
            keep_alive = false;
            BodyFraming::Close
        };
        let mut body = PlainBody {
            stream: Some(stream),
            buf,
            framing,
            pool: keep_alive.then(|| (pool.clone(), key)),
            first: None,
        };
        if body.framing == BodyFraming::Length(0) {
            body.framing = BodyFraming::Done;
        }
        if body.framing == BodyFraming::Done {
            body.complete();
        }
        Ok(body)
    }

    /// Validates the start of a chunked body before the exchange commits
    /// to the head: a bad first chunk-size line, or oversized trailers after
    /// the last chunk, must be a 502, not a 200 cut by a reset. It decodes
    /// what came with the head and waits only for an element the origin
    /// has begun to send (a partial size line) or for the trailers after a
    /// last chunk; when the head came alone it returns at once, so an event
    /// stream's head never waits for its first event. The first data found
    /// is kept for `poll_frame`.
    pub(super) async fn check_start(&mut self) -> Result<(), String> {
        loop {
            let BodyFraming::Chunked(state) = self.framing else {
                return Ok(());
            };
            let in_trailers = matches!(state, ChunkState::Trailers(_));
            if self.buf.is_empty() && !in_trailers {
                return Ok(());
            }
            if let Some(n) = self.decode_chunked()? {
                self.first = Some(self.buf.split_to(n).freeze());
                return Ok(());
            }
            if self.framing == BodyFraming::Done {
                return Ok(());
            }
            match std::future::poll_fn(|cx| self.poll_fill(cx)).await {
                Ok(true) => {}
                Ok(false) => {
                    return Err("origin closed the connection in the middle of a chunked body".to_owned())
                }
                Err(e) => return Err(format!("reading the response body: {e}")),
            }
        }
    }

    /// For `splice`: the socket, the body bytes already read, and how many
    /// are still to come, when the body has a known length.
    pub fn take_for_splice(&mut self) -> Option<(Bytes, u64)> {
        match self.framing {
            BodyFraming::Length(left) if self.stream.is_some() => {
                let buffered = (self.buf.len() as u64).min(left);
                let head = self.buf.split_to(buffered as usize).freeze();
                if !self.buf.is_empty() {
                    // More than the body: the connection cannot be reused.
                    self.pool = None;
                }
                self.framing = BodyFraming::Length(left - buffered);
                Some((head, left - buffered))
            }
            _ => None,
        }
    }

    /// The origin socket, for splicing the bytes `take_for_splice` counted.
    pub fn stream(&self) -> Option<&TcpStream> {
        self.stream.as_ref()
    }

    /// After a splice moved every remaining byte: the body is complete.
    pub fn spliced_to_end(&mut self) {
        self.framing = BodyFraming::Done;
        self.complete();
    }

    /// The body is over: pool the connection if it may be reused.
    fn complete(&mut self) {
        self.framing = BodyFraming::Done;
        let stream = self.stream.take();
        if let (Some(stream), Some((pool, key))) = (stream, self.pool.take()) {
            if self.buf.is_empty() {
                pool.put(key, stream);
            }
        }
        self.buf = BytesMut::new();
    }

    /// Reads more from the socket into `buf`: Ok(false) at EOF. An empty
    /// buffer is released before waiting, so a quiet stream holds none.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<bool>> {
        let Some(stream) = self.stream.as_ref() else {
            return Poll::Ready(Ok(false));
        };
        loop {
            self.buf.reserve(READ_SIZE);
            match stream.try_read_buf(&mut self.buf) {
                Ok(0) => return Poll::Ready(Ok(false)),
                Ok(_) => return Poll::Ready(Ok(true)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if self.buf.is_empty() {
                        self.buf = BytesMut::new();
                    }
                    ready!(stream.poll_read_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn data(&mut self, n: usize) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(Some(Ok(Frame::data(self.buf.split_to(n).freeze()))))
    }

    /// Advances the chunked decoder over `buf`: Some(n) to hand out n bytes,
    /// None when more input is needed or the body just ended.
    fn decode_chunked(&mut self) -> Result<Option<usize>, String> {
        loop {
            let BodyFraming::Chunked(state) = self.framing else {
                return Ok(None);
            };
            match state {
                ChunkState::Size => {
                    let Some(line_end) = self.buf.iter().position(|&b| b == b'\n') else {
                        if self.buf.len() > MAX_CHUNK_LINE {
                            return Err("chunk size line too long".to_owned());
                        }
                        return Ok(None);
                    };
                    let size = parse_chunk_size(&self.buf[..line_end])?;
                    self.buf.advance(line_end + 1);
                    self.framing = BodyFraming::Chunked(if size == 0 {
                        ChunkState::Trailers(0)
                    } else {
                        ChunkState::Data(size)
                    });
                }
                ChunkState::Data(left) => {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    let n = (self.buf.len() as u64).min(left);
                    self.framing = BodyFraming::Chunked(if n == left {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - n)
                    });
                    return Ok(Some(n as usize));
                }
                ChunkState::DataEnd => {
                    if self.buf.len() < 2 {
                        return Ok(None);
                    }
                    if &self.buf[..2] != b"\r\n" {
                        return Err("chunk data not followed by CRLF".to_owned());
                    }
                    self.buf.advance(2);
                    self.framing = BodyFraming::Chunked(ChunkState::Size);
                }
                ChunkState::Trailers(seen) => {
                    let Some(line_end) = self.buf.iter().position(|&b| b == b'\n') else {
                        if seen + self.buf.len() > MAX_TRAILERS {
                            return Err("trailers too long".to_owned());
                        }
                        return Ok(None);
                    };
                    let empty = line_end == 0 || (line_end == 1 && self.buf[0] == b'\r');
                    self.buf.advance(line_end + 1);
                    if empty {
                        self.complete();
                        return Ok(None);
                    }
                    let seen = seen + line_end + 1;
                    if seen > MAX_TRAILERS {
                        return Err("trailers too long".to_owned());
                    }
                    self.framing = BodyFraming::Chunked(ChunkState::Trailers(seen));
                }
            }
        }
    }
}

impl Body for PlainBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        loop {
            match this.framing {
                BodyFraming::Done => return Poll::Ready(None),
                BodyFraming::Length(left) => {
                    if !this.buf.is_empty() {
                        let n = (this.buf.len() as u64).min(left);
                        let left = left - n;
                        let frame = this.data(n as usize);
                        this.framing = BodyFraming::Length(left);
                        if left == 0 {
                            this.complete();
                        }
                        return frame;
                    }
                }
                BodyFraming::Close => {
                    if !this.buf.is_empty() {
                        let n = this.buf.len();
                        return this.data(n);
                    }
                }
                BodyFraming::Chunked(_) => match this.decode_chunked() {
                    Ok(Some(n)) => return this.data(n),
                    Ok(None) if this.framing == BodyFraming::Done => return Poll::Ready(None),
                    Ok(None) => {}
                    Err(message) => {
                        this.stream = None;
                        this.framing = BodyFraming::Done;
                        return Poll::Ready(Some(Err(message.into())));
                    }
                },
            }
            match ready!(this.poll_fill(cx)) {
                Ok(true) => {}
                Ok(false) if this.framing == BodyFraming::Close => {
                    this.framing = BodyFraming::Done;
                    this.stream = None;
                    return Poll::Ready(None);
                }
                Ok(false) => {
                    this.stream = None;
                    let what = match this.framing {
                        BodyFraming::Length(left) => format!("with {left} body bytes still to come"),
                        _ => "in the middle of a chunked body".to_owned(),
                    };
                    this.framing = BodyFraming::Done;
                    return Poll::Ready(Some(Err(format!("origin closed the connection {what}").into())));
                }
                Err(e) => {
                    this.stream = None;
                    this.framing = BodyFraming::Done;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == BodyFraming::Done && self.first.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            BodyFraming::Done if self.first.is_none() => SizeHint::with_exact(0),
            BodyFraming::Length(left) => SizeHint::with_exact(left),
            _ => SizeHint::default(),
        }
    }
}
