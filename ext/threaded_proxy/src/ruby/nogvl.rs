//! Running Rust without the GVL, the one place that calls
//! `rb_thread_call_without_gvl2`.
//!
//! The closure must be `Send`, so the compiler rejects Ruby values inside
//! GVL-free code. Every call takes an unblocking function so Thread#raise,
//! Thread#kill and process exit can wake the wait. Panics are caught on both
//! sides and re-raised as Ruby errors once the GVL is back.

use std::ffi::c_void;
use std::panic::{self, AssertUnwindSafe};

use magnus::{Error, Ruby};

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

/// Runs `work` with the GVL released. `Ok(None)` when Ruby had an interrupt
/// pending and did not run it; the interrupt fires once we are back in Ruby.
pub fn nogvl<F, R, U>(ruby: &Ruby, work: F, unblock_with: U) -> Result<Option<R>, Error>
where
    F: FnOnce() -> R + Send,
    R: Send,
    U: Fn() + Sync,
{
    let mut call = Call {
        work: Some(work),
        result: None,
    };
    // SAFETY: both pointers refer to locals that live until this returns;
    // `run` and `unblock` touch no Ruby API (they run without the GVL, the
    // unblocking function possibly on another thread).
    unsafe {
        rb_sys::rb_thread_call_without_gvl2(
            Some(run::<F, R>),
            &mut call as *mut Call<F, R> as *mut c_void,
            Some(unblock::<U>),
            &unblock_with as *const U as *mut c_void,
        );
    }
    match call.result {
        None => Ok(None),
        Some(Ok(value)) => Ok(Some(value)),
        Some(Err(panic)) => {
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
