//! The engine restarted under a running source: the runtime goes `unavailable`, its live
//! workers `unknown`, it comes back by itself, and no worker is lost or shown twice.
//!
//! The test runs a private `dockerd` (its own socket, data and exec roots, loopback only)
//! so that stopping it disturbs no other test.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use registry_core::{HealthStatus, RuntimeSource, SourceEvent, WorkerState};

use common::{shell, wait_for, WAIT};

/// A `dockerd` of this test's own. Dropping it stops that one (by its pid).
struct PrivateEngine {
    root: PathBuf,
    child: Option<Child>,
}

impl PrivateEngine {
    fn socket(&self) -> String {
        self.root.join("docker.sock").display().to_string()
    }

    fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("dockerd.log"))?;
        let child = Command::new("dockerd")
            .args(["--bridge=none", "--iptables=false", "--ip-masq=false"])
            .args(["--default-ulimit", "nofile=1024:1024"])
            .arg("--data-root")
            .arg(self.root.join("data"))
            .arg("--exec-root")
            .arg(self.root.join("exec"))
            .arg("--pidfile")
            .arg(self.root.join("docker.pid"))
            .arg("--host")
            .arg(format!("unix://{}", self.socket()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGTERM, and waits until it has exited (it stops its containers first).
    fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            child.wait()?;
        }
        Ok(())
    }

    async fn wait_answers(&self) -> anyhow::Result<()> {
        let socket = self.socket();
        testkit::eventually(
            "the private engine answers",
            Duration::from_secs(60),
            || {
                let socket = socket.clone();
                async move {
                    if !Path::new(&socket).exists() {
                        return Ok(None);
                    }
                    Ok(common::client(&socket).ping().await.ok().map(|_| ()))
                }
            },
        )
        .await
        .map_err(|e| {
            let log = std::fs::read_to_string(self.root.join("dockerd.log")).unwrap_or_default();
            let tail: String = log.lines().rev().take(30).collect::<Vec<_>>().join("\n");
            e.context(format!("dockerd's log, last lines first:\n{tail}"))
        })
    }
}

impl Drop for PrivateEngine {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_restarted_mid_run_loses_no_worker_and_shows_none_twice() -> anyhow::Result<()> {
    // The shared engine makes the image's root file system (cached under target/).
    let Some(_) = common::engine().await else {
        return Ok(());
    };
    let found = Command::new("dockerd").arg("--version").output().is_ok();
    assert!(found, "this test runs a private dockerd; install docker.io");
    let root = tempfile::Builder::new()
        .prefix("roster-engine-")
        .tempdir_in("/tmp")?;
    let mut engine = PrivateEngine {
        root: root.path().to_path_buf(),
        child: None,
    };
    engine.start()?;
    engine.wait_answers().await?;
    let socket = engine.socket();
    let status = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/docker-test-image"))
        .env("DOCKER_HOST", format!("unix://{socket}"))
        .status()?;
    assert!(status.success(), "importing the test image failed");

    let state = common::StateDir::new(&socket);
    let source = common::source(common::config(&socket), state.path()).await;
    let mut events = source.events().await?;
    let done = source.spawn(shell("echo done", "done")).await?;
    wait_for(&source, &done.key, "exited", |w| {
        w.state == WorkerState::Exited
    })
    .await?;
    let live = source.spawn(shell("echo up; sleep 600", "live")).await?;
    wait_for(&source, &live.key, "running", |w| {
        w.state == WorkerState::Running
    })
    .await?;

    engine.stop()?;
    testkit::eventually("the runtime is unavailable", WAIT, || async {
        Ok((source.health().await.status == HealthStatus::Unavailable).then_some(()))
    })
    .await?;
    // The engine stopped its containers as it went; the worker is unknown or already ended.
    let seen = source.get(&live.key).await?;
    assert!(
        seen.state == WorkerState::Unknown || seen.state.is_terminal(),
        "{seen:?}"
    );

    engine.start()?;
    engine.wait_answers().await?;
    testkit::eventually("the runtime is ready again", WAIT, || async {
        Ok((source.health().await.status == HealthStatus::Ready).then_some(()))
    })
    .await?;
    let ended = wait_for(&source, &live.key, "terminal", |w| w.state.is_terminal()).await?;
    assert_eq!(ended.state, WorkerState::Failed, "{ended:?}");
    let still = source.get(&done.key).await?;
    assert_eq!(
        (still.state, still.exit_code),
        (WorkerState::Exited, Some(0))
    );
    let keys: Vec<_> = source.list().await?.into_iter().map(|w| w.key).collect();
    assert_eq!(keys.len(), 2, "each worker once: {keys:?}");
    assert_eq!(
        keys.iter().collect::<BTreeSet<_>>(),
        [&done.key, &live.key].into_iter().collect()
    );
    // The lifecycle stream said so: unavailable, then a Resync holding both, each once.
    let mut unavailable = false;
    let mut resync_after = None;
    while let Ok(Some(event)) =
        tokio::time::timeout(Duration::from_millis(300), events.recv()).await
    {
        match event {
            SourceEvent::Health(h) if h.status == HealthStatus::Unavailable => unavailable = true,
            SourceEvent::Resync(list) if unavailable => resync_after = Some(list),
            _ => {}
        }
    }
    assert!(unavailable, "the stream reported the engine unavailable");
    let list = resync_after.expect("a Resync after the reconnect");
    let mut keys: Vec<_> = list.iter().map(|w| &w.key).collect();
    keys.sort();
    keys.dedup();
    assert_eq!((keys.len(), list.len()), (2, 2));
    source.shutdown(None).await;
    drop(state);
    engine.stop()?;
    Ok(())
}
