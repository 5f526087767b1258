//! What the tests of this package share: starting workers with the real launcher, reading
//! their descriptors, looking at processes in `/proc`, and waiting with deadlines.
#![allow(dead_code)]

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use registry_core::{RuntimeSource, SourceKey, SourceWorker};
use testkit::eventually;
use tokio::io::{AsyncBufReadExt, BufReader};

/// How long a test waits for anything before it fails: generous, for a loaded machine.
pub const WAIT: Duration = Duration::from_secs(20);
/// The pause between two looks at a polled condition.
pub const POLL: Duration = Duration::from_millis(10);

/// A worker started by the launcher. Dropping it kills the worker's process group if its
/// process still runs (checked by its start time, so a reused pid is never hit).
#[derive(Debug)]
pub struct Launched {
    pub descriptor: PathBuf,
    pub pid: i32,
    pub started_at: String,
    pub json: serde_json::Value,
}

impl Launched {
    /// The descriptor's `log` path.
    pub fn log(&self) -> PathBuf {
        PathBuf::from(
            self.json["log"]
                .as_str()
                .expect("the launcher writes a log path"),
        )
    }

    /// The descriptor's `socket` path, if any.
    pub fn socket(&self) -> Option<PathBuf> {
        self.json["socket"].as_str().map(PathBuf::from)
    }

    /// Whether the worker's process is alive and still the one launched.
    pub fn alive(&self) -> bool {
        let started = time::OffsetDateTime::parse(
            &self.started_at,
            &time::format_description::well_known::Rfc3339,
        )
        .expect("the launcher writes RFC 3339")
        .unix_timestamp();
        start_time(self.pid).is_some_and(|s| (s - started).abs() <= 1)
    }

    /// Lets the worker run on after this value is gone (no kill on drop), for a worker
    /// someone else ends, such as the conformance suite.
    pub fn detach(self) -> PathBuf {
        let this = std::mem::ManuallyDrop::new(self);
        this.descriptor.clone()
    }

    /// Kills the process group now (if the process is still the one launched).
    pub fn kill(&self) {
        if self.alive() {
            // SAFETY: kill with a negative pid and a signal number; no memory involved.
            unsafe {
                libc::kill(-self.pid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `/bin/sh -c script` through the launcher into `spool` and returns it once its
/// descriptor is written. The launcher is waited for in the background.
pub async fn launch(spool: &Path, name: &str, script: &str, extra: &[&str]) -> Result<Launched> {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_legacy-launcher"))
        .arg("--spool")
        .arg(spool)
        .arg("--name")
        .arg(name)
        .args(extra)
        .arg("--")
        .args(["/bin/sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the launcher")?;
    let stdout = child.stdout.take().context("the launcher's stdout")?;
    let line = tokio::time::timeout(WAIT, BufReader::new(stdout).lines().next_line()).await;
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    let descriptor = match line {
        Ok(Ok(Some(path))) => PathBuf::from(path),
        Ok(Ok(None)) => bail!("the launcher ended without writing a descriptor"),
        Ok(Err(e)) => bail!("reading the launcher's stdout: {e}"),
        Err(_) => bail!("the launcher printed no descriptor within {WAIT:?}"),
    };
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&descriptor)?)?;
    Ok(Launched {
        pid: json["pid"].as_i64().context("pid")? as i32,
        started_at: json["started_at"]
            .as_str()
            .context("started_at")?
            .to_string(),
        descriptor,
        json,
    })
}

/// Writes `json` to `dir/name` atomically (a temporary name, then a rename), as a launcher
/// should.
pub fn write_descriptor(dir: &Path, name: &str, json: &serde_json::Value) -> Result<PathBuf> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    std::fs::write(&tmp, serde_json::to_vec_pretty(json)?)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// The start time of `pid` in seconds since the epoch, from `/proc`; `None` for a process
/// that is gone or a zombie.
pub fn start_time(pid: i32) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    let ticks: u64 = fields.nth(18)?.parse().ok()?;
    let btime: i64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Some(btime + (ticks / hz.max(1)) as i64)
}

/// Polls `list` until a worker named `name` is there and `check` holds for it.
pub async fn wait_named<S: RuntimeSource + ?Sized>(
    source: &S,
    name: &str,
    within: Duration,
    check: impl Fn(&SourceWorker) -> bool,
) -> Result<SourceWorker> {
    let last = Cell::new(None);
    let (check, last_state) = (&check, &last);
    let what = format!("the worker {name:?} to reach the condition");
    eventually(&what, within, || async move {
        let list = source.list().await?;
        let found = list.into_iter().find(|w| w.name.as_deref() == Some(name));
        last_state.set(found.as_ref().map(|w| w.state));
        Ok(found.filter(|w| check(w)))
    })
    .await
    .with_context(|| format!("it is {:?}", last.get()))
}

/// Polls `get` until `check` holds.
pub async fn wait_key<S: RuntimeSource + ?Sized>(
    source: &S,
    key: &SourceKey,
    check: impl Fn(&SourceWorker) -> bool,
) -> Result<SourceWorker> {
    let last = Cell::new(None);
    let (check, last_state) = (&check, &last);
    eventually("the worker to reach the condition", WAIT, || async move {
        let w = source.get(key).await?;
        last_state.set(Some(w.state));
        Ok(check(&w).then_some(w))
    })
    .await
    .with_context(|| format!("it is {:?}", last.get()))
}

/// Polls until `get` says `worker_not_found`.
pub async fn wait_gone<S: RuntimeSource + ?Sized>(
    source: &S,
    key: &SourceKey,
    within: Duration,
) -> Result<()> {
    eventually("the worker to be gone", within, || async move {
        match source.get(key).await {
            Err(e) if e.code() == "worker_not_found" => Ok(Some(())),
            Err(e) => bail!("get failed with {e}"),
            Ok(_) => Ok(None),
        }
    })
    .await
}

/// Polls until `cond` holds.
pub async fn wait_until(what: &str, within: Duration, cond: impl FnMut() -> bool) -> Result<()> {
    testkit::eventually_sync(&format!("{what} did not happen"), within, cond).await
}

/// A following output stream of `key` from its first chunk.
pub async fn follow<S: RuntimeSource + ?Sized>(
    source: &S,
    key: &SourceKey,
) -> Result<registry_core::OutputStream> {
    let request = registry_core::OutputRequest {
        after: 0,
        follow: true,
    };
    Ok(source.output(key, request).await?)
}
