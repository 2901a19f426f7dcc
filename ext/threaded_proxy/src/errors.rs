//! One error type for everything that can end an exchange badly.

use std::fmt;

/// What went wrong, as the Ruby layer sees it.
///
/// Keep in sync with `lib/threaded_proxy/errors.rb`: every kind maps to one
/// Ruby exception class through `class_name` in `src/ruby/errors.rs`, and
/// `ErrorKind::as_str` is that exception's `kind`.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("could not connect to {url}: {message}")]
    Connect {
        url: String,
        message: String,
        errno: Option<i32>,
    },
    #[error("timed out {phase} ({url})")]
    Timeout { url: String, phase: &'static str },
    #[error("TLS failure talking to {url}: {message}")]
    Tls { url: String, message: String },
    #[error("bad response from {url}: {message}")]
    Upstream {
        url: String,
        message: String,
        errno: Option<i32>,
    },
    #[error("overloaded: {message}")]
    Overload { url: String, message: String },
    #[error("invalid header: {message}")]
    InvalidHeader { url: String, message: String },
    #[error("response body exceeds max_buffered_body ({limit} bytes)")]
    BodyTooLarge { url: String, limit: usize },
    #[error("{message}")]
    Callback { url: String, message: String },
    #[error("client connection failed: {message}")]
    Client { message: String },
    #[error("{message}")]
    Internal { message: String },
}

/// The kinds, named once so counters, logs and Ruby agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    Connect,
    Timeout,
    Tls,
    Upstream,
    Overload,
    InvalidHeader,
    BodyTooLarge,
    Callback,
    Client,
    Internal,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 10] = [
        ErrorKind::Connect,
        ErrorKind::Timeout,
        ErrorKind::Tls,
        ErrorKind::Upstream,
        ErrorKind::Overload,
        ErrorKind::InvalidHeader,
        ErrorKind::BodyTooLarge,
        ErrorKind::Callback,
        ErrorKind::Client,
        ErrorKind::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Tls => "tls",
            ErrorKind::Upstream => "upstream",
            ErrorKind::Overload => "overload",
            ErrorKind::InvalidHeader => "invalid_header",
            ErrorKind::BodyTooLarge => "body_too_large",
            ErrorKind::Callback => "callback",
            ErrorKind::Client => "client",
            ErrorKind::Internal => "internal",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ProxyError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ProxyError::Connect { .. } => ErrorKind::Connect,
            ProxyError::Timeout { .. } => ErrorKind::Timeout,
            ProxyError::Tls { .. } => ErrorKind::Tls,
            ProxyError::Upstream { .. } => ErrorKind::Upstream,
            ProxyError::Overload { .. } => ErrorKind::Overload,
            ProxyError::InvalidHeader { .. } => ErrorKind::InvalidHeader,
            ProxyError::BodyTooLarge { .. } => ErrorKind::BodyTooLarge,
            ProxyError::Callback { .. } => ErrorKind::Callback,
            ProxyError::Client { .. } => ErrorKind::Client,
            ProxyError::Internal { .. } => ErrorKind::Internal,
        }
    }

    /// The status a client gets when nothing else (on_error) answers.
    pub fn status(&self) -> u16 {
        match self.kind() {
            ErrorKind::Connect | ErrorKind::Tls | ErrorKind::Upstream => 502,
            ErrorKind::Timeout => 504,
            ErrorKind::Overload => 503,
            _ => 500,
        }
    }

    pub fn errno(&self) -> Option<i32> {
        match self {
            ProxyError::Connect { errno, .. } | ProxyError::Upstream { errno, .. } => *errno,
            _ => None,
        }
    }

    pub fn url(&self) -> Option<&str> {
        match self {
            ProxyError::Connect { url, .. }
            | ProxyError::Timeout { url, .. }
            | ProxyError::Tls { url, .. }
            | ProxyError::Upstream { url, .. }
            | ProxyError::Overload { url, .. }
            | ProxyError::InvalidHeader { url, .. }
            | ProxyError::BodyTooLarge { url, .. }
            | ProxyError::Callback { url, .. } => Some(url),
            ProxyError::Client { .. } | ProxyError::Internal { .. } => None,
        }
    }

    pub fn client(err: &std::io::Error) -> Self {
        ProxyError::Client {
            message: err.to_string(),
        }
    }

    /// A client that took no bytes for the whole idle timeout.
    pub fn client_idle(idle: std::time::Duration) -> Self {
        ProxyError::Client {
            message: format!("client read nothing for {idle:?}"),
        }
    }
}

/// Plain data describing an error, handed to Ruby (no Ruby objects here).
#[derive(Debug, Clone)]
pub struct ErrorReport {
    pub kind: ErrorKind,
    pub message: String,
    pub url: Option<String>,
    pub errno: Option<i32>,
    pub status: u16,
}

impl From<&ProxyError> for ErrorReport {
    fn from(err: &ProxyError) -> Self {
        ErrorReport {
            kind: err.kind(),
            message: err.to_string(),
            url: err.url().map(str::to_owned),
            errno: err.errno(),
            status: err.status(),
        }
    }
}
