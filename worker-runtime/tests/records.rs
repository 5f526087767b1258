//! Worker records and the event sequence: capacity, retention of finished records, removal,
//! request ids, validation, events, snapshot and shutdown.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use anyhow::Result;
use common::*;
use worker_runtime::{
    LocalId, Problem, Profile, Runtime, RuntimeConfig, RuntimeError, RuntimeEvent, SpawnSpec, State,
};

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_concurrent_spawns_all_exit_cleanly_under_the_limit() -> Result<()> {
    let rt = Runtime::new(RuntimeConfig {
        max_workers: 256,
        ..config()
    })?;
    let spawns = (0..200).map(|_| {
        let rt = rt.clone();
        tokio::spawn(async move {
            rt.spawn(SpawnSpec {
                command: Some(vec!["true".into()]),
                ..Default::default()
            })
            .await
        })
    });
    let mut ids = HashSet::new();
    for spawn in spawns.collect::<Vec<_>>() {
        let info = spawn.await??;
        ids.insert(info.id);
    }
    assert_eq!(ids.len(), 200);
    for id in ids {
        let info = terminal(&rt, id).await?;
        assert_eq!(
            (info.state, info.exit_code),
            (State::Exited, Some(0)),
            "{info:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn max_workers_refuses_a_third_live_worker() -> Result<()> {
    let rt = Runtime::new(RuntimeConfig {
        max_workers: 2,
        ..config()
    })?;
    let a = rt.spawn(sh("sleep 100")).await?;
    let _b = rt.spawn(sh("sleep 100")).await?;
    let third = rt.spawn(sh("sleep 100")).await;
    assert!(
        matches!(third, Err(RuntimeError::CapacityExceeded(_))),
        "{third:?}"
    );
    // Terminal workers do not count.
    rt.stop(a.id, Some(Duration::ZERO))?;
    terminal(&rt, a.id).await?;
    let c = rt.spawn(sh("sleep 100")).await?;
    assert_eq!(c.state, State::Running);
    rt.shutdown(Some(Duration::ZERO)).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn retain_finished_removes_old_records_with_an_event() -> Result<()> {
    let rt = Runtime::new(RuntimeConfig {
        retain_finished: Duration::from_millis(200),
        ..config()
    })?;
    let mut events = rt.events(0);
    let w = rt.spawn(sh("exit 0")).await?;
    terminal(&rt, w.id).await?;
    let removed = within("the Removed event", async {
        loop {
            if let RuntimeEvent::Removed { id, .. } = events.next().await {
                break id;
            }
        }
    })
    .await?;
    assert_eq!(removed, w.id);
    assert_eq!(rt.get(w.id), Err(RuntimeError::NotFound));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn max_finished_evicts_the_oldest_finished_record() -> Result<()> {
    let rt = Runtime::new(RuntimeConfig {
        max_finished: 2,
        ..config()
    })?;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let w = rt.spawn(sh("exit 0")).await?;
        // One at a time, so they finish in order.
        eventually("the worker to end or be evicted", || match rt.get(w.id) {
            Ok(info) if !info.state.is_terminal() => None,
            _ => Some(()),
        })
        .await?;
        ids.push(w.id);
    }
    assert_eq!(rt.get(ids[0]), Err(RuntimeError::NotFound));
    assert!(rt.get(ids[1]).is_ok() && rt.get(ids[2]).is_ok());
    let removed: Vec<LocalId> = drain_events(&rt)
        .into_iter()
        .filter_map(|e| match e {
            RuntimeEvent::Removed { id, .. } => Some(id),
            _ => None,
        })
        .collect();
    assert_eq!(removed, vec![ids[0]]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_request_id_and_spec_return_the_same_worker() -> Result<()> {
    let rt = runtime();
    let spec = SpawnSpec {
        request_id: Some("req-1".into()),
        ..sh("sleep 100")
    };
    let (a, b) = tokio::join!(rt.spawn(spec.clone()), rt.spawn(spec.clone()));
    let (a, b) = (a?, b?);
    assert_eq!(a.id, b.id);
    let again = rt.spawn(spec.clone()).await?;
    assert_eq!(again.id, a.id);
    assert_eq!(rt.list().len(), 1, "only one worker was spawned");

    let other = rt
        .spawn(SpawnSpec {
            request_id: Some("req-1".into()),
            ..sh("sleep 50")
        })
        .await;
    assert!(matches!(other, Err(RuntimeError::Conflict(_))), "{other:?}");

    // Once the record is removed, the request id is free again.
    rt.stop(a.id, Some(Duration::ZERO))?;
    terminal(&rt, a.id).await?;
    rt.remove(a.id)?;
    let fresh = rt.spawn(spec).await?;
    assert_ne!(fresh.id, a.id);
    rt.shutdown(Some(Duration::ZERO)).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn remove_of_a_running_worker_is_a_conflict_and_of_a_terminal_one_removes_it() -> Result<()> {
    let rt = runtime();
    let w = rt.spawn(sh("sleep 100")).await?;
    assert!(matches!(rt.remove(w.id), Err(RuntimeError::Conflict(_))));
    assert_eq!(rt.get(w.id)?.state, State::Running);
    rt.stop(w.id, None)?;
    terminal(&rt, w.id).await?;
    let (_, last) = rt.snapshot();
    rt.remove(w.id)?;
    assert_eq!(rt.get(w.id), Err(RuntimeError::NotFound));
    assert!(rt.list().is_empty());
    let mut events = rt.events(last);
    assert!(matches!(
        events.try_next(),
        Some(RuntimeEvent::Removed { id, seq }) if id == w.id && seq == last + 1
    ));
    assert_eq!(rt.remove(w.id), Err(RuntimeError::NotFound));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn upserted_events_follow_the_state_order_of_a_worker() -> Result<()> {
    let rt = runtime();
    let mut events = rt.events(0);
    let w = rt.spawn(sh("sleep 100")).await?;
    rt.stop(w.id, None)?;
    terminal(&rt, w.id).await?;
    let mut states = Vec::new();
    let mut last_seq = 0;
    within("the terminal event", async {
        loop {
            let event = events.next().await;
            assert_eq!(event.seq(), last_seq + 1, "event seqs have no holes");
            last_seq = event.seq();
            if let RuntimeEvent::Upserted { worker, .. } = event {
                assert_eq!(worker.id, w.id);
                states.push(worker.state);
                if worker.state.is_terminal() {
                    break;
                }
            }
        }
    })
    .await?;
    states.dedup();
    assert_eq!(
        states,
        vec![
            State::Starting,
            State::Running,
            State::Stopping,
            State::Stopped
        ]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_reader_that_falls_behind_a_small_ring_gets_a_gap() -> Result<()> {
    let rt = Runtime::new(RuntimeConfig {
        event_retention: 4,
        ..config()
    })?;
    let mut events = rt.events(0);
    for _ in 0..3 {
        let w = rt.spawn(sh("exit 0")).await?;
        terminal(&rt, w.id).await?;
    }
    // 3 workers × (Starting, Running, Exited) = 9 events; the ring holds the last 4.
    let (_, last) = rt.snapshot();
    assert_eq!(last, 9);
    assert_eq!(
        events.try_next(),
        Some(RuntimeEvent::Gap { from: 1, to: 5 })
    );
    for seq in 6..=9 {
        assert_eq!(events.try_next().map(|e| e.seq()), Some(seq));
    }
    assert_eq!(events.try_next(), None);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_and_events_after_it_tell_the_whole_story() -> Result<()> {
    let rt = runtime();
    let first = rt.spawn(sh("exit 0")).await?;
    terminal(&rt, first.id).await?;
    let (workers, last) = rt.snapshot();
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].state, State::Exited);
    let mut events = rt.events(last);
    assert_eq!(events.try_next(), None);
    let second = rt.spawn(sh("exit 0")).await?;
    let event = within("the next event", events.next()).await?;
    assert!(matches!(
        event,
        RuntimeEvent::Upserted { seq, ref worker } if seq == last + 1 && worker.id == second.id
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_spawn_requests_are_refused() -> Result<()> {
    let rt = runtime();
    let unknown = rt
        .spawn(SpawnSpec {
            profile: Some("nope".into()),
            ..Default::default()
        })
        .await;
    assert!(matches!(unknown, Err(RuntimeError::InvalidRequest(_))));
    let both = rt
        .spawn(SpawnSpec {
            command: Some(vec!["true".into()]),
            ..sh("true")
        })
        .await;
    assert!(matches!(both, Err(RuntimeError::InvalidRequest(_))));
    let neither = rt.spawn(SpawnSpec::default()).await;
    assert!(matches!(neither, Err(RuntimeError::InvalidRequest(_))));
    let bad_env = rt
        .spawn(SpawnSpec {
            env: BTreeMap::from([("A=B".to_string(), "x".to_string())]).into(),
            ..sh("true")
        })
        .await;
    assert!(matches!(bad_env, Err(RuntimeError::InvalidRequest(_))));
    assert!(rt.list().is_empty(), "no record for a refused request");

    let strict = Runtime::new(RuntimeConfig {
        allow_commands: false,
        ..config()
    })?;
    let command = strict
        .spawn(SpawnSpec {
            command: Some(vec!["true".into()]),
            ..Default::default()
        })
        .await;
    assert!(matches!(command, Err(RuntimeError::Forbidden(_))));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_ids_are_not_found() -> Result<()> {
    let rt = runtime();
    let id = LocalId(42);
    assert_eq!(rt.get(id), Err(RuntimeError::NotFound));
    assert_eq!(rt.stop(id, None), Err(RuntimeError::NotFound));
    assert_eq!(rt.remove(id), Err(RuntimeError::NotFound));
    assert_eq!(
        rt.input(id, bytes::Bytes::from_static(b"x")),
        Err(RuntimeError::NotFound)
    );
    assert!(matches!(
        rt.output(id, 0, true),
        Err(RuntimeError::NotFound)
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_stops_every_worker_and_refuses_new_ones() -> Result<()> {
    let rt = runtime();
    let a = rt.spawn(sh("sleep 100")).await?;
    let b = rt
        .spawn(sh("trap '' TERM; echo ready; while :; do sleep 0.1; done"))
        .await?;
    wait_for_output(&rt, b.id, "ready").await?;
    within("shutdown", rt.shutdown(Some(Duration::from_millis(300)))).await?;
    assert_eq!(rt.get(a.id)?.state, State::Stopped);
    assert_eq!(rt.get(b.id)?.state, State::Stopped);
    assert!(matches!(
        rt.spawn(sh("true")).await,
        Err(RuntimeError::Conflict(_))
    ));
    Ok(())
}

/// A worker that ignores SIGTERM: it can only end by SIGKILL, after its grace.
const IGNORES_TERM: &str = "trap '' TERM; echo ready; while :; do sleep 0.1; done";

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_gives_each_worker_its_own_grace_cut_to_the_hosts() -> Result<()> {
    let profile = |grace: Duration| Profile {
        command: vec!["/bin/sh".into(), "-c".into()],
        grace: Some(grace),
        ..Default::default()
    };
    let rt = Runtime::new(RuntimeConfig {
        profiles: BTreeMap::from([
            ("quick".to_string(), profile(Duration::from_millis(200))),
            ("patient".to_string(), profile(Duration::from_secs(600))),
        ]),
        ..config()
    })?;
    let spawn = |profile: &str| SpawnSpec {
        profile: Some(profile.into()),
        args: vec![IGNORES_TERM.into()],
        ..Default::default()
    };
    let quick = rt.spawn(spawn("quick")).await?;
    let patient = rt.spawn(spawn("patient")).await?;
    wait_for_output(&rt, quick.id, "ready").await?;
    wait_for_output(&rt, patient.id, "ready").await?;
    // The host's own bound is far longer than the quick worker's grace and far shorter than
    // the patient one's.
    let shutdown = {
        let rt = rt.clone();
        tokio::spawn(async move { rt.shutdown(Some(Duration::from_secs(120))).await })
    };
    // Well within the host's 120 s: the quick worker was killed after its own 200 ms.
    let ended = terminal(&rt, quick.id).await?;
    assert_eq!(
        (ended.state, ended.signal),
        (State::Stopped, Some(libc::SIGKILL))
    );
    // The patient worker is still in its grace (120 s, its own 600 s cut to the host's).
    let still = rt.get(patient.id)?;
    assert_eq!(still.state, State::Stopping, "{still:?}");
    assert!(!shutdown.is_finished());
    // Bring its SIGKILL forward, so that the test need not wait for it.
    rt.stop(patient.id, Some(Duration::ZERO))?;
    within("shutdown", shutdown).await??;
    let ended = rt.get(patient.id)?;
    assert_eq!(
        (ended.state, ended.signal),
        (State::Stopped, Some(libc::SIGKILL))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_cuts_a_workers_grace_to_the_hosts() -> Result<()> {
    let rt = Runtime::new(RuntimeConfig {
        grace: Duration::from_secs(600),
        ..config()
    })?;
    let w = rt.spawn(sh(IGNORES_TERM)).await?;
    wait_for_output(&rt, w.id, "ready").await?;
    // Without the cut the worker would run for its own 600 s.
    within("shutdown", rt.shutdown(Some(Duration::from_millis(200)))).await?;
    let ended = rt.get(w.id)?;
    assert_eq!(
        (ended.state, ended.signal),
        (State::Stopped, Some(libc::SIGKILL))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn instance_ids_differ_between_runtimes() -> Result<()> {
    let a = runtime();
    let b = runtime();
    assert_eq!(a.instance_id().len(), 16);
    assert!(a.instance_id().chars().all(|c| c.is_ascii_hexdigit()));
    assert_ne!(a.instance_id(), b.instance_id());
    Ok(())
}

/// Every event retained so far.
fn drain_events(rt: &Runtime) -> Vec<RuntimeEvent> {
    let mut reader = rt.events(0);
    std::iter::from_fn(|| reader.try_next()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_spawn_requests_are_refused_naming_the_field() -> Result<()> {
    use worker_runtime::limits::*;
    let rt = runtime();
    let long = |n: usize| "v".repeat(n);
    let cases: Vec<(&str, SpawnSpec)> = vec![
        (
            "`command`",
            SpawnSpec {
                command: Some(vec!["/bin/sh".into(), long(MAX_ARG_BYTES + 1)]),
                ..Default::default()
            },
        ),
        (
            "`args`",
            SpawnSpec {
                args: vec!["exit 0".into(), long(MAX_ARG_BYTES + 1)],
                ..sh("exit 0")
            },
        ),
        (
            "`command`, `args` and `env`",
            SpawnSpec {
                args: vec![long(MAX_ARG_BYTES), long(MAX_ARG_BYTES / 2)],
                env: BTreeMap::from([("K".to_string(), long(MAX_ARG_BYTES / 2))]).into(),
                ..sh("exit 0")
            },
        ),
        (
            "`stdin`",
            SpawnSpec {
                stdin: Some(long(MAX_STDIN_BYTES + 1).into()),
                ..sh("exit 0")
            },
        ),
        (
            "`name`",
            SpawnSpec {
                name: Some(long(MAX_SHORT_TEXT + 1)),
                ..sh("exit 0")
            },
        ),
        (
            "`request_id`",
            SpawnSpec {
                request_id: Some(long(MAX_SHORT_TEXT + 1)),
                ..sh("exit 0")
            },
        ),
        (
            "`labels`",
            SpawnSpec {
                labels: BTreeMap::from([(long(MAX_SHORT_TEXT + 1), "x".to_string())]),
                ..sh("exit 0")
            },
        ),
        (
            "`labels`",
            SpawnSpec {
                labels: BTreeMap::from([("k".to_string(), long(MAX_SHORT_TEXT + 1))]),
                ..sh("exit 0")
            },
        ),
        (
            "`labels`",
            SpawnSpec {
                labels: (0..=MAX_LABELS)
                    .map(|i| (format!("k{i}"), "x".into()))
                    .collect(),
                ..sh("exit 0")
            },
        ),
    ];
    for (field, spec) in cases {
        match rt.spawn(spec).await {
            Err(RuntimeError::InvalidRequest(message)) => {
                assert!(message.contains(field), "{field}: {message}");
                assert!(!message.contains("vvvv"), "the value leaked: {message}");
            }
            other => panic!("{field}: expected InvalidRequest, got {other:?}"),
        }
    }
    assert!(rt.list().is_empty(), "no record for a refused request");

    // At the limits, requests are taken.
    let at_limits = rt
        .spawn(SpawnSpec {
            name: Some(long(MAX_SHORT_TEXT)),
            request_id: Some(long(MAX_SHORT_TEXT)),
            labels: (0..MAX_LABELS)
                .map(|i| (format!("{i:0>256}"), long(MAX_SHORT_TEXT)))
                .collect(),
            stdin: Some(long(MAX_STDIN_BYTES).into()),
            ..sh("exit 0")
        })
        .await?;
    let info = terminal(&rt, at_limits.id).await?;
    assert_eq!((info.state, info.exit_code), (State::Exited, Some(0)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_event_ring_is_bounded_by_bytes_too() -> Result<()> {
    let rt = Runtime::new(RuntimeConfig {
        event_retention_bytes: 64 * 1024,
        ..config()
    })?;
    let mut events = rt.events(0);
    // Each worker makes three events of over 20 KiB each (its args are in every view).
    for _ in 0..4 {
        let w = rt
            .spawn(SpawnSpec {
                args: vec!["exit 0".into(), "x".repeat(20 * 1024)],
                ..sh("exit 0")
            })
            .await?;
        terminal(&rt, w.id).await?;
    }
    let (_, last) = rt.snapshot();
    assert_eq!(last, 12);
    let Some(RuntimeEvent::Gap { from: 1, to }) = events.try_next() else {
        panic!("expected a gap from 1 for a reader behind the ring");
    };
    let kept = last - to;
    assert!((1..=3).contains(&kept), "{kept} events of over 20 KiB kept");
    for seq in to + 1..=last {
        assert_eq!(events.try_next().map(|e| e.seq()), Some(seq));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn health_reports_a_watchdog_that_is_gone() -> Result<()> {
    let rt = runtime();
    assert_eq!(rt.health(), vec![]);
    let first = rt.watchdog_pid();
    let pid = i32::try_from(first)?;
    // SAFETY: kill has no memory-safety preconditions; the pid is the runtime's watchdog.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    eventually("the watchdog to be reported gone", || {
        (rt.health() == vec![Problem::WatchdogGone]).then_some(())
    })
    .await?;
    let message = Problem::WatchdogGone.to_string();
    assert!(!message.contains(&pid.to_string()) && !message.contains('/'));
    // A new watchdog is started, and then all is well again.
    eventually("a new watchdog", || {
        (rt.health().is_empty() && rt.watchdog_pid() != first).then_some(())
    })
    .await?;
    let w = rt.spawn(sh("exit 0")).await?;
    assert_eq!(terminal(&rt, w.id).await?.state, State::Exited);
    Ok(())
}
