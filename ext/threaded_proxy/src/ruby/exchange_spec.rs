//! The one reader of the Hash that Ruby's `ThreadedProxy::ExchangeSpec`
//! (lib/threaded_proxy/exchange_spec.rb, the one writer) builds for
//! `Native.start_exchange`, and of its request part for
//! `Native.async_enqueue`. Keys and their meaning are listed in that file;
//! a key the builder always writes is read with `key` (missing: KeyError,
//! a bug), one it leaves out when nil with `opt`.

use bytes::Bytes;
use http::Method;
use magnus::value::ReprValue;
use magnus::{Error, RHash, Ruby, TryConvert, Value};

use super::args::{self, key, opt, seconds};
use super::errors;
use super::job::parse_headers;
use crate::delivery::store::BodyInput;
use crate::exchange::{self, CallbackSet, ExchangeSpec, Timeouts, TunnelTarget};
use crate::headers::{ClientRequest, HeaderList};
use crate::origin::{BodySource, TlsSettings};
use crate::origin_url::{self, Kind, Target};
use crate::runtime;

/// The request body as Ruby gave it, before it becomes an exchange's
/// [`BodySource`] or a deferred delivery's [`BodyInput`].
pub enum RequestBody {
    Empty,
    Bytes(Bytes),
    /// `body_fd` duplicated, read from `body_offset` to its end.
    File {
        file: std::fs::File,
        offset: u64,
    },
}

impl From<RequestBody> for BodySource {
    fn from(body: RequestBody) -> Self {
        match body {
            RequestBody::Empty => BodySource::Empty,
            RequestBody::Bytes(bytes) => BodySource::Bytes(bytes),
            RequestBody::File { file, offset } => BodySource::File { file, offset },
        }
    }
}

impl From<RequestBody> for BodyInput {
    fn from(body: RequestBody) -> Self {
        match body {
            RequestBody::Empty => BodyInput::Empty,
            RequestBody::Bytes(bytes) => BodyInput::Bytes(bytes.to_vec()),
            RequestBody::File { file, offset } => BodyInput::File { file, offset },
        }
    }
}

/// The request every spec carries: method, URL (judged again by the parser
/// `Native.check_url` used, so the URL used is the canonical one whoever
/// called) and headers. The body is read apart: its descriptor is the last
/// thing to take (see [`request_body`]).
pub struct Request {
    pub method: Method,
    pub target: Target,
    pub headers: HeaderList,
}

pub fn request(ruby: &Ruby, spec: RHash, kind: Kind) -> Result<Request, Error> {
    let method: String = key(ruby, spec, "method")?;
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| errors::argument_error(ruby, format!("invalid HTTP method {method:?}")))?;
    let url: String = key(ruby, spec, "url")?;
    let target = origin_url::check(&url, kind).map_err(|message| errors::argument_error(ruby, message))?;
    Ok(Request {
        method,
        target,
        headers: parse_headers(ruby, key(ruby, spec, "headers")?)?,
    })
}

/// `body` (a String) or `body_fd` + `body_offset` (a file, duplicated
/// here under the GVL), else empty.
pub fn request_body(ruby: &Ruby, spec: RHash) -> Result<Result<RequestBody, args::DupError>, Error> {
    if let Some(fd) = opt::<i32>(ruby, spec, "body_fd")? {
        let offset = opt::<u64>(ruby, spec, "body_offset")?.unwrap_or(0);
        return Ok(args::duplicate(fd, "body").map(|owned| RequestBody::File {
            file: std::fs::File::from(owned),
            offset,
        }));
    }
    Ok(Ok(match opt::<Value>(ruby, spec, "body")? {
        Some(value) if !value.is_nil() => RequestBody::Bytes(Bytes::try_convert(value)?),
        _ => RequestBody::Empty,
    }))
}

/// The whole exchange spec for `Native.start_exchange`. Out of descriptors
/// for the body is an overload: counted and logged as a refused exchange,
/// raised as OverloadError (Ruby answers 503).
pub fn parse(ruby: &Ruby, spec: RHash) -> Result<ExchangeSpec, Error> {
    let tunnel_address = opt::<String>(ruby, spec, "tunnel_address")?;
    let kind = if tunnel_address.is_some() {
        Kind::Tcp
    } else {
        Kind::Http
    };
    let Request {
        method,
        target,
        headers,
    } = request(ruby, spec, kind)?;
    let id: u64 = key(ruby, spec, "id")?;
    let body = request_body(ruby, spec)?.map_err(|e| {
        if let (true, Ok(proxy)) = (e.out_of_fds(), runtime::current()) {
            exchange::refused(proxy, id, &method, &target.url(), &e.overload(&target.url()));
        }
        e.for_exchange(ruby, &target.url())
    })?;
    Ok(ExchangeSpec {
        id,
        method,
        target,
        headers,
        body: body.into(),
        client: ClientRequest {
            head_only: key(ruby, spec, "client_head")?,
            http10: key(ruby, spec, "client_http10")?,
        },
        callbacks: CallbackSet {
            on_headers: key(ruby, spec, "on_headers")?,
            on_response: key(ruby, spec, "on_response")?,
            on_error: key(ruby, spec, "on_error")?,
            finished: key(ruby, spec, "finished")?,
        },
        timeouts: Timeouts {
            connect: seconds(ruby, spec, "connect_timeout")?,
            header: seconds(ruby, spec, "header_timeout")?,
            idle: seconds(ruby, spec, "idle_timeout")?,
        },
        tls: TlsSettings {
            verify: key(ruby, spec, "verify_tls")?,
            ca_file: opt::<String>(ruby, spec, "ca_file")?.map(Into::into),
        },
        max_buffered_body: key(ruby, spec, "max_buffered_body")?,
        upgrade: opt::<Bytes>(ruby, spec, "upgrade")?,
        // The address Ruby sends is the one `check_url` gave it; the
        // target's own is used.
        tunnel: match tunnel_address {
            Some(_) => Some(TunnelTarget {
                upgrade: opt::<Bytes>(ruby, spec, "tunnel_upgrade")?,
            }),
            None => None,
        },
    })
}
