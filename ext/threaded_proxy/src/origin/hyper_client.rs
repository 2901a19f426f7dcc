//! The pooled hyper-util clients (HTTP/1.1 keep-alive, HTTP/2 via ALPN for
//! https): one per distinct TLS settings and connect timeout.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::{BodySource, RequestBody};
use super::error::{classify, refused_unprocessed, waiting_for_headers};
use super::request::Request;
use super::tls::{tls_config, TlsSettings};
use crate::errors::ProxyError;

pub type HttpClient = Client<HttpsConnector<HttpConnector>, RequestBody>;

/// How many times a request an HTTP/2 origin refused unprocessed goes
/// again, each time on the connection the pool picks: a new one after a
/// GOAWAY (the pool no longer hands out a connection that is going away),
/// possibly the same after a REFUSED_STREAM, which RFC 9113 §8.7 allows.
/// Enough for an origin that retires connections under load, bounded for
/// one that refuses everything.
pub const REFUSED_RETRIES: usize = 3;

/// One hyper client per distinct (TLS settings, connect timeout), each with
/// its pool, built on first use.
pub struct HyperClients {
    clients: Mutex<HashMap<(TlsSettings, Duration), HttpClient>>,
    pool_idle_timeout: Duration,
    pool_max_idle_per_host: usize,
}

impl HyperClients {
    pub fn new(pool_idle_timeout: Duration, pool_max_idle_per_host: usize) -> Self {
        HyperClients {
            clients: Mutex::new(HashMap::new()),
            pool_idle_timeout,
            pool_max_idle_per_host,
        }
    }

    /// Sends `request` with `body` and waits for the response head, within
    /// the request's header timeout for all tries together. A request an
    /// HTTP/2 origin refused unprocessed (GOAWAY while retiring the
    /// connection, REFUSED_STREAM) goes again, up to `REFUSED_RETRIES`
    /// times, when its body can be sent twice: not a 502.
    pub async fn send(
        &self,
        request: &Request<'_>,
        body: BodySource,
    ) -> Result<http::Response<hyper::body::Incoming>, ProxyError> {
        let client = self.client(request.tls, request.connect_timeout, &request.target.url())?;
        let deadline = tokio::time::Instant::now() + request.header_timeout;
        let mut body = Some(body);
        let mut retries = REFUSED_RETRIES;
        loop {
            let this_try = body.take().unwrap_or(BodySource::Empty);
            // Kept for a retry; None when the body cannot be sent twice.
            body = this_try.try_clone();
            let hyper_request = request.to_hyper(this_try)?;
            match tokio::time::timeout_at(deadline, client.request(hyper_request)).await {
                Err(_) => return Err(waiting_for_headers(&request.target.url())),
                Ok(Ok(response)) => return Ok(response),
                Ok(Err(e)) if retries > 0 && body.is_some() && refused_unprocessed(&e) => {
                    retries -= 1;
                }
                Ok(Err(e)) => return Err(classify(&e, &request.target.url())),
            }
        }
    }

    pub fn client(
        &self,
        tls: &TlsSettings,
        connect_timeout: Duration,
        url: &str,
    ) -> Result<HttpClient, ProxyError> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let key = (tls.clone(), connect_timeout);
        if let Some(client) = clients.get(&key) {
            return Ok(client.clone());
        }
        let client = self.build(tls, connect_timeout, url)?;
        clients.insert(key, client.clone());
        Ok(client)
    }

    fn build(
        &self,
        tls: &TlsSettings,
        connect_timeout: Duration,
        url: &str,
    ) -> Result<HttpClient, ProxyError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(tls, url)?)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        Ok(Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(self.pool_idle_timeout)
            .pool_max_idle_per_host(self.pool_max_idle_per_host)
            // Bounds the response head: oversized origin headers are a 502.
            .http1_max_buf_size(256 * 1024)
            .build(connector))
    }
}
