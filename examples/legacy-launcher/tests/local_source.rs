//! The `local` source's own rules, with real processes started by the legacy launcher, real
//! descriptor files, logs and sockets.

mod support;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use registry_core::{
    HealthStatus, OutputEvent, OutputRequest, OutputStream, RuntimeSource, SourceEvent,
    SourceHealth, WorkerState,
};
use source_local::{LocalConfig, LocalSource};
use support::{
    follow, launch, wait_gone, wait_key, wait_named, wait_until, write_descriptor, WAIT,
};
use tokio::time::{timeout_at, Instant};

/// A script that runs until it is stopped or killed (at most 300 s).
const LONG: &str = "i=0; while [ $i -lt 3000 ]; do sleep 0.1; i=$((i+1)); done";

fn config(spool: &Path, extra: impl FnOnce(&mut LocalConfig)) -> LocalConfig {
    let mut c = LocalConfig::new(spool);
    extra(&mut c);
    c
}

/// Reads an output stream until its text holds `needle`; returns every event read.
async fn read_until(
    rx: &mut OutputStream,
    seen: &mut Vec<OutputEvent>,
    needle: &str,
) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    while !text(seen).contains(needle) {
        match timeout_at(deadline, rx.recv()).await {
            Ok(Some(e)) => seen.push(e),
            Ok(None) => anyhow::bail!("the stream closed before {needle:?}; text {:?}", text(seen)),
            Err(_) => anyhow::bail!("no {needle:?} within {WAIT:?}; text {:?}", text(seen)),
        }
    }
    Ok(())
}

async fn read_to_close(rx: &mut OutputStream, seen: &mut Vec<OutputEvent>) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        match timeout_at(deadline, rx.recv()).await {
            Ok(Some(e)) => seen.push(e),
            Ok(None) => return Ok(()),
            Err(_) => anyhow::bail!("the stream stayed open; text {:?}", text(seen)),
        }
    }
}

fn text(events: &[OutputEvent]) -> String {
    let bytes: Vec<u8> = events
        .iter()
        .filter_map(|e| match e {
            OutputEvent::Chunk(c) => Some(c.data.to_vec()),
            _ => None,
        })
        .flatten()
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Chunks numbered 1, 2, 3, … with no gap.
fn assert_seqs_without_holes(events: &[OutputEvent]) {
    let mut next = 1;
    for e in events {
        match e {
            OutputEvent::Chunk(c) => {
                assert_eq!(c.seq, next, "a hole in the seqs: {events:?}");
                next += 1;
            }
            OutputEvent::Gap { .. } => panic!("a gap: {events:?}"),
            OutputEvent::End => {}
        }
    }
}

async fn health_of(source: &LocalSource) -> SourceHealth {
    source.health().await
}

/// Waits until the source's diagnostics satisfy `check`.
async fn wait_health(
    source: &LocalSource,
    what: &str,
    check: impl Fn(&SourceHealth) -> bool,
) -> Result<SourceHealth> {
    let deadline = Instant::now() + WAIT;
    loop {
        let h = health_of(source).await;
        if check(&h) {
            return Ok(h);
        }
        ensure!(
            Instant::now() < deadline,
            "{what}: the health is still {h:?}"
        );
        tokio::time::sleep(support::POLL).await;
    }
}

fn codes(h: &SourceHealth) -> Vec<String> {
    let mut c: Vec<String> = h.diagnostics.iter().map(|d| d.code.clone()).collect();
    c.sort();
    c
}

// ---------------------------------------------------------------------------------------
// Discovery

/// With a poll interval of an hour only inotify can tell the source: a new descriptor is
/// listed, a changed one renamed, and a removed one gone, each well within the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_changed_and_removed_descriptors_are_seen_through_inotify() -> Result<()> {
    let spool = tempfile::tempdir()?;
    let source = LocalSource::new(config(spool.path(), |c| {
        c.poll_interval = Duration::from_secs(3600);
    }))?;
    discovery_round(&source, spool.path(), "inotify").await?;
    source.shutdown(None).await;
    Ok(())
}

/// With inotify off, the periodic rescan alone finds the same changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_changed_and_removed_descriptors_are_seen_by_polling_without_inotify() -> Result<()> {
    let spool = tempfile::tempdir()?;
    let source = LocalSource::new(config(spool.path(), |c| {
        c.watch = false;
        c.poll_interval = Duration::from_millis(200);
    }))?;
    discovery_round(&source, spool.path(), "polling").await?;
    source.shutdown(None).await;
    Ok(())
}

/// A descriptor appears, is rewritten with another name, and goes: each is seen within 1 s
/// (the contract) plus a margin for a loaded machine.
async fn discovery_round(source: &LocalSource, spool: &Path, tag: &str) -> Result<()> {
    let seen_within = Duration::from_secs(1) + Duration::from_secs(2);
    let name = format!("discover-{tag}");
    let w = launch(spool, &name, LONG, &[]).await?;
    let found = wait_named(source, &name, seen_within, |w| {
        w.state == WorkerState::Running
    })
    .await
    .context("a new descriptor")?;
    assert_eq!(found.exit_code, None);
    assert_eq!(
        found.started_at.map(|t| t.unix_timestamp()),
        time::OffsetDateTime::parse(
            &w.started_at,
            &time::format_description::well_known::Rfc3339
        )
        .ok()
        .map(|t| t.unix_timestamp())
    );

    // Rewritten for the same process with a new name: the same worker, renamed.
    let mut json = w.json.clone();
    json["name"] = format!("{name}-renamed").into();
    let file = w
        .descriptor
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    write_descriptor(spool, &file, &json)?;
    let renamed = wait_named(source, &format!("{name}-renamed"), seen_within, |_| true)
        .await
        .context("a changed descriptor")?;
    assert_eq!(
        renamed.key, found.key,
        "the same process is the same worker"
    );

    // Removed: the worker goes, though its process still runs.
    fs::remove_file(&w.descriptor)?;
    wait_gone(source, &found.key, seen_within)
        .await
        .context("a removed descriptor")?;
    assert!(
        w.alive(),
        "removing the descriptor must leave the process alone"
    );
    Ok(())
}

/// A removed descriptor removes a live worker with a `Removed` event, and its output
/// streams end (without `End`: the worker did not end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_descriptor_removes_the_worker_and_ends_its_streams() -> Result<()> {
    let spool = tempfile::tempdir()?;
    let source = LocalSource::new(config(spool.path(), |_| {}))?;
    let w = launch(spool.path(), "removed", &format!("echo hello; {LONG}"), &[]).await?;
    let worker = wait_named(&source, "removed", WAIT, |w| {
        w.state == WorkerState::Running
    })
    .await?;
    let mut events = source.events().await?;
    assert!(matches!(events.recv().await, Some(SourceEvent::Resync(_))));
    let mut out = follow(&source, &worker.key).await?;
    let mut seen = Vec::new();
    read_until(&mut out, &mut seen, "hello\n").await?;

    fs::remove_file(&w.descriptor)?;
    let deadline = Instant::now() + WAIT;
    loop {
        match timeout_at(deadline, events.recv()).await? {
            Some(SourceEvent::Removed(k)) if k == worker.key => break,
            Some(_) => {}
            None => anyhow::bail!("the lifecycle stream ended"),
        }
    }
    read_to_close(&mut out, &mut seen).await?;
    assert!(!seen.contains(&OutputEvent::End), "{seen:?}");
    assert_eq!(
        source.get(&worker.key).await.unwrap_err().code(),
        "worker_not_found"
    );
    assert!(w.alive(), "the process is the launcher's: it keeps running");
    source.shutdown(None).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Liveness and states

/// A descriptor whose pid is alive but started at another time (a reused pid) is `exited`
/// from the start, never `running`, and a stop of it sends no signal: the process lives on
/// while a worker stopped at the same moment is long dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_started_at_is_never_running_and_stop_does_not_signal_it() -> Result<()> {
    let spool = tempfile::tempdir()?;
    let staging = tempfile::tempdir()?;
    let source = LocalSource::new(config(spool.path(), |_| {}))?;
    let mut events = source.events().await?;
    assert!(matches!(events.recv().await, Some(SourceEvent::Resync(_))));

    // The impostor: a live process, described with a start an hour off.
    let victim = launch(staging.path(), "impostor", LONG, &["--no-socket"]).await?;
    let started = time::OffsetDateTime::parse(
        &victim.started_at,
        &time::format_description::well_known::Rfc3339,
    )?;
    let mut json = victim.json.clone();
    json["started_at"] = (started - time::Duration::hours(1))
        .format(&time::format_description::well_known::Rfc3339)?
        .into();
    write_descriptor(spool.path(), "impostor.json", &json)?;
    // A control: the real descriptor of another live process.
    let control = launch(staging.path(), "control", LONG, &["--no-socket"]).await?;
    write_descriptor(spool.path(), "control.json", &control.json)?;

    let impostor = wait_named(&source, "impostor", WAIT, |_| true).await?;
    assert_eq!(impostor.state, WorkerState::Exited);
    assert_eq!(impostor.exit_code, None);
    assert!(impostor.ended_at.is_some());
    let ctl = wait_named(&source, "control", WAIT, |w| {
        w.state == WorkerState::Running
    })
    .await?;

    source.stop(&impostor.key, Some(Duration::ZERO)).await?;
    source.stop(&ctl.key, Some(Duration::ZERO)).await?;
    // The control's SIGTERM and SIGKILL went out and it died: the impostor's would have too.
    wait_until("the control's end", WAIT, || !control.alive()).await?;
    wait_key(&source, &ctl.key, |w| w.state == WorkerState::Stopped).await?;
    assert!(
        victim.alive(),
        "a process with another start time must never be signalled"
    );
    let after = source.get(&impostor.key).await?;
    assert_eq!(after.state, WorkerState::Exited);

    // Nothing ever said the impostor was running.
    while let Ok(event) = events.try_recv() {
        let reported: Vec<_> = match event {
            SourceEvent::Upsert(w) => vec![w],
            SourceEvent::Resync(list) => list,
            _ => vec![],
        };
        for w in reported {
            if w.key == impostor.key {
                assert_eq!(
                    w.state,
                    WorkerState::Exited,
                    "the impostor was reported {:?}",
                    w.state
                );
            }
        }
    }
    source.shutdown(None).await;
    Ok(())
}

/// A process that ends by itself turns `exited` with no exit code (it is not our child),
/// with `ended_at`; its output is complete and ends with `End`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_ends_turns_exited_without_exit_code() -> Result<()> {
    let spool = tempfile::tempdir()?;
    let source = LocalSource::new(config(spool.path(), |_| {}))?;
    let _w = launch(
        spool.path(),
        "ends",
        "echo start; sleep 0.5; echo done; exit 7",
        &[],
    )
    .await?;
    let worker = wait_named(&source, "ends", WAIT, |_| true).await?;
    let ended = wait_key(&source, &worker.key, |w| w.state.is_terminal()).await?;
    assert_eq!(ended.state, WorkerState::Exited);
    assert_eq!(ended.exit_code, None);
    assert!(ended.ended_at.is_some());
    let mut out = source
        .output(
            &worker.key,
            OutputRequest {
                after: 0,
                follow: false,
            },
        )
        .await?;
    let mut seen = Vec::new();
    read_to_close(&mut out, &mut seen).await?;
    assert_eq!(text(&seen), "start\ndone\n");
    assert_eq!(seen.last(), Some(&OutputEvent::End));
    source.shutdown(None).await;
    Ok(())
}

/// A worker that traps SIGTERM gets it (its trap runs), stays `stopping` through the grace,
/// then is killed with its whole process group, and ends `stopped`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_of_a_worker_that_traps_term_escalates_to_kill_after_grace() -> Result<()> {
    let spool = tempfile::tempdir()?;
    let source = LocalSource::new(config(spool.path(), |_| {}))?;
    let w = launch(
        spool.path(),
        "stubborn",
        "trap 'echo term' TERM; echo ready; while :; do sleep 0.1; done",
        &[],
    )
    .await?;
    let worker = wait_named(&source, "stubborn", WAIT, |w| {
        w.state == WorkerState::Running
    })
    .await?;
    let mut out = follow(&source, &worker.key).await?;
    let mut seen = Vec::new();
    read_until(&mut out, &mut seen, "ready\n").await?;
    source
        .stop(&worker.key, Some(Duration::from_secs(2)))
        .await?;
    read_until(&mut out, &mut seen, "term\n").await?;
    let during = source.get(&worker.key).await?;
    // The trap ran, so TERM did not end it; until the KILL it is stopping (or, if this
    // machine was slow enough for the grace to pass already, stopped).
    assert!(
        matches!(during.state, WorkerState::Stopping | WorkerState::Stopped),
        "{:?}",
        during.state
    );
    let ended = wait_key(&source, &worker.key, |w| w.state.is_terminal()).await?;
    assert_eq!(ended.state, WorkerState::Stopped);
    assert_eq!(ended.exit_code, None);
    read_to_close(&mut out, &mut seen).await?;
    assert_eq!(seen.last(), Some(&OutputEvent::End));
    assert!(!w.alive(), "the killed process is gone");
    // The group went with it: no process of the group is left.
    let group_left = || {
        fs::read_dir("/proc")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                    .any(|pid| {
                        // SAFETY: getpgid takes a pid; no memory involved.
                        let pgid = unsafe { libc::getpgid(pid) };
                        pgid == w.pid && support::start_time(pid).is_some()
                    })
            })
            .unwrap_or(false)
    };
    wait_until("the end of the whole group", WAIT, || !group_left()).await?;
    // A second stop of a stopped worker is a no-op.
    source.stop(&worker.key, None).await?;
    assert_eq!(source.get(&worker.key).await?.state, WorkerState::Stopped);
    source.shutdown(None).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Output

/// The log is followed across a truncation (O_TRUNC) and a rotation (rename + a new file):
/// every new byte arrives, in order, with seqs that have no holes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_truncated_and_rotated_keeps_following_without_holes() -> Result<()> {
    let spool = tempfile::tempdir()?;
    let logs = tempfile::tempdir()?;
    let log = logs.path().join("app.log");
    let source = LocalSource::new(config(spool.path(), |_| {}))?;
    let _w = launch(
        spool.path(),
        "rotating",
        LONG,
        &["--log", log.to_str().context("a UTF-8 path")?],
    )
    .await?;
    let worker = wait_named(&source, "rotating", WAIT, |w| {
        w.state == WorkerState::Running
    })
    .await?;
    let mut out = follow(&source, &worker.key).await?;
    let mut seen = Vec::new();
    let append = |path: &Path, text: &str| -> Result<()> {
        let mut f = OpenOptions::new().create(true).append(true).open(path)?;
        f.write_all(text.as_bytes())?;
        Ok(())
    };

    let first = "a first line, long enough that what follows a truncation is shorter\n";
    append(&log, first)?;
    read_until(&mut out, &mut seen, first).await?;

    // Truncation: O_TRUNC, then a short line.
    OpenOptions::new().write(true).truncate(true).open(&log)?;
    append(&log, "after truncation\n")?;
    read_until(&mut out, &mut seen, "after truncation\n").await?;

    // Rotation: the old file gets a late line after the rename, then a new file appears.
    let rotated = logs.path().join("app.log.1");
    fs::rename(&log, &rotated)?;
    append(&rotated, "late in the old file\n")?;
    append(&log, "first in the new file\n")?;
    read_until(&mut out, &mut seen, "first in the new file\n").await?;
    append(&log, "second in the new file\n")?;
    read_until(&mut out, &mut seen, "second in the new file\n").await?;

    assert_eq!(
        text(&seen),
        format!(
            "{first}after truncation\nlate in the old file\nfirst in the new file\nsecond in the \
             new file\n"
        )
    );
    assert_seqs_without_holes(&seen);
    source.shutdown(None).await;
    Ok(())
}

/// `shutdown` leaves the processes running (they are the launcher's); a new source on the
/// same spool directory finds them again and reads each log again from its start, numbered
/// from 1 (seqs are per roster process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_leaves_workers_running_and_a_new_source_reads_the_log_again() -> Result<()> {
    let spool = tempfile::tempdir()?;
    let first = LocalSource::new(config(spool.path(), |_| {}))?;
    let w = launch(
        spool.path(),
        "survivor",
        &format!("echo one; echo two; {LONG}"),
        &[],
    )
    .await?;
    let worker = wait_named(&first, "survivor", WAIT, |w| {
        w.state == WorkerState::Running
    })
    .await?;
    let mut out = follow(&first, &worker.key).await?;
    let mut seen = Vec::new();
    read_until(&mut out, &mut seen, "two\n").await?;
    first.shutdown(None).await;
    read_to_close(&mut out, &mut seen).await?;
    assert!(
        !seen.contains(&OutputEvent::End),
        "a live worker's stream ends without End"
    );
    assert!(w.alive(), "shutdown must leave the worker running");
    drop(first);

    let second = LocalSource::new(config(spool.path(), |_| {}))?;
    let again = wait_named(&second, "survivor", WAIT, |w| {
        w.state == WorkerState::Running
    })
    .await?;
    assert_eq!(
        again.key, worker.key,
        "the same descriptor gives the same key"
    );
    let mut out = follow(&second, &again.key).await?;
    let mut seen = Vec::new();
    read_until(&mut out, &mut seen, "two\n").await?;
    assert_eq!(text(&seen), "one\ntwo\n");
    assert!(matches!(seen.first(), Some(OutputEvent::Chunk(c)) if c.seq == 1));
    second
        .stop(&again.key, Some(Duration::from_secs(5)))
        .await?;
    wait_key(&second, &again.key, |w| w.state == WorkerState::Stopped).await?;
    second.shutdown(None).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Diagnostics

/// Malformed, unreadable (a directory named `*.json`, a dangling symlink) and oversized
/// descriptors are diagnostics with the right codes and no path or file name in them; a
/// good worker next to them is unaffected; fixing a file clears its diagnostic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_descriptors_are_diagnostics_without_paths_and_clear_when_fixed() -> Result<()> {
    let spool = tempfile::tempdir()?;
    let source = LocalSource::new(config(spool.path(), |c| c.max_descriptor_bytes = 1024))?;
    let good = launch(spool.path(), "good", LONG, &[]).await?;
    let malformed = spool.path().join("zqmalformedzq.json");
    fs::write(&malformed, r#"{"pid": "/not/a/number", "started_at": "#)?;
    let wrong_type = spool.path().join("zqwrongtypezq.json");
    fs::write(
        &wrong_type,
        r#"{"pid": "/srv/zqvaluezq", "started_at": "2024-05-01T12:00:00Z"}"#,
    )?;
    let dir = spool.path().join("zqdirectoryzq.json");
    fs::create_dir(&dir)?;
    let link = spool.path().join("zqdanglingzq.json");
    std::os::unix::fs::symlink(spool.path().join("zqnowherezq"), &link)?;
    let big = spool.path().join("zqoversizedzq.json");
    fs::write(
        &big,
        serde_json::json!({"pid": 1, "started_at": "2024-05-01T12:00:00Z", "pad": "x".repeat(2000)})
            .to_string(),
    )?;

    let want = [
        "descriptor_malformed",
        "descriptor_malformed",
        "descriptor_too_large",
        "descriptor_unreadable",
        "descriptor_unreadable",
    ];
    let h = wait_health(&source, "five diagnostics", |h| codes(h) == want).await?;
    assert_eq!(
        h.status,
        HealthStatus::Degraded,
        "it answers, with problems"
    );
    let spool_text = spool.path().display().to_string();
    let base = spool
        .path()
        .file_name()
        .context("a temp dir name")?
        .to_string_lossy()
        .into_owned();
    for d in &h.diagnostics {
        for needle in [
            spool_text.as_str(),
            base.as_str(),
            "zq",
            ".json",
            "/srv",
            "/not/a",
        ] {
            assert!(
                !d.message.contains(needle),
                "diagnostic {} names {needle:?}: {}",
                d.code,
                d.message
            );
        }
        assert!(d.message.starts_with("descriptor #"), "{}", d.message);
    }
    assert!(
        h.diagnostics
            .iter()
            .any(|d| d.message.contains("`pid` must be a whole number")),
        "{h:?}"
    );
    // The good worker is there and running, the bad files gave no worker.
    let list = source.list().await?;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].name.as_deref(), Some("good"));
    assert_eq!(list[0].state, WorkerState::Running);
    // The source's Debug names nothing either.
    let debug = format!("{source:?} {h:?}");
    assert!(
        !debug.contains(&spool_text) && !debug.contains("zq"),
        "{debug}"
    );

    // Fixing: the malformed one now describes a live process; the directory goes; the link
    // gets a target; the big one shrinks to a valid descriptor of a gone process.
    let staging = tempfile::tempdir()?;
    let other = launch(staging.path(), "fixed", LONG, &["--no-socket"]).await?;
    write_descriptor(spool.path(), "zqmalformedzq.json", &other.json)?;
    fs::remove_dir(&dir)?;
    fs::write(
        spool.path().join("zqnowherezq"),
        r#"{"pid": 2147483646, "started_at": "2024-05-01T12:00:00Z", "name": "linked"}"#,
    )?;
    fs::write(
        &big,
        r#"{"pid": 2147483645, "started_at": "2024-05-01T12:00:00Z", "name": "shrunk"}"#,
    )?;
    let h = wait_health(&source, "one diagnostic left", |h| {
        codes(h) == ["descriptor_malformed"]
    })
    .await?;
    assert!(h.diagnostics[0].message.contains("`pid`"), "{h:?}");
    wait_named(&source, "fixed", WAIT, |w| w.state == WorkerState::Running).await?;
    let linked = wait_named(&source, "linked", WAIT, |_| true).await?;
    assert_eq!(
        linked.state,
        WorkerState::Exited,
        "pid 2147483646 is no live process"
    );
    wait_named(&source, "shrunk", WAIT, |w| w.state == WorkerState::Exited).await?;
    fs::remove_file(&wrong_type)?;
    let h = wait_health(&source, "no diagnostics", |h| h.diagnostics.is_empty()).await?;
    assert_eq!(h.status, HealthStatus::Ready, "{h:?}");
    assert_eq!(h.message, None);
    // The good worker was never disturbed.
    let still = wait_named(&source, "good", WAIT, |_| true).await?;
    assert_eq!(still.state, WorkerState::Running);
    assert!(good.alive());
    source.shutdown(None).await;
    Ok(())
}

/// A missing spool directory makes the runtime unavailable (without naming it); once it
/// appears, the runtime is ready and its workers are found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_spool_dir_is_unavailable_until_it_appears() -> Result<()> {
    let base = tempfile::tempdir()?;
    let spool = base.path().join("zqspoolzq");
    let source = LocalSource::new(config(&spool, |c| {
        c.poll_interval = Duration::from_millis(100)
    }))?;
    let h = health_of(&source).await;
    assert_eq!(h.status, HealthStatus::Unavailable);
    assert!(h.retry_at.is_some());
    assert_eq!(codes(&h), ["spool_dir_missing"]);
    let text = format!("{:?} {}", h.message, h.diagnostics[0].message);
    assert!(
        !text.contains("zqspoolzq") && !text.contains(&*base.path().to_string_lossy()),
        "{text}"
    );

    fs::create_dir(&spool)?;
    let _w = launch(&spool, "late", LONG, &[]).await?;
    wait_named(&source, "late", WAIT, |w| w.state == WorkerState::Running).await?;
    let h = wait_health(&source, "ready", |h| h.status == HealthStatus::Ready).await?;
    assert!(h.diagnostics.is_empty(), "{h:?}");
    source.shutdown(None).await;
    Ok(())
}

/// Past `max_workers`, descriptors wait with a `too_many_workers` diagnostic, and are taken
/// up when a record goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptors_beyond_max_workers_wait_for_room() -> Result<()> {
    let spool = tempfile::tempdir()?;
    let source = LocalSource::new(config(spool.path(), |c| c.max_workers = 1))?;
    let a = launch(spool.path(), "first", LONG, &["--no-socket"]).await?;
    let first = wait_named(&source, "first", WAIT, |w| w.state == WorkerState::Running).await?;
    let _b = launch(spool.path(), "second", LONG, &["--no-socket"]).await?;
    let h = wait_health(&source, "too many", |h| codes(h) == ["too_many_workers"]).await?;
    assert!(h.diagnostics[0].message.contains("max_workers"), "{h:?}");
    assert_eq!(source.list().await?.len(), 1);

    fs::remove_file(&a.descriptor)?;
    wait_gone(&source, &first.key, WAIT).await?;
    wait_named(&source, "second", WAIT, |w| w.state == WorkerState::Running).await?;
    wait_health(&source, "room again", |h| h.diagnostics.is_empty()).await?;
    source.shutdown(None).await;
    Ok(())
}

/// `remove` of an ended worker drops its record and it does not come back while its
/// descriptor stays; the file is left alone; a descriptor rewritten for another process is
/// a new worker. Records past `retain_finished` go by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_records_stay_dismissed_and_old_ones_expire() -> Result<()> {
    let spool = tempfile::tempdir()?;
    let source = LocalSource::new(config(spool.path(), |c| {
        c.poll_interval = Duration::from_millis(100);
    }))?;
    let done = launch(spool.path(), "done", "exit 0", &[]).await?;
    let worker = wait_named(&source, "done", WAIT, |w| w.state.is_terminal()).await?;
    let live = launch(spool.path(), "live", LONG, &[]).await?;
    let live_worker =
        wait_named(&source, "live", WAIT, |w| w.state == WorkerState::Running).await?;
    assert_eq!(
        source.remove(&live_worker.key).await.unwrap_err().code(),
        "conflict"
    );
    source.remove(&worker.key).await?;
    assert!(
        done.descriptor.exists(),
        "the descriptor is the launcher's: it stays"
    );
    // The same descriptor written again (a new inode, so it is read again) stays dismissed:
    // a marker written after it is found, so the rewrite was looked at by then.
    let file = done
        .descriptor
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    write_descriptor(spool.path(), &file, &done.json)?;
    let _marker = launch(spool.path(), "marker", "exit 0", &[]).await?;
    wait_named(&source, "marker", WAIT, |_| true).await?;
    assert_eq!(
        source.get(&worker.key).await.unwrap_err().code(),
        "worker_not_found"
    );
    assert!(!source
        .list()
        .await?
        .iter()
        .any(|w| w.name.as_deref() == Some("done")));

    // The same file for another process: a new worker.
    let mut json = done.json.clone();
    json["pid"] = live.json["pid"].clone();
    json["started_at"] = live.json["started_at"].clone();
    json["name"] = "reborn".into();
    write_descriptor(spool.path(), &file, &json)?;
    let reborn = wait_named(&source, "reborn", WAIT, |_| true).await?;
    assert_ne!(reborn.key, worker.key);
    assert_eq!(reborn.state, WorkerState::Running);
    source.shutdown(None).await;

    // retain_finished: an ended record goes by itself.
    let spool2 = tempfile::tempdir()?;
    let source = LocalSource::new(config(spool2.path(), |c| {
        c.retain_finished = Duration::from_millis(200);
        c.poll_interval = Duration::from_millis(100);
    }))?;
    let mut events = source.events().await?;
    let _quick = launch(spool2.path(), "quick", "exit 0", &[]).await?;
    let deadline = Instant::now() + WAIT;
    let mut seen_key = None;
    loop {
        match timeout_at(deadline, events.recv()).await? {
            Some(SourceEvent::Upsert(w)) if w.name.as_deref() == Some("quick") => {
                seen_key = Some(w.key)
            }
            Some(SourceEvent::Removed(k)) if Some(&k) == seen_key.as_ref() => break,
            Some(_) => {}
            None => anyhow::bail!("the lifecycle stream ended"),
        }
    }
    source.shutdown(None).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Input

/// Input goes through the worker's socket to its stdin, over one kept connection; a worker
/// without a socket takes none (`unsupported`), one whose socket is gone while it lives is
/// `conflict`, and so is an ended one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_reaches_the_worker_through_its_socket() -> Result<()> {
    let spool = tempfile::tempdir()?;
    let source = LocalSource::new(config(spool.path(), |_| {}))?;
    let _w = launch(
        spool.path(),
        "reader",
        "while read line; do echo \"got:$line\"; [ \"$line\" = quit ] && exit 0; done",
        &[],
    )
    .await?;
    let worker = wait_named(&source, "reader", WAIT, |w| w.state == WorkerState::Running).await?;
    let mut out = follow(&source, &worker.key).await?;
    let mut seen = Vec::new();
    source
        .input(&worker.key, Bytes::from_static(b"one\n"))
        .await?;
    read_until(&mut out, &mut seen, "got:one\n").await?;
    source
        .input(&worker.key, Bytes::from_static(b"two\nquit\n"))
        .await?;
    read_to_close(&mut out, &mut seen).await?;
    assert_eq!(text(&seen), "got:one\ngot:two\ngot:quit\n");
    wait_key(&source, &worker.key, |w| w.state.is_terminal()).await?;
    assert_eq!(
        source
            .input(&worker.key, Bytes::from_static(b"late\n"))
            .await
            .unwrap_err()
            .code(),
        "conflict"
    );

    let _mute = launch(spool.path(), "mute", LONG, &["--no-socket"]).await?;
    let mute = wait_named(&source, "mute", WAIT, |w| w.state == WorkerState::Running).await?;
    let err = source
        .input(&mute.key, Bytes::from_static(b"x\n"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "unsupported", "{err}");

    // A live process whose descriptor names a socket that is not there.
    let staging = tempfile::tempdir()?;
    let deaf = launch(staging.path(), "deaf", LONG, &["--no-socket"]).await?;
    let mut json = deaf.json.clone();
    json["socket"] = spool
        .path()
        .join("zqgonezq.sock")
        .display()
        .to_string()
        .into();
    write_descriptor(spool.path(), "deaf.json", &json)?;
    let deaf_worker =
        wait_named(&source, "deaf", WAIT, |w| w.state == WorkerState::Running).await?;
    let err = source
        .input(&deaf_worker.key, Bytes::from_static(b"x\n"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "conflict", "{err}");
    assert!(!err.to_string().contains("zqgonezq"), "{err}");
    source.shutdown(None).await;
    Ok(())
}
