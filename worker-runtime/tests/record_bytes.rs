//! The heap a finished worker keeps in the runtime: a runtime holds up to `max_finished` of
//! them, so what one costs is paid by the thousand (issue 19's "memory per finished record").
//! Counted with a counting global allocator, over workers that really ran and ended, with
//! the event ring at one event so that its copies of the views are not counted.
//!
//! This binary holds one test only, so no other test allocates while it counts.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use anyhow::Result;
use common::*;
use worker_runtime::{Runtime, RuntimeConfig, SpawnSpec, State};

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

/// What the runtime may keep per finished `/bin/true` worker with no labels: its view and its
/// place in the table (a worker that wrote nothing shares one empty log). Kept whole, a live
/// record (spawn spec, stdin queue, timers, probe and restart state, inline in the table's
/// B-tree, and its own output log) cost 1,905 bytes here.
const MAX_FINISHED_RECORD_BYTES: isize = 512;

/// Spawns `n` workers of `true` one after another and waits for each to end.
async fn run_to_the_end(rt: &Runtime, n: usize) -> Result<()> {
    for _ in 0..n {
        let info = rt
            .spawn(SpawnSpec {
                command: Some(vec!["true".into()]),
                ..Default::default()
            })
            .await?;
        let info = terminal(rt, info.id).await?;
        anyhow::ensure!(info.state == State::Exited, "{info:?}");
    }
    Ok(())
}

/// The live bytes once the runtime's tasks have settled (each worker's capture and
/// supervisor tasks end shortly after it does).
async fn settled() -> isize {
    let mut last = LIVE.load(Ordering::Relaxed);
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(40)).await;
        let now = LIVE.load(Ordering::Relaxed);
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_worker_keeps_only_what_its_view_and_output_need() -> Result<()> {
    const N: usize = 400;
    let rt = Runtime::new(RuntimeConfig {
        max_finished: 10 * N,
        event_retention: 1,
        ..config()
    })?;
    // Warm up what is made once (the spawner threads, the watchdog's pipe, tokio's timers).
    run_to_the_end(&rt, 20).await?;
    let before = settled().await;
    run_to_the_end(&rt, N).await?;
    let after = settled().await;
    let per_record = (after - before) / N as isize;
    eprintln!("a finished worker keeps {per_record} bytes of the runtime's heap");
    assert!(
        per_record <= MAX_FINISHED_RECORD_BYTES,
        "a finished worker keeps {per_record} bytes, more than {MAX_FINISHED_RECORD_BYTES}"
    );
    // Every record is still there: the bytes counted are the records', not evictions'.
    assert_eq!(rt.list().len(), N + 20);
    Ok(())
}
