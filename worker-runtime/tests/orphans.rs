//! No orphan is ever left behind: not after stop, not when a leader exits early, not when the
//! runtime is dropped, and not when the host process is SIGKILLed.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use common::*;
use worker_runtime::{Containment, Runtime, RuntimeConfig, State, Stream};

/// Runs `script`, which prints pids and then reads a line, until its pids are printed;
/// closes its stdin, so that the leader exits, and waits for the worker to end `exited` 0.
/// The processes of those pids.
async fn run_until_leader_exits(rt: &Runtime, script: &str) -> Result<Vec<Proc>> {
    let w = rt.spawn(sh(script)).await?;
    let out = wait_for_output(rt, w.id, "\n").await?;
    let procs = pids(&out)?;
    rt.close_input(w.id)?;
    let info = terminal(rt, w.id).await?;
    assert_eq!((info.state, info.exit_code), (State::Exited, Some(0)));
    Ok(procs)
}

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
    let procs =
        run_until_leader_exits(&rt, "sleep 100 >/dev/null 2>&1 & echo $!; read x || true").await?;
    all_gone(&procs).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_background_child_holding_the_pipes_dies_when_its_leader_exits() -> Result<()> {
    let rt = runtime();
    // Here the background child shares the output pipes: the worker can only end (its output
    // drained) because the child is killed.
    let procs = run_until_leader_exits(&rt, "sleep 100 & echo $!; read x || true").await?;
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

/// The death signal alone: the host starts workers (more of them than there are spawner
/// threads, so that every thread starts some); the test SIGKILLs the host's watchdog, then at
/// once the host (a new watchdog comes only a second later). Each leader must die with the
/// host through the `PR_SET_PDEATHSIG` its spawn set, whichever spawner thread started it.
#[tokio::test(flavor = "multi_thread")]
async fn with_the_watchdog_gone_sigkill_of_the_host_still_kills_every_leader() -> Result<()> {
    if std::env::var_os(HOST_MODE).is_some() {
        return run_as_host_with_many_leaders().await;
    }
    let mut host =
        Host::start("with_the_watchdog_gone_sigkill_of_the_host_still_kills_every_leader")?;
    let mut procs = pids(&host.marker(PIDS_MARKER)?)?;
    let watchdog = procs.remove(0);
    assert_eq!(procs.len(), LEADERS, "every leader's pid");
    let cgroups: Vec<_> = procs.iter().filter_map(|p| cgroup_dir(p.pid)).collect();
    // SAFETY: kill(2) of the host's watchdog, a process this test saw alive; no memory is
    // touched.
    assert_eq!(unsafe { libc::kill(watchdog.pid, libc::SIGKILL) }, 0);
    host.kill()?;
    let gone = all_gone(&procs).await;
    // Nobody is left to remove the host's cgroups (its watchdog was killed on purpose).
    let parents: std::collections::BTreeSet<_> =
        cgroups.iter().filter_map(|c| c.parent()).collect();
    let _ = eventually("the host's cgroups to be removed", || {
        cgroups.iter().for_each(|c| drop(std::fs::remove_dir(c)));
        parents.iter().for_each(|c| drop(std::fs::remove_dir(c)));
        parents.iter().all(|c| !c.exists()).then_some(())
    })
    .await;
    gone
}

/// The directory of a process's cgroup (v2), where the host contains its workers.
fn cgroup_dir(pid: i32) -> Option<std::path::PathBuf> {
    let path = cgroup_of(pid)?;
    if !path.contains("/roster-") {
        return None;
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = mountinfo.lines().find_map(|line| {
        let (fields, rest) = line.split_once(" - ")?;
        (rest.split_whitespace().next()? == "cgroup2")
            .then(|| fields.split_whitespace().nth(4).map(str::to_string))?
    })?;
    Some(std::path::Path::new(&mount).join(path.trim_start_matches('/')))
}

const LEADERS: usize = 12;

async fn run_as_host_with_many_leaders() -> Result<()> {
    let rt = runtime();
    // Started all at once, so the spawner threads share them out.
    let spawns: Vec<_> = (0..LEADERS)
        .map(|_| {
            let rt = rt.clone();
            tokio::spawn(async move { rt.spawn(sh("echo $$; exec sleep 100")).await })
        })
        .collect();
    let mut all = format!("{} ", rt.watchdog_pid());
    for spawn in spawns {
        let w = spawn.await??;
        all.push_str(&wait_for_output(&rt, w.id, "\n").await?);
        all.push(' ');
    }
    print_pids_and_wait(&all).await
}

const READY_MARKER: &str = "ROSTER-TEST-READY";

/// A watchdog that was killed is replaced, and the new one knows the groups: the test finds
/// the host's watchdog in `/proc`, kills it, waits for a new one, has the host start a
/// worker with a grandchild, and SIGKILLs the host: the grandchild dies too.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_watchdog_is_replaced_and_guards_the_workers_started_after() -> Result<()> {
    if std::env::var_os(HOST_MODE).is_some() {
        return run_as_host_after_a_go().await;
    }
    let mut host =
        Host::start("a_killed_watchdog_is_replaced_and_guards_the_workers_started_after")?;
    host.marker(READY_MARKER)?;
    // A worker started before the watchdog dies must be guarded by the new one too.
    let before = pids(&host.marker(PIDS_MARKER)?)?;
    let first = eventually("the host's watchdog", || {
        let found = watchdogs_of(host.pid());
        (found.len() == 1).then(|| found[0])
    })
    .await?;
    // SAFETY: kill(2) of the host's watchdog, found just now; no memory is touched.
    assert_eq!(unsafe { libc::kill(first.pid, libc::SIGKILL) }, 0);
    let second = eventually("a new watchdog of the host", || {
        let found = watchdogs_of(host.pid());
        (found.len() == 1 && found[0].pid != first.pid).then(|| found[0])
    })
    .await
    .context("the killed watchdog was not replaced")?;
    host.send_line("go")?;
    let after = pids(&host.marker(PIDS_MARKER)?)?;
    assert_eq!(after.len(), 2, "a leader and its grandchild");
    host.kill()?;
    let mut procs = before;
    procs.extend(after);
    all_gone(&procs).await?;
    // The new watchdog exits once it has done its work.
    all_gone(&[second]).await
}

/// The host of the test above: one worker with a grandchild at once, then, once told, waits
/// for its runtime to be healthy again (bounded) and starts another.
async fn run_as_host_after_a_go() -> Result<()> {
    let rt = runtime();
    println!("{READY_MARKER}");
    let w = rt.spawn(sh(LEADER_AND_CHILD)).await?;
    let before = eventually_two_lines(&rt, w.id).await?;
    println!(
        "{PIDS_MARKER} {}",
        before.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    let go = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    });
    within("the test's go", go).await???;
    if eventually("the runtime's health", || {
        rt.health().is_empty().then_some(())
    })
    .await
    .is_err()
    {
        eprintln!("the runtime is still unhealthy: {:?}", rt.health());
    }
    // Refused while no watchdog runs: retried, within the deadline.
    let deadline = std::time::Instant::now() + DEADLINE;
    let w = loop {
        match rt.spawn(sh(LEADER_AND_CHILD)).await {
            Ok(w) => break w,
            Err(worker_runtime::RuntimeError::Unavailable { .. })
                if std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => bail!("spawn: {e}"),
        }
    };
    let after = eventually_two_lines(&rt, w.id).await?;
    print_pids_and_wait(&after).await
}

/// The live watchdogs of the process `host`: its children that run the watchdog's script.
fn watchdogs_of(host: i32) -> Vec<Proc> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            let parent = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = stat.get(stat.rfind(')')? + 1..)?.to_string();
                    rest.split_whitespace().nth(1)?.parse::<i32>().ok()
                });
            let script = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("groups="))
                .unwrap_or(false);
            parent == Some(host) && script
        })
        .filter_map(|pid| Proc::find(pid).ok())
        .collect()
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

/// This test binary, re-executed as a host process that runs one test (in [`HOST_MODE`]),
/// with its stdout read line by line.
struct Host {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
}

impl Host {
    fn start(test: &str) -> Result<Host> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(HOST_MODE, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().context("host stdout")?;
        let (lines_tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Host { child, lines })
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(0)
    }

    /// What follows `marker` on the next line that holds it (the harness may print the
    /// test's name on the same line first).
    fn marker(&mut self, marker: &str) -> Result<String> {
        loop {
            match self.lines.recv_timeout(DEADLINE) {
                Ok(line) => {
                    if let Some(at) = line.find(marker) {
                        return Ok(line[at + marker.len()..].to_string());
                    }
                }
                Err(e) => bail!("the host printed no {marker:?}: {e}"),
            }
        }
    }

    fn send_line(&mut self, line: &str) -> Result<()> {
        let stdin = self.child.stdin.as_mut().context("host stdin")?;
        writeln!(stdin, "{line}")?;
        Ok(())
    }

    /// SIGKILL: the host gets no chance to clean up.
    fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Re-executes this test binary as a host running `test`, reads the pids it prints,
/// SIGKILLs it, and returns those processes.
async fn kill_host_and_collect_pids(test: &str) -> Result<Vec<Proc>> {
    let mut host = Host::start(test)?;
    let found = pids(&host.marker(PIDS_MARKER)?);
    host.kill()?;
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

/// Prints the pid of a process that left the worker's process group (and session), which
/// then sleeps with its output elsewhere.
const ESCAPES: &str = "setsid sh -c 'echo $$; exec sleep 300 >/dev/null 2>&1' &";

/// The cgroup (v2) path of a process, from `/proc/<pid>/cgroup`.
fn cgroup_of(pid: i32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

/// Whether this host contains workers in cgroups; where it cannot, the runtime must say so.
fn contained(rt: &worker_runtime::Runtime) -> bool {
    match rt.containment() {
        Containment::Cgroup => true,
        other => {
            let gap = other.gap().expect("an uncontained runtime says so");
            assert!(gap.contains("setsid") && !gap.contains('/'), "{gap}");
            eprintln!("this host offers no writable cgroup v2: {gap}");
            false
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_that_left_the_group_is_gone_after_stop() -> Result<()> {
    let rt = runtime();
    if !contained(&rt) {
        return Ok(());
    }
    let w = rt
        .spawn(sh(&format!("{ESCAPES} while :; do sleep 0.1; done")))
        .await?;
    let out = wait_for_output(&rt, w.id, "\n").await?;
    let escaped = pids(&out)?;
    let cgroup = cgroup_of(escaped[0].pid).context("the escaped process's cgroup")?;
    assert!(
        cgroup.contains(&format!("roster-{}/w-", rt.instance_id())),
        "{cgroup}"
    );
    rt.stop(w.id, None)?;
    let info = terminal(&rt, w.id).await?;
    assert_eq!(info.state, State::Stopped);
    all_gone(&escaped).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_that_left_the_group_is_gone_after_its_leader_exits() -> Result<()> {
    let rt = runtime();
    if !contained(&rt) {
        return Ok(());
    }
    let escaped = run_until_leader_exits(&rt, &format!("{ESCAPES} read x || true")).await?;
    all_gone(&escaped).await
}

#[tokio::test(flavor = "multi_thread")]
async fn with_containment_off_a_process_that_left_the_group_outlives_its_worker() -> Result<()> {
    let rt = Runtime::new(RuntimeConfig {
        contain: false,
        ..config()
    })?;
    assert_eq!(rt.containment(), &Containment::Off);
    assert!(rt.containment().gap().is_some());
    let escaped = run_until_leader_exits(&rt, &format!("{ESCAPES} read x || true")).await?;
    let survived = !escaped[0].is_gone();
    // SAFETY: kill(2) of the process the worker started; no memory is touched.
    unsafe { libc::kill(escaped[0].pid, libc::SIGKILL) };
    assert!(survived, "the process group alone cannot reach it");
    all_gone(&escaped).await
}

#[tokio::test(flavor = "multi_thread")]
async fn output_that_keeps_flowing_from_outside_the_group_is_not_cut() -> Result<()> {
    // Without containment: with it, the process that left the group dies with the leader.
    let rt = Runtime::new(RuntimeConfig {
        contain: false,
        ..config()
    })?;
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
