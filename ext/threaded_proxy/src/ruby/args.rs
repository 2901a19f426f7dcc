//! Reading the option Hashes Ruby passes to `Native` (symbol keys): one
//! rule for a required key, an optional one, a number of seconds and a
//! descriptor Ruby hands over, used by every entry point.

use std::os::fd::OwnedFd;
use std::time::Duration;

use magnus::{Error, RHash, Ruby, Symbol, TryConvert};

use super::errors;
use crate::errors::ProxyError;

/// `hash[:name]`; a missing key raises (KeyError: the builder forgot it).
pub fn key<T: TryConvert>(ruby: &Ruby, hash: RHash, name: &str) -> Result<T, Error> {
    hash.fetch::<Symbol, T>(ruby.to_symbol(name))
}

/// `hash[:name]`, None when absent or nil.
pub fn opt<T: TryConvert>(ruby: &Ruby, hash: RHash, name: &str) -> Result<Option<T>, Error> {
    hash.lookup::<Symbol, Option<T>>(ruby.to_symbol(name))
}

/// A Float of seconds as a Duration; negative, NaN or too large is an
/// ArgumentError that names the key.
pub fn duration(ruby: &Ruby, name: &str, secs: f64) -> Result<Duration, Error> {
    Duration::try_from_secs_f64(secs)
        .map_err(|_| errors::argument_error(ruby, format!("{name} must be a positive number of seconds")))
}

/// The required key `name`, in seconds.
pub fn seconds(ruby: &Ruby, hash: RHash, name: &str) -> Result<Duration, Error> {
    duration(ruby, name, key(ruby, hash, name)?)
}

/// The optional key `name`, in seconds, else `default`.
pub fn seconds_or(ruby: &Ruby, hash: RHash, name: &str, default: Duration) -> Result<Duration, Error> {
    match opt::<f64>(ruby, hash, name)? {
        Some(secs) => duration(ruby, name, secs),
        None => Ok(default),
    }
}

/// A descriptor Ruby lent us that we could not duplicate (`what`: "client",
/// "body").
pub struct DupError {
    what: &'static str,
    error: std::io::Error,
}

/// Duplicates a descriptor Ruby hands over, under the GVL: Ruby keeps (and
/// may close) its own, the duplicate is ours.
pub fn duplicate(fd: i32, what: &'static str) -> Result<OwnedFd, DupError> {
    crate::handoff::duplicate(fd).map_err(|error| DupError { what, error })
}

impl DupError {
    /// The process ran out of descriptors (EMFILE, ENFILE): an overload,
    /// not a bug of the caller.
    pub fn out_of_fds(&self) -> bool {
        crate::limits::out_of_fds(self.error.raw_os_error())
    }

    /// The overload this is for the exchange of `url` (answered 503).
    pub fn overload(&self, url: &str) -> ProxyError {
        ProxyError::Overload {
            url: url.to_owned(),
            message: format!(
                "out of file descriptors: cannot duplicate the {} fd: {}",
                self.what, self.error
            ),
        }
    }

    /// IOError: the descriptor was closed or never one (a bug of the caller).
    pub fn io_error(&self, ruby: &Ruby) -> Error {
        Error::new(
            ruby.exception_io_error(),
            format!("cannot duplicate {} fd: {}", self.what, self.error),
        )
    }

    /// For an exchange: out of descriptors raises OverloadError (the caller
    /// answers 503 with Retry-After), anything else IOError.
    pub fn for_exchange(&self, ruby: &Ruby, url: &str) -> Error {
        if self.out_of_fds() {
            errors::raise(ruby, &self.overload(url))
        } else {
            self.io_error(ruby)
        }
    }
}
