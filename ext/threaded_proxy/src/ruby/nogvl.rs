//! Running Rust without the GVL, the one place that calls
//! `rb_thread_call_without_gvl2`.
//!
//! The closure must be `Send`, so the compiler rejects Ruby values inside
//! GVL-free code. Every call takes an unblocking function so Thread#raise,
//! Thread#kill and process exit can wake the wait. Panics are caught on both
//! sides and re-raised as Ruby errors once the GVL is back.

use std::ffi::c_void;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use magnus::{Error, Ruby};

use crate::runtime::Tracker;

struct Call<F, R> {
    work: Option<F>,
    result: Option<std::thread::Result<R>>,
}

unsafe extern "C" fn run<F: FnOnce() -> R, R>(data: *mut c_void) -> *mut c_void {
    // SAFETY: `data` points at the `Call` on `nogvl`'s stack, which outlives
    // this call; Ruby calls `run` at most once.
    let call = unsafe { &mut *(data as *mut Call<F, R>) };
    if let Some(work) = call.work.take() {
        call.result = Some(panic::catch_unwind(AssertUnwindSafe(work)));
    }
    std::ptr::null_mut()
}

unsafe extern "C" fn unblock<U: Fn()>(data: *mut c_void) {
    // SAFETY: `data` points at the unblocking closure on `nogvl`'s stack;
    // Ruby only calls it while `rb_thread_call_without_gvl2` runs.
    let unblock = unsafe { &*(data as *const U) };
    let _ = panic::catch_unwind(AssertUnwindSafe(unblock));
}

/// Runs `work` with the GVL released.
///
/// `rb_thread_call_without_gvl2` does not run `work` at all while any
/// interrupt is pending, and that includes the timer interrupt Ruby sets to
/// share the GVL between busy threads, not only Thread#raise or a signal.
/// So a call that did not run handles the pending interrupts
/// (`rb_thread_check_ints`: raises for Thread#raise/kill, runs trap
/// handlers, yields for the timer) and tries again; an exception from them
/// is returned as the error.
pub fn nogvl<F, R, U>(ruby: &Ruby, work: F, unblock_with: U) -> Result<R, Error>
where
    F: FnOnce() -> R + Send,
    R: Send,
    U: Fn() + Sync,
{
    let mut call = Call {
        work: Some(work),
        result: None,
    };
    let result = loop {
        // SAFETY: both pointers refer to locals that live until this
        // returns; `run` and `unblock` touch no Ruby API (they run without
        // the GVL, the unblocking function possibly on another thread).
        unsafe {
            rb_sys::rb_thread_call_without_gvl2(
                Some(run::<F, R>),
                &mut call as *mut Call<F, R> as *mut c_void,
                Some(unblock::<U>),
                &unblock_with as *const U as *mut c_void,
            );
        }
        match call.result.take() {
            Some(result) => break result,
            // Not run: an interrupt was pending. `work` is still in `call`.
            None => ruby.thread_check_ints()?,
        }
    };
    match result {
        Ok(value) => Ok(value),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            Err(Error::new(
                ruby.exception_runtime_error(),
                format!("threaded-proxy panicked without the GVL: {message}"),
            ))
        }
    }
}

/// Waits up to `timeout` seconds, GVL released, until nothing counted by
/// `tracker` runs; true when idle. Thread#raise and shutdown wake it.
pub fn wait_idle(ruby: &Ruby, tracker: &Tracker, timeout: f64) -> Result<bool, Error> {
    let deadline = Instant::now() + Duration::from_secs_f64(timeout.max(0.0));
    let interrupted = AtomicBool::new(false);
    nogvl(
        ruby,
        || tracker.wait_idle(deadline, &interrupted),
        || tracker.interrupt(&interrupted),
    )
}

/// Catches a panic in a Ruby-facing function and raises it as a Ruby error
/// instead of letting it become `fatal` (which would kill a Puma worker).
pub fn guard<T>(f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            let ruby = Ruby::get().expect("called from Ruby");
            Err(Error::new(
                ruby.exception_runtime_error(),
                format!("threaded-proxy panicked: {message}"),
            ))
        }
    }
}
