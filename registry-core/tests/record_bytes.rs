//! The heap a finished worker's output log keeps: every worker holds one until its record is
//! evicted, so what an empty one costs is paid once per retained record (issue 19's
//! "memory per finished record"). Counted with a counting global allocator: the figure is
//! exact and does not depend on the machine's load.
//!
//! This binary holds one test only, so no other thread allocates while it counts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use registry_core::output_log::OutputLog;
use registry_core::StreamKind;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded as given.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded as given.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What a finished log with nothing in it may keep: one `Arc` holding the state and an
/// inline notifier (a `watch` channel's shared block alone was ~300 bytes more).
const MAX_EMPTY_LOG_BYTES: isize = 192;

#[test]
fn a_finished_output_log_that_never_held_a_byte_is_one_small_allocation() {
    const N: usize = 1000;
    let mut logs = Vec::with_capacity(N);
    let before = LIVE.load(Ordering::Relaxed);
    for _ in 0..N {
        let log = OutputLog::new(1 << 20);
        // What a capture does for a worker that wrote nothing: a writer per stream, flushed.
        for stream in [StreamKind::Stdout, StreamKind::Stderr] {
            let mut w = log.writer(stream);
            w.write(b"");
            w.flush();
        }
        log.finish();
        logs.push(log);
    }
    let per_log = (LIVE.load(Ordering::Relaxed) - before) / N as isize;
    assert!(
        per_log <= MAX_EMPTY_LOG_BYTES,
        "an empty finished log keeps {per_log} bytes, more than {MAX_EMPTY_LOG_BYTES}"
    );
    assert!(logs.iter().all(|l| l.is_finished() && l.last_seq() == 0));
}
