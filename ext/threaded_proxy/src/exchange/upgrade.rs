//! Tunnels: the origin accepted an upgrade (its 101 goes to the client
//! after on_headers), or `proxy_tunnel` joins the client to a raw TCP
//! service; then bytes flow both ways (`tunnel::run`), counted in the
//! exchange's meter.

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Exchange, TunnelTarget};
use crate::callbacks::ResponseHead;
use crate::errors::ProxyError;
use crate::headers::{self, HeaderList};
use crate::tunnel::{self, TunnelEnd};

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Exchange<R, W> {
    /// The origin accepted the upgrade: answer the client's 101 (after
    /// on_headers), then copy bytes both ways.
    pub(super) async fn switch_protocols(
        &mut self,
        origin_headers: http::HeaderMap,
        upgrade: hyper::upgrade::OnUpgrade,
    ) -> Result<(), ProxyError> {
        let protocol = origin_headers
            .get(http::header::UPGRADE)
            .map(|v| Bytes::copy_from_slice(v.as_bytes()))
            .or_else(|| self.spec.upgrade.clone());
        let head = ResponseHead {
            status: 101,
            reason: None,
            headers: headers::end_to_end(&origin_headers),
        };
        // The callback may refuse the switch with its own answer.
        let Some(head) = self.on_headers(head).await? else {
            return Ok(());
        };
        self.validate_head(&head.headers)?;
        let upgraded = match tokio::time::timeout(self.spec.timeouts.idle, upgrade).await {
            Ok(Ok(upgraded)) => upgraded,
            Ok(Err(e)) => {
                return Err(ProxyError::Upstream {
                    url: self.spec.target.url(),
                    message: format!("upgrade failed: {e}"),
                    errno: None,
                })
            }
            Err(_) => {
                return Err(ProxyError::Timeout {
                    url: self.spec.target.url(),
                    phase: "upgrading the origin connection",
                })
            }
        };
        self.send_switch_head(101, &head.headers, protocol.as_deref())
            .await?;
        self.run_tunnel(TokioIo::new(upgraded)).await
    }

    /// `proxy_tunnel`: connect to a raw TCP service, answer 101 (or 200 for
    /// CONNECT), then copy bytes both ways.
    pub(super) async fn raw_tunnel(&mut self, target: TunnelTarget) -> Result<(), ProxyError> {
        let connect = tokio::net::TcpStream::connect(self.spec.target.address());
        let stream = match tokio::time::timeout(self.spec.timeouts.connect, connect).await {
            Err(_) => {
                return Err(ProxyError::Timeout {
                    url: self.spec.target.url(),
                    phase: "connecting",
                })
            }
            Ok(Err(e)) => {
                return Err(ProxyError::Connect {
                    url: self.spec.target.url(),
                    message: e.to_string(),
                    errno: e.raw_os_error(),
                })
            }
            Ok(Ok(stream)) => stream,
        };
        let _ = stream.set_nodelay(true);
        self.time_to_first_byte = Some(self.started.elapsed());
        let status = if target.upgrade.is_some() { 101 } else { 200 };
        self.send_switch_head(status, &Vec::new(), target.upgrade.as_deref())
            .await?;
        self.run_tunnel(stream).await
    }

    async fn send_switch_head(
        &mut self,
        status: u16,
        headers: &HeaderList,
        protocol: Option<&[u8]>,
    ) -> Result<(), ProxyError> {
        self.status = Some(status);
        self.writer.send_switch_head(status, headers, protocol).await
    }

    async fn run_tunnel<O: AsyncRead + AsyncWrite>(&mut self, origin: O) -> Result<(), ProxyError> {
        let Some(mut reader) = self.client_reader.take() else {
            return Err(ProxyError::Internal {
                message: "tunnel without the client's read half".to_owned(),
            });
        };
        let idle = self.spec.timeouts.idle;
        let (client_writer, meter) = self.writer.tunnel_halves();
        let result = tunnel::run(&mut reader, client_writer, origin, idle, meter).await;
        self.client_reader = Some(reader);
        match result {
            Ok(()) => {
                self.finished_cleanly = true;
                Ok(())
            }
            Err(TunnelEnd::Idle) => Err(ProxyError::Timeout {
                url: self.spec.target.url(),
                phase: "in an idle tunnel",
            }),
            Err(TunnelEnd::Failed(message)) => Err(ProxyError::Upstream {
                url: self.spec.target.url(),
                message,
                errno: None,
            }),
        }
    }
}
