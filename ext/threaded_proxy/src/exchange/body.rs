//! The origin's body to the client: spliced from socket to socket when a
//! plain-http body of known length passes unchanged, else copied frame by
//! frame through the client writer (which frames it). Every origin byte is
//! counted in the exchange's meter as it is read.

use std::future::Future;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite};

use super::Exchange;
use crate::callbacks::ResponseHead;
use crate::errors::ProxyError;
use crate::headers::Framing;
use crate::limits;
use crate::origin::{self, BoxError, OriginBody, PlainBody};
use crate::relay::BodyLength;
use crate::splice;

/// An origin response on its way to the client: the head (as the checks
/// and on_headers left it), the body, and what is known of its length.
pub(super) struct Relayed<B> {
    /// Status, reason and end-to-end headers for the client.
    pub head: ResponseHead,
    /// The body as the origin client gave it (or as on_response buffered
    /// it).
    pub body: B,
    /// The body's exact length and declared Content-Length.
    pub length: BodyLength,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Exchange<R, W> {
    /// Relays the origin's response: a plain-http body may be spliced.
    pub(super) async fn relay(&mut self, relayed: Relayed<OriginBody>) -> Result<(), ProxyError> {
        let Relayed { head, body, length } = relayed;
        match body {
            OriginBody::Plain(body) => self.relay_plain(Relayed { head, body, length }).await,
            body => self.relay_copied(Relayed { head, body, length }).await,
        }
    }

    /// Writes the (possibly changed) head and copies the body.
    pub(super) async fn relay_copied<B>(&mut self, relayed: Relayed<B>) -> Result<(), ProxyError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let framing = self.hold_origin_head(&relayed.head, relayed.length)?;
        if framing != Framing::None {
            self.copy_body(relayed.body, true).await?;
        }
        self.finish().await
    }

    /// Checks the (possibly changed) origin head and holds it for the body.
    fn hold_origin_head(&mut self, head: &ResponseHead, length: BodyLength) -> Result<Framing, ProxyError> {
        self.validate_head(&head.headers)?;
        Ok(self.hold_head(head.status, head.reason.as_deref(), &head.headers, length))
    }

    /// A plain-http origin body: spliced from socket to socket when it is
    /// relayed unchanged with a known length, else copied.
    async fn relay_plain(&mut self, relayed: Relayed<PlainBody>) -> Result<(), ProxyError> {
        let Relayed {
            head,
            mut body,
            length,
        } = relayed;
        let framing = self.writer.framing_for(head.status, length.exact);
        let spliceable = matches!((framing, length.exact), (Framing::Length(n), Some(m)) if n == m && n >= splice::MIN_BODY);
        // A splice needs three more descriptors: copied instead when the
        // budget has not got them (or the kernel refuses the pipe).
        let reserved = spliceable
            && self
                .permit
                .as_mut()
                .is_some_and(|p| p.reserve_more(limits::SPLICE_FDS));
        let splicer = if reserved {
            splice::Splicer::new(self.client_fd).ok()
        } else {
            None
        };
        if reserved && splicer.is_none() {
            self.release_splice_fds();
        }
        let Some(splicer) = splicer else {
            let body = OriginBody::Plain(body);
            return self.relay_copied(Relayed { head, body, length }).await;
        };
        self.hold_origin_head(&head, length)?;
        // At once: the splice writes to the socket itself.
        self.writer.flush_head().await?;
        let Some((buffered, left)) = body.take_for_splice() else {
            return Err(ProxyError::Internal {
                message: "origin body lost its length before the splice".to_owned(),
            });
        };
        if !buffered.is_empty() {
            self.writer.meter().from_origin(buffered.len() as u64);
            self.writer.send_body(buffered).await?;
        }
        let Some(origin) = body.stream() else {
            return Err(ProxyError::Internal {
                message: "origin connection lost before the splice".to_owned(),
            });
        };
        let before = self.writer.meter().client_bytes();
        let copied = splicer
            .copy(origin, left, self.spec.timeouts.idle, self.writer.meter())
            .await;
        let spliced = self.writer.meter().client_bytes() - before;
        self.writer.add_spliced(spliced);
        drop(splicer);
        self.release_splice_fds();
        copied.map_err(|end| end.into_error(&self.spec.target.url(), self.spec.timeouts.idle))?;
        body.spliced_to_end();
        self.finish().await
    }

    fn release_splice_fds(&mut self) {
        if let Some(permit) = self.permit.as_mut() {
            permit.release(limits::SPLICE_FDS);
        }
    }

    /// Copies a body frame by frame, each frame bounded by the idle timeout.
    /// A held head goes out with the first frame if that frame is already
    /// here, else alone before waiting: an event stream's head must not
    /// wait for its first event.
    pub(super) async fn copy_body<B>(&mut self, mut body: B, from_origin: bool) -> Result<(), ProxyError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        if self.writer.head_held() {
            let ready = {
                let mut next = std::pin::pin!(self.next_data(&mut body, from_origin));
                std::future::poll_fn(|cx| Poll::Ready(next.as_mut().poll(cx))).await
            };
            match ready {
                Poll::Ready(Ok(Some(data))) => self.writer.send_body(data).await?,
                // finish() sends the head (with the last chunk, if chunked).
                Poll::Ready(Ok(None)) => return Ok(()),
                Poll::Ready(Err(e)) => {
                    self.writer.flush_head().await?;
                    return Err(e);
                }
                Poll::Pending => self.writer.flush_head().await?,
            }
        }
        while let Some(data) = self.next_data(&mut body, from_origin).await? {
            self.writer.send_body(data).await?;
        }
        Ok(())
    }

    /// Reads a whole body into memory, refusing more than `max_buffered_body`.
    pub(super) async fn read_whole<B>(&mut self, mut body: B) -> Result<Bytes, ProxyError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let limit = self.spec.max_buffered_body;
        let mut buf = BytesMut::new();
        while let Some(data) = self.next_data(&mut body, true).await? {
            if buf.len() + data.len() > limit {
                return Err(ProxyError::BodyTooLarge {
                    url: self.spec.target.url(),
                    limit,
                });
            }
            buf.extend_from_slice(&data);
        }
        Ok(buf.freeze())
    }

    /// The next data frame of a body (trailers skipped), waiting at most the
    /// idle timeout; counted as origin bytes when `from_origin`.
    async fn next_data<B>(&mut self, body: &mut B, from_origin: bool) -> Result<Option<Bytes>, ProxyError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        loop {
            let frame = match tokio::time::timeout(self.spec.timeouts.idle, body.frame()).await {
                Err(_) => {
                    return Err(ProxyError::Timeout {
                        url: self.spec.target.url(),
                        phase: "waiting for the response body",
                    })
                }
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) => {
                    let e: BoxError = e.into();
                    return Err(ProxyError::Upstream {
                        url: self.spec.target.url(),
                        message: origin::error::error_chain(e.as_ref()),
                        errno: None,
                    });
                }
                Ok(Some(Ok(frame))) => frame,
            };
            if let Ok(data) = frame.into_data() {
                if from_origin {
                    self.writer.meter().from_origin(data.len() as u64);
                }
                return Ok(Some(data));
            }
        }
    }
}
