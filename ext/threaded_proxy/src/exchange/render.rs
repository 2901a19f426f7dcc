//! Answers the proxy writes itself rather than relays: what a callback
//! rendered (bytes or a file), and the answer to a failure before anything
//! was sent (on_error's, else the default for the error's kind).

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};

use super::Exchange;
use crate::callbacks::{Rendered, RenderedBody};
use crate::errors::ProxyError;
use crate::headers::{Framing, HeaderList};
use crate::origin::BodySource;
use crate::relay::BodyLength;

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Exchange<R, W> {
    /// Sends what a callback rendered, framed by its known length.
    pub(super) async fn write_rendered(&mut self, rendered: Rendered) -> Result<(), ProxyError> {
        self.validate_head(&rendered.headers)?;
        match rendered.body {
            RenderedBody::Bytes(bytes) => {
                let length = BodyLength::known(bytes.len() as u64);
                let framing = self.hold_head(rendered.status, None, &rendered.headers, length);
                if framing != Framing::None {
                    self.copy_body(http_body_util::Full::new(bytes), false).await?;
                }
            }
            RenderedBody::File(mut file) => {
                use std::io::Seek;
                let offset = file.stream_position().map_err(|e| self.file_error(e))?;
                let length = file
                    .metadata()
                    .map_err(|e| self.file_error(e))?
                    .len()
                    .saturating_sub(offset);
                let body = BodySource::File { file, offset }
                    .into_body()
                    .map_err(|e| self.file_error(e))?;
                let length = BodyLength::known(length);
                let framing = self.hold_head(rendered.status, None, &rendered.headers, length);
                if framing != Framing::None {
                    self.copy_body(body, false).await?;
                }
            }
        }
        self.finish().await
    }

    fn file_error(&self, e: std::io::Error) -> ProxyError {
        ProxyError::Callback {
            url: self.spec.target.url(),
            message: format!("cannot read the rendered body: {e}"),
        }
    }

    /// The answer to a failure before anything was sent: what `on_error`
    /// renders, else the status for the error's kind.
    pub(super) async fn answer_error(&mut self, err: &ProxyError) -> Result<(), ProxyError> {
        let answer = if self.spec.callbacks.on_error {
            self.on_error(err).await
        } else {
            default_answer(err)
        };
        self.write_rendered(answer).await
    }
}

/// The plain answer for an error nobody rendered.
pub fn default_answer(err: &ProxyError) -> Rendered {
    let status = err.status();
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let mut headers: HeaderList = vec![
        (
            "content-type".to_owned(),
            Bytes::from_static(b"text/plain; charset=utf-8"),
        ),
        (
            "x-threaded-proxy-error".to_owned(),
            Bytes::from(err.kind().as_str()),
        ),
    ];
    if status == 503 {
        headers.push(("retry-after".to_owned(), Bytes::from_static(b"1")));
    }
    Rendered {
        status,
        headers,
        body: RenderedBody::Bytes(Bytes::from(format!("{status} {reason}\n"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_answers_map_kinds_to_statuses() {
        let overload = default_answer(&ProxyError::Overload {
            url: "u".into(),
            message: "m".into(),
        });
        assert_eq!(overload.status, 503);
        assert!(overload
            .headers
            .iter()
            .any(|(n, v)| n == "retry-after" && v == "1"));
        let timeout = default_answer(&ProxyError::Timeout {
            url: "u".into(),
            phase: "p",
        });
        assert_eq!(timeout.status, 504);
        let connect = default_answer(&ProxyError::Connect {
            url: "u".into(),
            message: "m".into(),
            errno: Some(111),
        });
        assert_eq!(connect.status, 502);
    }
}
