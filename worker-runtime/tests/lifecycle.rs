//! Workers from spawn to a terminal state: output, exit codes, signals, stop, stdin, env.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use common::*;
use worker_runtime::{
    FailReason, OutputItem, Profile, Runtime, RuntimeConfig, RuntimeError, SpawnSpec, State, Stream,
};

#[tokio::test(flavor = "multi_thread")]
async fn stdout_and_stderr_are_read_back_in_order_with_seq_from_one() -> Result<()> {
    let rt = runtime();
    // The sleeps make each line its own read, so the interleaving is observable.
    let w = rt
        .spawn(sh(
            "echo one; sleep 0.2; echo two >&2; sleep 0.2; echo three",
        ))
        .await?;
    let items = read_to_end(&rt, w.id).await?;
    let chunks: Vec<(u64, Stream, String)> = items
        .iter()
        .filter_map(|i| match i {
            OutputItem::Chunk { seq, stream, data } => {
                Some((*seq, *stream, String::from_utf8_lossy(data).into_owned()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        chunks,
        vec![
            (1, Stream::Stdout, "one\n".to_string()),
            (2, Stream::Stderr, "two\n".to_string()),
            (3, Stream::Stdout, "three\n".to_string()),
        ]
    );
    assert_eq!(items.last(), Some(&OutputItem::End));
    let info = rt.get(w.id)?;
    assert_eq!(info.state, State::Exited);
    assert_eq!(info.exit_code, Some(0));
    assert!(info.started_at.is_some() && info.ended_at.is_some());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_codes_are_reported() -> Result<()> {
    let rt = runtime();
    let ok = rt.spawn(sh("exit 0")).await?;
    let three = rt.spawn(sh("exit 3")).await?;
    let ok = terminal(&rt, ok.id).await?;
    let three = terminal(&rt, three.id).await?;
    assert_eq!(
        (ok.state, ok.exit_code, ok.reason),
        (State::Exited, Some(0), None)
    );
    assert_eq!(
        (three.state, three.exit_code, three.reason),
        (State::Exited, Some(3), None)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn death_by_an_unrequested_signal_is_failed_killed() -> Result<()> {
    let rt = runtime();
    let w = rt.spawn(sh("kill -9 $$")).await?;
    let w = terminal(&rt, w.id).await?;
    assert_eq!(w.state, State::Failed);
    assert_eq!(w.reason, Some(FailReason::Killed));
    assert_eq!(w.signal, Some(libc::SIGKILL));
    assert_eq!(w.exit_code, None);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_program_gives_a_failed_worker_not_an_error() -> Result<()> {
    let rt = runtime();
    let w = rt
        .spawn(SpawnSpec {
            command: Some(vec!["/nonexistent/roster-test-program".into()]),
            ..Default::default()
        })
        .await?;
    assert_eq!(w.state, State::Failed);
    assert_eq!(w.reason, Some(FailReason::SpawnFailed));
    assert!(w.started_at.is_none() && w.ended_at.is_some());
    // Its output ends at once.
    assert_eq!(read_to_end(&rt, w.id).await?, vec![OutputItem::End]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_working_directory_gives_spawn_failed() -> Result<()> {
    let mut config = config();
    config.profiles.insert(
        "nowhere".into(),
        Profile {
            command: vec!["/bin/true".into()],
            cwd: Some("/nonexistent/roster-test-dir".into()),
            ..Default::default()
        },
    );
    let rt = Runtime::new(config)?;
    let w = rt
        .spawn(SpawnSpec {
            profile: Some("nowhere".into()),
            ..Default::default()
        })
        .await?;
    assert_eq!(
        (w.state, w.reason),
        (State::Failed, Some(FailReason::SpawnFailed))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn input_is_written_to_stdin_in_order() -> Result<()> {
    let rt = runtime();
    let w = rt
        .spawn(SpawnSpec {
            stdin: Some("first\n".into()),
            ..sh("read a; echo got:$a; read b; echo got:$b; cat")
        })
        .await?;
    rt.input(w.id, Bytes::from_static(b"second\n"))?;
    wait_for_output(&rt, w.id, "got:first\ngot:second\n").await?;
    rt.input(w.id, Bytes::from_static(b"echoed by cat\n"))?;
    wait_for_output(&rt, w.id, "echoed by cat\n").await?;
    // Closing stdin lets `cat` see end of file and exit by itself.
    rt.close_input(w.id)?;
    let info = terminal(&rt, w.id).await?;
    assert_eq!((info.state, info.exit_code), (State::Exited, Some(0)));
    assert!(matches!(
        rt.input(w.id, Bytes::from_static(b"late")),
        Err(RuntimeError::Conflict(_))
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn input_after_stdin_is_closed_is_a_conflict() -> Result<()> {
    let rt = runtime();
    // The worker closes its own stdin and keeps running.
    let w = rt.spawn(sh("exec 0<&-; echo closed; sleep 100")).await?;
    wait_for_output(&rt, w.id, "closed").await?;
    // The first writes may still be accepted into the queue; once the writer hits the broken
    // pipe, input is refused.
    eventually("input to be refused", || {
        match rt.input(w.id, Bytes::from_static(b"x\n")) {
            Err(RuntimeError::Conflict(_)) => Some(()),
            _ => None,
        }
    })
    .await?;
    rt.stop(w.id, Some(Duration::ZERO))?;
    terminal(&rt, w.id).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn pending_input_is_bounded() -> Result<()> {
    let rt = Runtime::new(RuntimeConfig {
        max_pending_input: 1000,
        ..config()
    })?;
    // The worker never reads stdin, so queued input stays pending once the pipe is full.
    let w = rt.spawn(sh("sleep 100")).await?;
    let chunk = Bytes::from(vec![b'x'; 1000]);
    assert!(matches!(
        rt.input(w.id, Bytes::from(vec![b'x'; 1001])),
        Err(RuntimeError::CapacityExceeded(_))
    ));
    // The pipe takes some (64 KiB typically); after that the queue fills up.
    let refused = eventually("input to be refused for capacity", || {
        for _ in 0..200 {
            match rt.input(w.id, chunk.clone()) {
                Ok(()) => {}
                Err(RuntimeError::CapacityExceeded(_)) => return Some(true),
                Err(_) => return Some(false),
            }
        }
        None
    })
    .await?;
    assert!(refused, "expected CapacityExceeded");
    rt.stop(w.id, Some(Duration::ZERO))?;
    terminal(&rt, w.id).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_of_a_sleeping_worker_ends_it_quickly_as_stopped() -> Result<()> {
    let rt = runtime();
    let w = rt.spawn(sh("sleep 100")).await?;
    assert_eq!(w.state, State::Running);
    let asked = Instant::now();
    rt.stop(w.id, None)?;
    let info = terminal(&rt, w.id).await?;
    assert!(asked.elapsed() < Duration::from_secs(5));
    assert_eq!(info.state, State::Stopped);
    assert_eq!(info.signal, Some(libc::SIGTERM));
    assert_eq!(info.reason, None);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_ignores_sigterm_is_sigkilled_after_grace() -> Result<()> {
    let rt = runtime();
    let w = rt
        .spawn(sh(
            "trap 'echo term' TERM; echo ready; while :; do sleep 0.1; done",
        ))
        .await?;
    wait_for_output(&rt, w.id, "ready").await?;
    let grace = Duration::from_millis(1500);
    let asked = Instant::now();
    rt.stop(w.id, Some(grace))?;
    wait_for_output(&rt, w.id, "term").await?;
    // SIGTERM was handled and the worker lives on, still stopping.
    assert!(
        asked.elapsed() < grace,
        "the test machine is too slow to observe this"
    );
    assert_eq!(rt.get(w.id)?.state, State::Stopping);
    let info = terminal(&rt, w.id).await?;
    assert!(asked.elapsed() >= grace, "killed before the grace period");
    assert_eq!(info.state, State::Stopped);
    assert_eq!(info.signal, Some(libc::SIGKILL));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_with_zero_grace_kills_at_once() -> Result<()> {
    let rt = runtime();
    let w = rt
        .spawn(sh(
            "trap 'echo term' TERM; echo ready; while :; do sleep 0.1; done",
        ))
        .await?;
    wait_for_output(&rt, w.id, "ready").await?;
    rt.stop(w.id, Some(Duration::ZERO))?;
    let info = terminal(&rt, w.id).await?;
    assert_eq!(
        (info.state, info.signal),
        (State::Stopped, Some(libc::SIGKILL))
    );
    let out = stream_bytes(&read_to_end(&rt, w.id).await?, Stream::Stdout);
    assert_eq!(out, b"ready\n", "no SIGTERM was sent");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_later_stop_with_a_shorter_grace_brings_the_kill_forward() -> Result<()> {
    let rt = runtime();
    let w = rt
        .spawn(sh(
            "trap 'echo term' TERM; echo ready; while :; do sleep 0.1; done",
        ))
        .await?;
    wait_for_output(&rt, w.id, "ready").await?;
    rt.stop(w.id, Some(Duration::from_secs(100)))?;
    wait_for_output(&rt, w.id, "term").await?;
    rt.stop(w.id, Some(Duration::ZERO))?;
    let info = terminal(&rt, w.id).await?;
    assert_eq!(
        (info.state, info.signal),
        (State::Stopped, Some(libc::SIGKILL))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_exits_on_sigterm_is_stopped_with_its_exit_code() -> Result<()> {
    let rt = runtime();
    let w = rt
        .spawn(sh(
            "trap 'exit 7' TERM; echo ready; while :; do sleep 0.1; done",
        ))
        .await?;
    wait_for_output(&rt, w.id, "ready").await?;
    rt.stop(w.id, Some(Duration::from_secs(5)))?;
    let info = terminal(&rt, w.id).await?;
    assert_eq!(
        (info.state, info.exit_code, info.signal),
        (State::Stopped, Some(7), None)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_twice_is_ok() -> Result<()> {
    let rt = runtime();
    let w = rt.spawn(sh("sleep 100")).await?;
    rt.stop(w.id, None)?;
    rt.stop(w.id, None)?;
    let info = terminal(&rt, w.id).await?;
    assert_eq!(info.state, State::Stopped);
    rt.stop(w.id, None)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn terminal_states_never_change() -> Result<()> {
    let rt = runtime();
    let w = rt.spawn(sh("exit 0")).await?;
    let before = terminal(&rt, w.id).await?;
    assert_eq!(before.state, State::Exited);
    rt.stop(w.id, None)?;
    rt.stop(w.id, Some(Duration::ZERO))?;
    assert_eq!(rt.get(w.id)?, before);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn env_values_and_stdin_are_redacted_in_debug_output() -> Result<()> {
    let spec = SpawnSpec {
        env: BTreeMap::from([("TOKEN".to_string(), "s3cr3t-value".to_string())]).into(),
        stdin: Some("private-input".into()),
        ..sh("true")
    };
    let text = format!("{spec:?}");
    assert!(text.contains("TOKEN"));
    assert!(!text.contains("s3cr3t-value") && !text.contains("private-input"));
    let profile = Profile {
        command: vec!["/bin/sh".into()],
        cwd: Some("/srv/secret-dir".into()),
        env: BTreeMap::from([("TOKEN".to_string(), "s3cr3t-value".to_string())]).into(),
        ..Default::default()
    };
    let text = format!(
        "{:?}",
        RuntimeConfig {
            profiles: BTreeMap::from([("p".to_string(), profile)]),
            ..Default::default()
        }
    );
    assert!(!text.contains("s3cr3t-value") && !text.contains("/srv/secret-dir"));
    Ok(())
}

/// Tasks alive on the test's tokio runtime (the runtime's own timers among them).
fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

#[tokio::test(flavor = "multi_thread")]
async fn repeated_stops_with_shorter_graces_keep_one_kill_timer() -> Result<()> {
    let rt = runtime();
    let w = rt
        .spawn(sh("trap '' TERM; echo ready; while :; do sleep 0.1; done"))
        .await?;
    wait_for_output(&rt, w.id, "ready").await?;
    rt.stop(w.id, Some(Duration::from_secs(3600)))?;
    let with_one_timer = alive_tasks();
    for less in 1..=100 {
        rt.stop(w.id, Some(Duration::from_secs(3600 - less)))?;
    }
    // Each stop replaced the timer before it; the replaced ones are aborted and go away.
    eventually("the replaced kill timers to go", || {
        (alive_tasks() <= with_one_timer).then_some(())
    })
    .await?;
    assert_eq!(rt.get(w.id)?.state, State::Stopping);
    rt.stop(w.id, Some(Duration::ZERO))?;
    let info = terminal(&rt, w.id).await?;
    assert_eq!(
        (info.state, info.signal),
        (State::Stopped, Some(libc::SIGKILL))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_ends_leaves_no_kill_timer_behind() -> Result<()> {
    let rt = runtime();
    let before = alive_tasks();
    let w = rt.spawn(sh("sleep 100")).await?;
    rt.stop(w.id, Some(Duration::from_secs(3600)))?;
    let info = terminal(&rt, w.id).await?;
    assert_eq!(
        (info.state, info.signal),
        (State::Stopped, Some(libc::SIGTERM))
    );
    // Captures, supervisor and stdin writer end with the worker; so must the timer.
    eventually(
        "the worker's tasks, its kill timer among them, to go",
        || (alive_tasks() <= before).then_some(()),
    )
    .await?;
    Ok(())
}
