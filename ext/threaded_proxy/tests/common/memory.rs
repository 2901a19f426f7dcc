//! What the memory tests (`stream_memory`, `machine_memory`) share: a
//! global allocator that counts the live heap bytes of the threads that
//! are the proxy's, and room for thousands of descriptors. Included with
//! `#[path]` by the test binaries that install the allocator, so the other
//! tests keep the plain system allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicIsize, Ordering};

/// Passes every call to the system allocator and counts the sizes.
pub struct Counting;

/// Live bytes allocated (minus freed) by counted threads.
static LIVE: AtomicIsize = AtomicIsize::new(0);

thread_local! {
    /// Set on a test peer's threads (an origin, a backend): their memory
    /// is not the proxy's.
    static NOT_COUNTED: Cell<bool> = const { Cell::new(false) };
}

/// The live heap counted so far.
pub fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Called first on a thread whose allocations are the test's own.
pub fn do_not_count_this_thread() {
    NOT_COUNTED.with(|flag| flag.set(true));
}

fn counted() -> bool {
    NOT_COUNTED.try_with(|flag| !flag.get()).unwrap_or(true)
}

// SAFETY: every call is passed on to the system allocator unchanged; the
// counter only observes sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if counted() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if counted() {
            LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if counted() {
            LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Lifts the soft descriptor limit to `wanted` (at most the hard one):
/// the tests hold thousands of connections.
pub fn raise_fd_limit(wanted: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write `limit`.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur < wanted {
            limit.rlim_cur = wanted.min(limit.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
    }
    assert!(
        limit.rlim_cur >= wanted,
        "the hard fd limit {} is below {wanted}",
        limit.rlim_max
    );
}

/// A test peer (an origin, a backend) on its own runtime and thread, not
/// counted: listens on 127.0.0.1 port 0 and runs `serve` on every
/// connection in a task of its own. Its address.
pub fn peer<F, Fut>(serve: F) -> std::net::SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        do_not_count_this_thread();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            loop {
                let (conn, _) = listener.accept().await.unwrap();
                tokio::spawn(serve(conn));
            }
        });
    });
    rx.recv().unwrap()
}
