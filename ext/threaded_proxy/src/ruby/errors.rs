//! The one conversion from Rust errors into Ruby exceptions.
//!
//! The classes are declared in `lib/threaded_proxy/errors.rb` and looked up
//! once. Keep `class_name` in sync with that file and with
//! `crate::errors::ErrorKind`.

use magnus::value::{Lazy, ReprValue};
use magnus::{kwargs, Error, Exception, ExceptionClass, Module, RModule, Ruby};

use crate::errors::{ErrorKind, ErrorReport, ProxyError};

static ROOT: Lazy<RModule> = Lazy::new(|ruby| {
    ruby.class_object()
        .const_get("ThreadedProxy")
        .expect("ThreadedProxy is defined before the extension loads")
});

fn class_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Connect => "ConnectError",
        ErrorKind::Timeout => "TimeoutError",
        ErrorKind::Tls => "TLSError",
        ErrorKind::Upstream => "UpstreamError",
        ErrorKind::Overload => "OverloadError",
        ErrorKind::InvalidHeader => "InvalidHeaderError",
        ErrorKind::BodyTooLarge => "BodyTooLargeError",
        ErrorKind::Callback => "CallbackError",
        ErrorKind::Client | ErrorKind::Internal => "Error",
    }
}

fn class_for(ruby: &Ruby, kind: ErrorKind) -> Result<ExceptionClass, Error> {
    ruby.get_inner(&ROOT).const_get(class_name(kind))
}

/// The Ruby exception object for an error report (for `on_error` and for
/// raising).
pub fn exception(ruby: &Ruby, report: &ErrorReport) -> Result<Exception, Error> {
    let class = class_for(ruby, report.kind)?;
    class.funcall(
        "new",
        (
            report.message.as_str(),
            kwargs!("url" => report.url.clone(), "errno" => report.errno, "kind" => report.kind.as_str()),
        ),
    )
}

pub fn raise(ruby: &Ruby, err: &ProxyError) -> Error {
    match exception(ruby, &ErrorReport::from(err)) {
        Ok(exception) => Error::from(exception),
        Err(lookup_failed) => lookup_failed,
    }
}

pub fn raise_report(ruby: &Ruby, report: &ErrorReport) -> Error {
    match exception(ruby, report) {
        Ok(exception) => Error::from(exception),
        Err(lookup_failed) => lookup_failed,
    }
}

pub fn argument_error(ruby: &Ruby, message: impl Into<String>) -> Error {
    Error::new(ruby.exception_arg_error(), message.into())
}
