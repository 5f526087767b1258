//! No orphan is ever left behind: not after stop, not when a leader exits early, not when the
//! runtime is dropped, and not when the host process is SIGKILLed.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use common::*;
use worker_runtime::{State, Stream};

/// Prints the leader's pid and a background child's pid, then waits for the child.
const LEADER_AND_CHILD: &str = "echo $$; sleep 100 & echo $!; wait";

#[tokio::test(flavor = "multi_thread")]
async fn grandchildren_are_gone_after_stop() -> Result<()> {
    let rt = runtime();
    let w = rt.spawn(sh("sleep 100 & echo $!; wait")).await?;
    let out = wait_for_output(&rt, w.id, "\n").await?;
    let procs = pids(&out)?;
    assert_eq!(procs.len(), 1);
    rt.stop(w.id, None)?;
    let info = terminal(&rt, w.id).await?;
    assert_eq!(info.state, State::Stopped);
    all_gone(&procs).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_background_child_dies_when_its_leader_exits() -> Result<()> {
    let rt = runtime();
    // The leader exits at once, leaving `sleep` behind in its process group. The sleep's
    // output goes to /dev/null so the pipes close with the leader.
    let w = rt
        .spawn(sh("sleep 100 >/dev/null 2>&1 & echo $!; read x || true"))
        .await?;
    let out = wait_for_output(&rt, w.id, "\n").await?;
    let procs = pids(&out)?;
    rt.close_input(w.id)?;
    let info = terminal(&rt, w.id).await?;
    assert_eq!((info.state, info.exit_code), (State::Exited, Some(0)));
    all_gone(&procs).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_background_child_holding_the_pipes_dies_when_its_leader_exits() -> Result<()> {
    let rt = runtime();
    // Here the background child shares the output pipes: the worker can only end (its output
    // drained) because the child is killed.
    let w = rt.spawn(sh("sleep 100 & echo $!; read x || true")).await?;
    let out = wait_for_output(&rt, w.id, "\n").await?;
    let procs = pids(&out)?;
    rt.close_input(w.id)?;
    let info = terminal(&rt, w.id).await?;
    assert_eq!((info.state, info.exit_code), (State::Exited, Some(0)));
    all_gone(&procs).await
}

#[tokio::test(flavor = "multi_thread")]
async fn dropping_the_last_runtime_kills_every_worker() -> Result<()> {
    let rt = runtime();
    let clone = rt.clone();
    let w = rt.spawn(sh(LEADER_AND_CHILD)).await?;
    let out = eventually_two_lines(&rt, w.id).await?;
    let procs = pids(&out)?;
    assert_eq!(procs.len(), 2);
    drop(rt);
    // A clone keeps the runtime (and its workers) alive.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        procs.iter().all(|p| !p.is_gone()),
        "killed while a clone lived"
    );
    drop(clone);
    all_gone(&procs).await
}

async fn eventually_two_lines(
    rt: &worker_runtime::Runtime,
    id: worker_runtime::LocalId,
) -> Result<String> {
    let mut reader = rt.output(id, 0, true)?;
    within("two lines of output", async {
        let mut text = String::new();
        while let Some(item) = reader.next().await {
            if let worker_runtime::OutputItem::Chunk { data, .. } = item {
                text.push_str(&String::from_utf8_lossy(&data));
                if text.lines().count() >= 2 {
                    return Ok(text);
                }
            }
        }
        bail!("output ended early: {text:?}")
    })
    .await?
}

const HOST_MODE: &str = "ROSTER_WORKER_RUNTIME_TEST_HOST";
const PIDS_MARKER: &str = "ROSTER-TEST-PIDS:";

/// Run twice: as the test, it re-executes this test binary as a "host" process that starts
/// workers and prints their pids; then it SIGKILLs the host and checks that every worker
/// process (leaders through PR_SET_PDEATHSIG, grandchildren through the watchdog) is gone.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_of_the_host_leaves_no_worker_and_no_grandchild_behind() -> Result<()> {
    if std::env::var_os(HOST_MODE).is_some() {
        return run_as_host().await;
    }
    let mut procs =
        kill_host_and_collect_pids("sigkill_of_the_host_leaves_no_worker_and_no_grandchild_behind")
            .await?;
    assert_eq!(
        procs.len(),
        5,
        "the watchdog, two leaders and two grandchildren"
    );
    let watchdog = procs.remove(0);
    all_gone(&procs)
        .await
        .with_context(|| format!("the host's watchdog: {}", watchdog.describe()))
}

/// The death signal alone: the host's watchdog is killed first, then workers are started
/// (more of them than there are spawner threads, so that every thread starts some), and the
/// host is SIGKILLed. Each leader must die with it through the `PR_SET_PDEATHSIG` its spawn
/// set, whichever spawner thread started it.
#[tokio::test(flavor = "multi_thread")]
async fn with_the_watchdog_gone_sigkill_of_the_host_still_kills_every_leader() -> Result<()> {
    if std::env::var_os(HOST_MODE).is_some() {
        return run_as_host_without_watchdog().await;
    }
    let procs = kill_host_and_collect_pids(
        "with_the_watchdog_gone_sigkill_of_the_host_still_kills_every_leader",
    )
    .await?;
    assert_eq!(procs.len(), LEADERS_WITHOUT_WATCHDOG, "every leader's pid");
    all_gone(&procs).await
}

const LEADERS_WITHOUT_WATCHDOG: usize = 12;

async fn run_as_host_without_watchdog() -> Result<()> {
    let rt = runtime();
    let watchdog = i32::try_from(rt.watchdog_pid())?;
    // SAFETY: kill(2) on our own child, the watchdog; no memory is touched.
    assert_eq!(unsafe { libc::kill(watchdog, libc::SIGKILL) }, 0);
    eventually("the watchdog to be reported gone", || {
        (!rt.health().is_empty()).then_some(())
    })
    .await?;
    // Started all at once, so the spawner threads share them out.
    let spawns: Vec<_> = (0..LEADERS_WITHOUT_WATCHDOG)
        .map(|_| {
            let rt = rt.clone();
            tokio::spawn(async move { rt.spawn(sh("echo $$; exec sleep 100")).await })
        })
        .collect();
    let mut all = String::new();
    for spawn in spawns {
        let w = spawn.await??;
        all.push_str(&wait_for_output(&rt, w.id, "\n").await?);
        all.push(' ');
    }
    print_pids_and_wait(&all).await
}

/// Prints the pids for the test that runs this host, then waits to be killed (ending by
/// itself only if that test is gone).
async fn print_pids_and_wait(pids: &str) -> Result<()> {
    println!(
        "{PIDS_MARKER} {}",
        pids.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    Ok(())
}

/// Re-executes this test binary as a host running `test`, reads the pids it prints,
/// SIGKILLs it, and returns those processes.
async fn kill_host_and_collect_pids(test: &str) -> Result<Vec<Proc>> {
    let mut host = Command::new(std::env::current_exe()?)
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(HOST_MODE, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = host.stdout.take().context("host stdout")?;
    let (lines_tx, lines_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let found = loop {
        match lines_rx.recv_timeout(DEADLINE) {
            Ok(line) => {
                // The harness may print the test's name on the same line first.
                if let Some(at) = line.find(PIDS_MARKER) {
                    break pids(&line[at + PIDS_MARKER.len()..]);
                }
            }
            Err(e) => {
                let _ = host.kill();
                let _ = host.wait();
                bail!("the host printed no pids: {e}");
            }
        }
    };
    // SIGKILL: the host gets no chance to clean up.
    host.kill()?;
    host.wait()?;
    found
}

async fn run_as_host() -> Result<()> {
    let rt = runtime();
    let mut all = format!("{} ", rt.watchdog_pid());
    for _ in 0..2 {
        let w = rt.spawn(sh(LEADER_AND_CHILD)).await?;
        all.push_str(&eventually_two_lines(&rt, w.id).await?);
        all.push(' ');
    }
    print_pids_and_wait(&all).await
}

#[tokio::test(flavor = "multi_thread")]
async fn output_that_keeps_flowing_from_outside_the_group_is_not_cut() -> Result<()> {
    let rt = runtime();
    // A process that left the group (setsid) keeps writing to the worker's stdout for about
    // 4 s, twice as long as the idle drain timeout, but never idle for long. The leader exits
    // as soon as that process is out of its group (field 5 of stat is the group id). The
    // output counts until the pipe closes.
    let w = rt
        .spawn(sh(concat!(
            "setsid sh -c 'i=1; while [ $i -le 20 ]; do echo line$i; i=$((i+1)); sleep 0.2; done' & ",
            "while [ \"$(cut -d' ' -f5 /proc/$!/stat 2>/dev/null)\" = $$ ]; do sleep 0.01; done",
        )))
        .await?;
    let items = read_to_end(&rt, w.id).await?;
    let text = String::from_utf8(stream_bytes(&items, Stream::Stdout))?;
    let want: String = (1..=20).map(|i| format!("line{i}\n")).collect();
    assert_eq!(text, want);
    let info = rt.get(w.id)?;
    assert_eq!((info.state, info.exit_code), (State::Exited, Some(0)));
    Ok(())
}
