//! `mode = "swarm"` against a real one-node swarm: the test makes a network namespace with
//! only its loopback, starts a Docker Engine inside it (its own data root, exec root and
//! socket under `target/`), makes it a swarm manager (`swarm init --advertise-addr
//! 127.0.0.1`), so that the swarm's ingress and overlay networks stay inside that
//! namespace, and runs workers as services.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use registry_core::{RuntimeSource, WorkerState};
use source_docker::{DockerConfig, DockerSource, Mode};

use common::{read_output, shell, wait_for, WAIT};

/// A Docker Engine in a network namespace of its own, made a one-node swarm. Dropping it
/// stops the engine, deletes the namespace and removes its directories.
struct Swarm {
    ns: String,
    dir: PathBuf,
    engine: Option<Child>,
    socket: String,
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Swarm {
    /// The swarm, or `None` (after a printed notice) when this machine cannot make one and
    /// `CI` is unset; under `CI` that fails the test.
    fn start() -> Option<Swarm> {
        match Swarm::try_start() {
            Ok(s) => Some(s),
            Err(e) if std::env::var_os("CI").is_none() => {
                eprintln!("skipped: no swarm in a network namespace here: {e:#}");
                None
            }
            Err(e) => panic!("a swarm in a network namespace could not be made: {e:#}"),
        }
    }

    fn try_start() -> anyhow::Result<Swarm> {
        for tool in ["ip", "nsenter", "dockerd", "docker"] {
            run(Command::new("sh").args(["-c", &format!("command -v {tool}")]))
                .with_context(|| format!("{tool} is not installed"))?;
        }
        let ns = format!("rsw-{}", std::process::id());
        // Short: the engine's own Unix sockets live under it (at most 108 bytes a path).
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/sw")
            .join(&ns);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let _ = run(Command::new("ip").args(["netns", "del", &ns]));
        run(Command::new("ip").args(["netns", "add", &ns]))?;
        let mut swarm = Swarm {
            socket: dir.join("docker.sock").to_string_lossy().into_owned(),
            ns,
            dir,
            engine: None,
        };
        run(Command::new("ip").args(["netns", "exec", &swarm.ns, "ip", "link", "set", "lo", "up"]))?;
        let log = std::fs::File::create(swarm.dir.join("dockerd.log"))?;
        let d = |p: &str| swarm.dir.join(p).to_string_lossy().into_owned();
        // nsenter enters the network namespace only (`ip netns exec` would also mount a
        // fresh /sys, hiding the cgroup mounts the engine needs).
        swarm.engine = Some(
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", swarm.ns))
                .arg("dockerd")
                .args(["--data-root", &d("data"), "--exec-root", &d("exec")])
                .args(["--pidfile", &d("docker.pid")])
                .arg(format!("--host=unix://{}", swarm.socket))
                .args(["--bridge=none", "--iptables=false", "--ip-masq=false"])
                .args(["--default-ulimit", "nofile=1024:1024"])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting dockerd")?,
        );
        let deadline = Instant::now() + Duration::from_secs(120);
        while run(swarm.docker().arg("info")).is_err() {
            if Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(swarm.dir.join("dockerd.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                bail!("the engine did not answer within 120 s: {tail:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        run(swarm
            .docker()
            .args(["swarm", "init", "--advertise-addr", "127.0.0.1"]))
        .context("swarm init")?;
        run(Command::new("bash")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/docker-test-image"))
            .env("DOCKER_HOST", format!("unix://{}", swarm.socket)))?;
        Ok(swarm)
    }

    /// The `docker` CLI aimed at this engine.
    fn docker(&self) -> Command {
        let mut cmd = Command::new("docker");
        cmd.arg("-H").arg(format!("unix://{}", self.socket));
        cmd
    }

    /// The ids of the services with this runtime's instance label.
    fn services(&self, state: &Path) -> anyhow::Result<Vec<String>> {
        let instance = std::fs::read_to_string(state.join("docker-instance"))?;
        let filter = format!("label=roster.instance={}", instance.trim());
        let out = run(self
            .docker()
            .args(["service", "ls", "-q", "--filter", &filter]))?;
        Ok(out.split_whitespace().map(str::to_string).collect())
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        if let Some(mut engine) = self.engine.take() {
            if let Ok(pid) = libc::pid_t::try_from(engine.id()) {
                // SAFETY: kill(2) of the engine this test started.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(engine.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = engine.kill();
            let _ = engine.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        // The engine bind-mounts its data root onto itself and may leave that behind.
        let dir = std::fs::canonicalize(&self.dir).unwrap_or_else(|_| self.dir.clone());
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut under: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| Path::new(m).starts_with(&dir))
            .collect();
        under.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in under {
            let _ = Command::new("umount").args(["-l", m]).output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn swarm_config(socket: &str) -> DockerConfig {
    DockerConfig {
        mode: Mode::Swarm,
        grace: Duration::from_secs(5),
        ..common::config(socket)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_node_swarm_runs_a_worker_as_a_service_streams_it_and_stops_it() -> anyhow::Result<()>
{
    let Some(swarm) = tokio::task::spawn_blocking(Swarm::start).await? else {
        return Ok(());
    };
    let state = tempfile::tempdir()?;
    let source = common::source(swarm_config(&swarm.socket), state.path()).await;
    assert!(!source.capabilities().input, "a swarm task has no stdin");

    // A worker that ends by itself: its exit code, stdout and stderr apart.
    let done = source
        .spawn(shell("echo hello-swarm; echo oops >&2; exit 3", "once"))
        .await?;
    let ended = wait_for(&source, &done.key, "exited", |w| w.state.is_terminal()).await?;
    assert_eq!(
        (ended.state, ended.exit_code),
        (WorkerState::Exited, Some(3)),
        "{ended:?}"
    );
    let (out, err) = read_output(&source, &done.key, None).await?;
    assert_eq!((out.as_str(), err.as_str()), ("hello-swarm\n", "oops\n"));

    // A worker that runs until it is stopped: a service while it runs, none after.
    let live = source
        .spawn(shell(
            "trap 'echo bye; exit 0' TERM; echo up; while :; do sleep 0.2; done",
            "long",
        ))
        .await?;
    read_output(&source, &live.key, Some("up\n")).await?;
    let running = wait_for(&source, &live.key, "running", |w| {
        w.state == WorkerState::Running
    })
    .await?;
    assert!(running.started_at.is_some(), "{running:?}");
    assert_eq!(
        swarm.services(state.path())?.len(),
        2,
        "one service a worker"
    );
    let refused = source.input(&live.key, Bytes::from_static(b"x\n")).await;
    assert_eq!(refused.unwrap_err().code(), "unsupported");
    source.stop(&live.key, None).await?;
    let stopped = wait_for(&source, &live.key, "stopped", |w| w.state.is_terminal()).await?;
    assert_eq!(stopped.state, WorkerState::Stopped, "{stopped:?}");
    let (out, _) = read_output(&source, &live.key, None).await?;
    assert_eq!(out, "up\nbye\n", "the output after SIGTERM is kept too");
    testkit::eventually_seen("the stopped worker's service removed", WAIT, || async {
        let services = swarm.services(state.path())?;
        anyhow::Ok(if services.len() == 1 {
            Ok(())
        } else {
            Err(format!("{services:?}"))
        })
    })
    .await?;

    // `roster` restarted: the finished worker's service is found again under the same
    // key, its output read again from the service's logs.
    drop(source);
    let again = common::source(swarm_config(&swarm.socket), state.path()).await;
    let found = wait_for(&again, &done.key, "found again", |w| w.state.is_terminal()).await?;
    assert_eq!(
        (found.state, found.exit_code, found.name.as_deref()),
        (WorkerState::Exited, Some(3), Some("once"))
    );
    let (out, err) = read_output(&again, &done.key, None).await?;
    assert_eq!((out.as_str(), err.as_str()), ("hello-swarm\n", "oops\n"));
    again.remove(&done.key).await?;
    assert!(
        swarm.services(state.path())?.is_empty(),
        "removal removes the service"
    );
    again.shutdown(None).await;
    drop(swarm);
    Ok(())
}

#[tokio::test]
async fn a_swarm_runtime_on_an_engine_that_is_no_manager_is_unavailable_and_says_why(
) -> anyhow::Result<()> {
    let Some(socket) = common::engine().await else {
        return Ok(());
    };
    // The tests' own engine is no swarm manager.
    let state = tempfile::tempdir()?;
    let source = DockerSource::with_runtime("test", swarm_config(&socket), state.path())?;
    let health = testkit::eventually_seen("unavailable, and why", WAIT, || async {
        let h = source.health().await;
        anyhow::Ok(
            if h.message.as_deref() == Some("the container engine is not a swarm manager") {
                Ok(h)
            } else {
                Err(format!("{h:?}"))
            },
        )
    })
    .await?;
    assert_eq!(health.status, registry_core::HealthStatus::Unavailable);
    let refused = source.spawn(shell("true", "x")).await.unwrap_err();
    assert!(refused.is_retryable(), "{refused:?}");
    Ok(())
}
