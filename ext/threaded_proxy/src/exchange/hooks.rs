//! The user's callbacks on the way through an exchange: on_headers (on
//! every path that has an origin head, the 101 included), on_response
//! (which may read the body) and on_error. Each call that answered counts
//! once in `callbacks_run`, whatever the path.

use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use super::body::Relayed;
use super::{default_answer, Exchange};
use crate::callbacks::{BodyRequest, CallbackEvent, CallbackReply, Rendered, ResponseHead};
use crate::errors::{ErrorReport, ProxyError};
use crate::origin::BoxError;
use crate::relay::BodyLength;

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Exchange<R, W> {
    /// Counts a callback that answered (its reply arrived, a raise
    /// included).
    fn answered(&self) {
        self.proxy.stats.callbacks_run.fetch_add(1, Relaxed);
    }

    /// Calls a callback and waits for its reply (under the callback
    /// timeout). `&mut self`, as every step: the exchange is Send but not
    /// Sync (a request body source is not).
    async fn call(&mut self, event: CallbackEvent) -> Result<CallbackReply, ProxyError> {
        let reply = self
            .proxy
            .callbacks
            .call(self.spec.id, event, &self.spec.target.url())
            .await?;
        self.answered();
        Ok(reply)
    }

    /// on_headers, when the exchange has it, with the head the client is
    /// about to get: the head to go on with, or None when the callback
    /// answered the client itself (it rendered; that answer is written).
    pub(super) async fn on_headers(
        &mut self,
        head: ResponseHead,
    ) -> Result<Option<ResponseHead>, ProxyError> {
        if !self.spec.callbacks.on_headers {
            return Ok(Some(head));
        }
        match self.call(CallbackEvent::Headers(head)).await? {
            CallbackReply::Continue(changed) => Ok(Some(changed)),
            CallbackReply::Render(rendered) => {
                self.write_rendered(rendered).await?;
                Ok(None)
            }
            CallbackReply::Failed { message } => Err(self.callback_error(message)),
        }
    }

    /// `on_response`: the callback may read the body (we buffer it on
    /// request) and then render, or let the origin's response through.
    pub(super) async fn on_response<B>(&mut self, relayed: Relayed<B>) -> Result<(), ProxyError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let proxy = self.proxy;
        let Relayed { head, body, length } = relayed;
        let (body_tx, mut body_rx) = mpsc::unbounded_channel::<BodyRequest>();
        let mut reply_rx = proxy.callbacks.request(
            self.spec.id,
            CallbackEvent::Response(head.clone()),
            Some(body_tx),
            &self.spec.target.url(),
        )?;
        let deadline = tokio::time::Instant::now() + proxy.callbacks.reply_timeout;
        let mut origin_body = Some(body);
        let mut buffered: Option<Bytes> = None;
        let reply = loop {
            tokio::select! {
                reply = tokio::time::timeout_at(deadline, &mut reply_rx) => break reply,
                Some(slot) = body_rx.recv() => {
                    let result = match (&buffered, origin_body.take()) {
                        (Some(bytes), _) => Ok(bytes.clone()),
                        (None, Some(body)) => self.read_whole(body).await,
                        (None, None) => Err(ProxyError::BodyTooLarge { url: self.spec.target.url(), limit: self.spec.max_buffered_body }),
                    };
                    if let Ok(bytes) = &result {
                        buffered = Some(bytes.clone());
                    }
                    let _ = slot.push(result.as_ref().map(Bytes::clone).map_err(ErrorReport::from));
                }
            }
        };
        let reply = match reply {
            Err(_) => return Err(self.callback_error("on_response did not answer in time".to_owned())),
            Ok(Err(_)) => {
                return Err(self.callback_error("on_response finished without answering".to_owned()))
            }
            Ok(Ok(reply)) => reply,
        };
        self.answered();
        match reply {
            CallbackReply::Render(rendered) => self.write_rendered(rendered).await,
            CallbackReply::Failed { message } => Err(self.callback_error(message)),
            CallbackReply::Continue(head) => match (buffered, origin_body) {
                (Some(bytes), _) => {
                    let length = BodyLength::known(bytes.len() as u64);
                    let body = http_body_util::Full::new(bytes);
                    self.relay_copied(Relayed { head, body, length }).await
                }
                (None, Some(body)) => self.relay_copied(Relayed { head, body, length }).await,
                (None, None) => Err(self.callback_error("response body was lost".to_owned())),
            },
        }
    }

    /// `on_error` for a failure before anything was sent: the answer it
    /// rendered, else the default answer (to `err`, or to the callback's
    /// own failure).
    pub(super) async fn on_error(&mut self, err: &ProxyError) -> Rendered {
        match self.call(CallbackEvent::Error(ErrorReport::from(err))).await {
            Ok(CallbackReply::Render(rendered)) => rendered,
            Ok(CallbackReply::Continue(_)) => default_answer(err),
            Ok(CallbackReply::Failed { message }) => default_answer(&self.callback_error(message)),
            Err(callback_err) => default_answer(&callback_err),
        }
    }

    pub(super) fn callback_error(&self, message: String) -> ProxyError {
        ProxyError::Callback {
            url: self.spec.target.url(),
            message,
        }
    }
}
