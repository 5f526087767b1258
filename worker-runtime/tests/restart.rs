//! Restart policies with real processes: growing, jittered delays within their bounds, a
//! reset after a run that stayed up, `crash_loop` past the limit, no restart after a stop
//! (also while waiting), and output and events that go on across runs.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Result};
use common::*;
use worker_runtime::{
    Backoff, FailReason, OutputItem, Profile, Restart, Runtime, RuntimeConfig, RuntimeEvent, State,
    Stream, WorkerInfo,
};

fn restarting(restart: Restart, backoff: Backoff, max_restarts: u32) -> Runtime {
    let profile = Profile {
        command: vec!["/bin/sh".into(), "-c".into()],
        restart,
        restart_backoff: backoff,
        max_restarts: Some(max_restarts),
        ..Default::default()
    };
    Runtime::new(RuntimeConfig {
        profiles: BTreeMap::from([("sh".to_string(), profile)]),
        ..Default::default()
    })
    .expect("runtime")
}

fn backoff(base_ms: u64, cap_ms: u64, reset_ms: u64) -> Backoff {
    Backoff {
        base: Duration::from_millis(base_ms),
        cap: Duration::from_millis(cap_ms),
        reset_after: Duration::from_millis(reset_ms),
    }
}

/// The views of one worker in the runtime's events, in order.
fn views(rt: &Runtime, worker: &WorkerInfo) -> Vec<WorkerInfo> {
    let mut reader = rt.events(0);
    std::iter::from_fn(|| reader.try_next())
        .filter_map(|e| match e {
            RuntimeEvent::Upserted { worker: w, .. } if w.id == worker.id => Some(w),
            _ => None,
        })
        .collect()
}

/// The delay chosen for each restart, from the view that announced it.
fn delays(views: &[WorkerInfo]) -> Vec<Duration> {
    views
        .iter()
        .filter(|v| v.retry_at.is_some())
        .map(|v| {
            let ended = v.last_exit.expect("a restart says how the run ended").at;
            v.retry_at
                .unwrap()
                .duration_since(ended)
                .unwrap_or_default()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashing_worker_restarts_with_growing_bounded_delays_then_fails_as_a_crash_loop(
) -> Result<()> {
    let policy = backoff(40, 200, 60_000);
    let rt = restarting(Restart::OnFailure, policy, 4);
    let w = rt.spawn(sh("echo run; exit 3")).await?;
    let end = terminal(&rt, w.id).await?;
    assert_eq!(end.state, State::Failed);
    assert_eq!(end.reason, Some(FailReason::CrashLoop));
    assert_eq!((end.restarts, end.exit_code), (4, Some(3)));
    assert_eq!(end.last_exit.map(|e| e.code), Some(Some(3)));

    let seen = views(&rt, &w);
    let delays = delays(&seen);
    assert_eq!(delays.len(), 4, "{seen:#?}");
    for (n, delay) in delays.iter().enumerate() {
        let bound = policy.bound(n as u32);
        assert!(*delay <= bound, "restart {n}: {delay:?} over {bound:?}");
    }
    assert_eq!(
        [
            policy.bound(0),
            policy.bound(1),
            policy.bound(2),
            policy.bound(3)
        ],
        [40, 80, 160, 200].map(Duration::from_millis)
    );
    // Every restart is an event, in order: starting with retry_at, then running again.
    let states: Vec<(State, u32, bool)> = seen
        .iter()
        .map(|v| (v.state, v.restarts, v.retry_at.is_some()))
        .collect();
    let mut expected = vec![(State::Starting, 0, false), (State::Running, 0, false)];
    for n in 1..=4 {
        expected.extend([(State::Starting, n, true), (State::Running, n, false)]);
    }
    expected.push((State::Failed, 4, false));
    assert_eq!(states, expected);
    // A run starts no earlier than its retry_at (wall clock: a little slack).
    for pair in seen.windows(2) {
        if let (Some(due), Some(started)) = (pair[0].retry_at, pair[1].started_at) {
            ensure!(started + Duration::from_millis(50) >= due, "{pair:#?}");
        }
    }

    // Output seqs go on across runs, with a marker for each restart.
    let items = read_to_end(&rt, w.id).await?;
    let seqs: Vec<u64> = items
        .iter()
        .filter_map(|i| match i {
            OutputItem::Chunk { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    let out = String::from_utf8(stream_bytes(&items, Stream::Stdout))?;
    assert_eq!(out, "run\n".repeat(5));
    let markers = String::from_utf8(stream_bytes(&items, Stream::Stderr))?;
    for n in 1..=4 {
        assert!(
            markers.contains(&format!("[roster] restart {n} after exit code 3")),
            "{markers}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_that_stayed_up_resets_the_delay() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("roster-restart-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let counter = dir.join("runs");
    let _ = std::fs::remove_file(&counter);
    // Runs 1–3 crash at once; run 4 stays up past `reset_after` before it crashes too.
    let script = format!(
        "n=$(cat '{c}' 2>/dev/null || echo 0); n=$((n+1)); echo $n > '{c}'; \
         if [ $n -eq 4 ]; then sleep 0.6; fi; exit 1",
        c = counter.display()
    );
    // Bounds of 25, 50, 100, 200, 400 ms without a reset; after run 4 they start again.
    let policy = backoff(25, 10_000, 300);
    let rt = restarting(Restart::OnFailure, policy, 5);
    let w = rt.spawn(sh(&script)).await?;
    let end = terminal(&rt, w.id).await?;
    std::fs::remove_dir_all(&dir)?;
    assert_eq!(end.reason, Some(FailReason::CrashLoop));
    let delays = delays(&views(&rt, &w));
    assert_eq!(delays.len(), 5, "{delays:?}");
    for (n, bound) in [25, 50, 100, 25, 50].into_iter().enumerate() {
        let bound = Duration::from_millis(bound);
        assert!(
            delays[n] <= bound,
            "restart {n}: {:?} over {bound:?}",
            delays[n]
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stop_during_the_backoff_wait_ends_the_worker_and_no_run_follows() -> Result<()> {
    let rt = restarting(Restart::Always, backoff(30_000, 30_000, 30_000), 10);
    let w = rt.spawn(sh("exit 0")).await?;
    let waiting = eventually("the wait for a restart", || {
        rt.get(w.id).ok().filter(|v| v.retry_at.is_some())
    })
    .await?;
    assert_eq!((waiting.state, waiting.restarts), (State::Starting, 1));
    rt.stop(w.id, None)?;
    let stopped = rt.get(w.id)?;
    assert_eq!(
        stopped.state,
        State::Stopped,
        "a stop while waiting ends it at once"
    );
    assert_eq!((stopped.restarts, stopped.retry_at), (1, None));
    // The output ends: nothing is left to run.
    let items = read_to_end(&rt, w.id).await?;
    assert_eq!(items.last(), Some(&OutputItem::End));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_worker_is_not_restarted_even_under_always() -> Result<()> {
    let rt = restarting(Restart::Always, backoff(10, 10, 30_000), 10);
    let w = rt.spawn(sh("echo up; sleep 100")).await?;
    wait_for_output(&rt, w.id, "up").await?;
    rt.stop(w.id, Some(Duration::from_millis(200)))?;
    let end = terminal(&rt, w.id).await?;
    assert_eq!((end.state, end.restarts), (State::Stopped, 0));
    assert!(views(&rt, &w).iter().all(|v| v.restarts == 0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn success_restarts_only_under_always() -> Result<()> {
    let on_failure = restarting(Restart::OnFailure, backoff(10, 10, 30_000), 2);
    let w = on_failure.spawn(sh("exit 0")).await?;
    let end = terminal(&on_failure, w.id).await?;
    assert_eq!(
        (end.state, end.restarts, end.exit_code),
        (State::Exited, 0, Some(0))
    );

    let always = restarting(Restart::Always, backoff(10, 10, 30_000), 2);
    let w = always.spawn(sh("exit 0")).await?;
    let end = terminal(&always, w.id).await?;
    assert_eq!(
        (end.state, end.reason),
        (State::Failed, Some(FailReason::CrashLoop))
    );
    assert_eq!(end.restarts, 2);

    let never = restarting(Restart::Never, backoff(10, 10, 30_000), 2);
    let w = never.spawn(sh("exit 5")).await?;
    let end = terminal(&never, w.id).await?;
    assert_eq!((end.state, end.restarts), (State::Exited, 0));
    Ok(())
}
