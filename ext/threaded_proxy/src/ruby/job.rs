//! `ThreadedProxy::Native::Job`: one callback request from an exchange, as
//! a Ruby dispatcher thread sees it. Wraps plain data plus the reply channel.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use magnus::value::ReprValue;
use magnus::{Error, RArray, Ruby, Symbol, TryConvert, Value};
use tokio::sync::{mpsc, oneshot};

use super::args;
use super::errors;
use super::nogvl::{guard, nogvl};
use crate::callbacks::{
    BlockingQueue, BodyRequest, CallbackEvent, CallbackJob, CallbackReply, Rendered, RenderedBody,
    ResponseHead, Summary, KINDS,
};
use crate::errors::{ErrorReport, ProxyError};
use crate::headers::HeaderList;
use crate::runtime;

#[magnus::wrap(class = "ThreadedProxy::Native::Job", free_immediately, size)]
pub struct Job {
    /// Which exchange's procs the dispatcher runs (its Record's key).
    exchange_id: u64,
    /// One of `callbacks::KINDS`, given to Ruby as a Symbol.
    kind: &'static str,
    /// The head a headers or response job shows (and `pass` keeps); the
    /// head the client got for a finished one.
    head: Option<ResponseHead>,
    /// What failed, for an error job (on_error).
    error: Option<ErrorReport>,
    /// How the exchange ended, for a finished job (on_complete, the event).
    summary: Option<Summary>,
    /// Taken by the first answer; later answers are ignored.
    reply: Mutex<Option<oneshot::Sender<CallbackReply>>>,
    /// Response jobs only: how `read_body` asks the exchange for the body.
    body_access: Option<mpsc::UnboundedSender<BodyRequest>>,
}

impl Job {
    pub fn from_callback(job: CallbackJob) -> Job {
        let kind = job.event.name();
        let (head, error, summary) = match job.event {
            CallbackEvent::Headers(head) | CallbackEvent::Response(head) => (Some(head), None, None),
            CallbackEvent::Error(report) => (None, Some(report), None),
            CallbackEvent::Finished(mut summary) => (summary.head.take(), None, Some(summary)),
        };
        Job {
            exchange_id: job.exchange_id,
            kind,
            head,
            error,
            summary,
            reply: Mutex::new(job.reply),
            body_access: job.body_access,
        }
    }

    fn exchange_id(&self) -> u64 {
        self.exchange_id
    }

    /// `:headers`, `:response`, `:error` or `:finished` (`callbacks::KINDS`).
    fn kind(ruby: &Ruby, rb_self: &Self) -> Symbol {
        ruby.to_symbol(rb_self.kind)
    }

    fn status(&self) -> Option<u16> {
        self.head.as_ref().map(|h| h.status)
    }

    fn reason(&self) -> Option<String> {
        self.head.as_ref().and_then(|h| h.reason.clone())
    }

    fn headers(ruby: &Ruby, rb_self: &Self) -> Result<Value, Error> {
        match &rb_self.head {
            Some(head) => Ok(header_array(ruby, &head.headers)?.as_value()),
            None => Ok(ruby.qnil().as_value()),
        }
    }

    /// The error as a `ThreadedProxy::Error` instance (error jobs only).
    fn error(ruby: &Ruby, rb_self: &Self) -> Result<Value, Error> {
        let report = rb_self
            .error
            .as_ref()
            .or_else(|| rb_self.summary.as_ref().and_then(|s| s.error.as_ref()));
        match report {
            Some(report) => Ok(errors::exception(ruby, report)?.as_value()),
            None => Ok(ruby.qnil().as_value()),
        }
    }

    fn default_status(&self) -> Option<u16> {
        self.error.as_ref().map(|e| e.status)
    }

    /// How the exchange ended (finished jobs only), for instrumentation.
    fn summary(ruby: &Ruby, rb_self: &Self) -> Result<Value, Error> {
        let Some(summary) = &rb_self.summary else {
            return Ok(ruby.qnil().as_value());
        };
        let hash = ruby.hash_new();
        hash.aset(ruby.to_symbol("method"), summary.method.as_str())?;
        hash.aset(ruby.to_symbol("url"), summary.url.as_str())?;
        hash.aset(ruby.to_symbol("status"), summary.status)?;
        hash.aset(ruby.to_symbol("bytes_from_origin"), summary.bytes_from_origin)?;
        hash.aset(ruby.to_symbol("bytes_to_client"), summary.bytes_to_client)?;
        hash.aset(ruby.to_symbol("bytes_from_client"), summary.bytes_from_client)?;
        hash.aset(
            ruby.to_symbol("time_to_first_byte"),
            summary.time_to_first_byte.map(|d| d.as_secs_f64()),
        )?;
        hash.aset(ruby.to_symbol("total_time"), summary.total_time.as_secs_f64())?;
        let error = match &summary.error {
            Some(report) => errors::exception(ruby, report)?.as_value(),
            None => ruby.qnil().as_value(),
        };
        hash.aset(ruby.to_symbol("error"), error)?;
        Ok(hash.as_value())
    }

    fn answer(&self, reply: CallbackReply) -> bool {
        let sender = self.reply.lock().unwrap_or_else(|e| e.into_inner()).take();
        match sender {
            Some(tx) => tx.send(reply).is_ok(),
            None => false,
        }
    }

    /// The named reply "leave it as it is": the head unchanged (on_headers,
    /// on_response), the default error answer (on_error).
    fn pass(&self) -> bool {
        self.answer(CallbackReply::pass(self.head.clone()))
    }

    /// Goes on with this status line and headers (on_headers, on_response).
    /// The head's own status passes (101 for a protocol switch); a new one
    /// must be a final status.
    fn amend(
        ruby: &Ruby,
        rb_self: &Self,
        status: u16,
        reason: Option<String>,
        headers: RArray,
    ) -> Result<bool, Error> {
        let Some(head) = &rb_self.head else {
            return Err(errors::argument_error(
                ruby,
                format!("a {} job has no head to amend (pass or render)", rb_self.kind),
            ));
        };
        if status != head.status {
            check_final_status(ruby, status)?;
        }
        let headers = parse_headers(ruby, headers)?;
        Ok(rb_self.answer(CallbackReply::Continue(ResponseHead {
            status,
            reason,
            headers,
        })))
    }

    /// Answers with a String body.
    fn render(ruby: &Ruby, rb_self: &Self, status: u16, headers: RArray, body: Bytes) -> Result<bool, Error> {
        check_final_status(ruby, status)?;
        let headers = parse_headers(ruby, headers)?;
        Ok(rb_self.answer(CallbackReply::Render(Rendered {
            status,
            headers,
            body: RenderedBody::Bytes(body),
        })))
    }

    /// Answers with a file body, read from the descriptor's current offset.
    /// The descriptor is duplicated here, under the GVL; Ruby keeps its own.
    fn render_file(
        ruby: &Ruby,
        rb_self: &Self,
        status: u16,
        headers: RArray,
        fd: i32,
    ) -> Result<bool, Error> {
        check_final_status(ruby, status)?;
        let headers = parse_headers(ruby, headers)?;
        let owned = args::duplicate(fd, "body").map_err(|e| e.io_error(ruby))?;
        Ok(rb_self.answer(CallbackReply::Render(Rendered {
            status,
            headers,
            body: RenderedBody::File(std::fs::File::from(owned)),
        })))
    }

    /// The callback raised: the exchange answers 500 (or runs on_error).
    fn fail(&self, message: String) -> bool {
        self.answer(CallbackReply::Failed { message })
    }

    fn answered(&self) -> bool {
        self.reply.lock().unwrap_or_else(|e| e.into_inner()).is_none()
    }

    /// The whole origin body (response jobs only), waited for with the GVL
    /// released. Raises BodyTooLargeError past max_buffered_body.
    fn read_body(ruby: &Ruby, rb_self: &Self) -> Result<Bytes, Error> {
        guard(|| {
            let Some(access) = &rb_self.body_access else {
                return Err(Error::new(
                    ruby.exception_runtime_error(),
                    "this job has no response body",
                ));
            };
            let slot: BodyRequest = Arc::new(BlockingQueue::default());
            if access.send(slot.clone()).is_err() {
                return Err(errors::raise(
                    ruby,
                    &ProxyError::Internal {
                        message: "the exchange is over; its body is gone".to_owned(),
                    },
                ));
            }
            let deadline = Instant::now() + runtime::settings().callback_timeout;
            let interrupted = AtomicBool::new(false);
            let waiting = slot.clone();
            let result = nogvl(
                ruby,
                || waiting.pop_wait(&interrupted, Some(deadline)),
                || slot.interrupt(&interrupted),
            )?;
            match result {
                Some(Ok(bytes)) => Ok(bytes),
                Some(Err(report)) => Err(errors::raise_report(ruby, &report)),
                None => Err(errors::raise(
                    ruby,
                    &ProxyError::Internal {
                        message: "interrupted or timed out while reading the response body".to_owned(),
                    },
                )),
            }
        })
    }
}

/// The one answer a client may get in place of the origin's: 200–599. A
/// 1xx is an interim answer (after a `100 Continue` the client waits for
/// the real one, which never comes), 600 and up are no HTTP status.
/// Response#status= and Responder#render check the same range first.
fn check_final_status(ruby: &Ruby, status: u16) -> Result<(), Error> {
    if (200..=599).contains(&status) {
        Ok(())
    } else {
        Err(errors::argument_error(
            ruby,
            format!("status {status} is not a final HTTP status (200..599)"),
        ))
    }
}

pub fn header_array(ruby: &Ruby, headers: &HeaderList) -> Result<RArray, Error> {
    let array = ruby.ary_new_capa(headers.len());
    for (name, value) in headers {
        let pair = ruby.ary_new_capa(2);
        pair.push(ruby.str_new(name))?;
        pair.push(ruby.str_from_slice(value))?;
        array.push(pair)?;
    }
    Ok(array)
}

/// `[[name, value], …]` from Ruby; names and values are validated later,
/// where the error can be reported with the exchange's URL.
pub fn parse_headers(ruby: &Ruby, headers: RArray) -> Result<HeaderList, Error> {
    let mut list = Vec::with_capacity(headers.len());
    for pair in headers.into_iter() {
        let pair = RArray::try_convert(pair)?;
        if pair.len() != 2 {
            return Err(errors::argument_error(
                ruby,
                "headers must be [name, value] pairs",
            ));
        }
        let name: String = pair.entry(0)?;
        let value: Bytes = pair.entry(1)?;
        list.push((name, value));
    }
    Ok(list)
}

pub fn define(ruby: &Ruby, native: &magnus::RModule) -> Result<(), Error> {
    use magnus::{method, Class, Module};
    let class = native.define_class("Job", ruby.class_object())?;
    class.define_method("exchange_id", method!(Job::exchange_id, 0))?;
    class.define_method("kind", method!(Job::kind, 0))?;
    class.define_method("status", method!(Job::status, 0))?;
    class.define_method("reason", method!(Job::reason, 0))?;
    class.define_method("headers", method!(Job::headers, 0))?;
    class.define_method("error", method!(Job::error, 0))?;
    class.define_method("default_status", method!(Job::default_status, 0))?;
    class.define_method("summary", method!(Job::summary, 0))?;
    class.define_method("pass", method!(Job::pass, 0))?;
    class.define_method("amend", method!(Job::amend, 3))?;
    class.define_method("render", method!(Job::render, 3))?;
    class.define_method("render_file", method!(Job::render_file, 3))?;
    class.define_method("fail", method!(Job::fail, 1))?;
    class.define_method("answered?", method!(Job::answered, 0))?;
    class.define_method("read_body", method!(Job::read_body, 0))?;
    class.undef_default_alloc_func();
    // Job kind => the user's callback it runs, for the dispatcher.
    let callbacks = ruby.hash_new();
    for (kind, callback) in KINDS {
        let name = ruby.str_new(callback);
        name.freeze();
        callbacks.aset(ruby.to_symbol(kind), name)?;
    }
    callbacks.freeze();
    class.const_set("CALLBACKS", callbacks)?;
    Ok(())
}
