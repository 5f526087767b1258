//! Helpers shared by the integration tests: a runtime with a shell profile, polling with a
//! deadline, reading output, and watching processes by pid.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use worker_runtime::{
    LocalId, OutputItem, Profile, Runtime, RuntimeConfig, SpawnSpec, State, Stream, WorkerInfo,
};

/// How long any single condition may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A config with a `sh` profile (`/bin/sh -c`) and commands allowed.
pub fn config() -> RuntimeConfig {
    let sh = Profile {
        command: vec!["/bin/sh".into(), "-c".into()],
        ..Default::default()
    };
    RuntimeConfig {
        allow_commands: true,
        profiles: BTreeMap::from([("sh".to_string(), sh)]),
        ..Default::default()
    }
}

/// A runtime with [`config`].
pub fn runtime() -> Runtime {
    Runtime::new(config()).expect("runtime")
}

/// A spawn of `script` with the `sh` profile.
pub fn sh(script: &str) -> SpawnSpec {
    SpawnSpec {
        profile: Some("sh".into()),
        args: vec![script.into()],
        ..Default::default()
    }
}

/// Polls `check` every 10 ms until it returns `Some`, failing after [`DEADLINE`].
pub async fn eventually<T, F>(what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Option<T>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs `future` with [`DEADLINE`].
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(DEADLINE, future)
        .await
        .with_context(|| format!("timed out waiting for {what}"))
}

/// Waits until the worker is terminal and returns its view.
pub async fn terminal(runtime: &Runtime, id: LocalId) -> Result<WorkerInfo> {
    eventually("a terminal state", || {
        runtime.get(id).ok().filter(|w| w.state.is_terminal())
    })
    .await
}

/// Waits until the worker is in `state`.
pub async fn reaches(runtime: &Runtime, id: LocalId, state: State) -> Result<WorkerInfo> {
    eventually(&format!("state {state:?}"), || {
        runtime.get(id).ok().filter(|w| w.state == state)
    })
    .await
}

/// Reads a worker's whole output (following) up to and including `End`.
pub async fn read_to_end(runtime: &Runtime, id: LocalId) -> Result<Vec<OutputItem>> {
    let mut reader = runtime.output(id, 0, true)?;
    within("the end of the output", async {
        let mut items = Vec::new();
        while let Some(item) = reader.next().await {
            let end = item == OutputItem::End;
            items.push(item);
            if end {
                break;
            }
        }
        items
    })
    .await
}

/// The bytes of one stream among `items`.
pub fn stream_bytes(items: &[OutputItem], wanted: Stream) -> Vec<u8> {
    let mut out = Vec::new();
    for item in items {
        if let OutputItem::Chunk { stream, data, .. } = item {
            if *stream == wanted {
                out.extend_from_slice(data);
            }
        }
    }
    out
}

/// Follows a worker's output until `pattern` has appeared on stdout; returns all stdout text.
pub async fn wait_for_output(runtime: &Runtime, id: LocalId, pattern: &str) -> Result<String> {
    let mut reader = runtime.output(id, 0, true)?;
    within(&format!("output {pattern:?}"), async {
        let mut text = Vec::new();
        while let Some(item) = reader.next().await {
            if let OutputItem::Chunk {
                stream: Stream::Stdout,
                data,
                ..
            } = item
            {
                text.extend_from_slice(&data);
                let s = String::from_utf8_lossy(&text);
                if s.contains(pattern) {
                    return Ok(s.into_owned());
                }
            }
        }
        bail!(
            "output ended without {pattern:?}: {:?}",
            String::from_utf8_lossy(&text)
        )
    })
    .await?
}

/// A process seen by pid, remembered with its start time so that a reused pid is not
/// mistaken for it.
#[derive(Debug, Clone, Copy)]
pub struct Proc {
    pub pid: i32,
    start_time: u64,
}

/// The fields of `/proc/<pid>/stat` from the state on (field 3); `None` if there is no
/// such process.
fn stat_fields_after_name(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses; fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

fn stat_fields(pid: i32) -> Option<(char, u64)> {
    let fields = stat_fields_after_name(pid)?;
    let state = fields.first()?.chars().next()?;
    // Field 22 of stat (starttime) is index 19 after the state field at index 0.
    let start_time = fields.get(19)?.parse().ok()?;
    Some((state, start_time))
}

impl Proc {
    /// Looks up a live process.
    pub fn find(pid: i32) -> Result<Proc> {
        let (state, start_time) = stat_fields(pid).with_context(|| format!("no process {pid}"))?;
        if matches!(state, 'Z' | 'X') {
            bail!("process {pid} is already dead");
        }
        Ok(Proc { pid, start_time })
    }

    /// The pid with what `/proc` says of it (state, parent, group and command line), for
    /// failure messages.
    pub fn describe(&self) -> String {
        let mut fields = stat_fields_after_name(self.pid).unwrap_or_default();
        fields.truncate(4);
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.pid))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        format!(
            "{} (state, ppid, pgid, sid: {fields:?}; {})",
            self.pid,
            cmdline.trim()
        )
    }

    /// Whether the process is gone: no such pid, a zombie (dead, waiting to be reaped by
    /// whoever inherited it), or the pid now belongs to another process.
    pub fn is_gone(&self) -> bool {
        match stat_fields(self.pid) {
            None => true,
            Some((state, start_time)) => {
                matches!(state, 'Z' | 'X') || start_time != self.start_time
            }
        }
    }
}

/// Waits until every process in `procs` is gone.
pub async fn all_gone(procs: &[Proc]) -> Result<()> {
    eventually("the processes to be gone", || {
        procs.iter().all(Proc::is_gone).then_some(())
    })
    .await
    .with_context(|| {
        let alive: Vec<String> = procs
            .iter()
            .filter(|p| !p.is_gone())
            .map(Proc::describe)
            .collect();
        format!("still alive: {alive:?}")
    })
}

/// Parses whitespace-separated pids from worker output.
pub fn pids(text: &str) -> Result<Vec<Proc>> {
    text.split_whitespace()
        .map(|p| Proc::find(p.parse().context("a pid")?))
        .collect()
}
