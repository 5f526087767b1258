//! What the tests of the docker source share: finding the engine (a clear failure under
//! CI, a printed notice and a skip elsewhere), the test image, and a source on its own
//! state directory.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bollard::Docker;
use source_docker::{DockerConfig, DockerSource, Profile};

/// The image the tests run (made by `scripts/docker-test-image`).
pub const IMAGE: &str = "roster-test/busybox:1";

/// How long any condition may take to come true.
pub const WAIT: Duration = Duration::from_secs(30);

/// The engine the tests use: `ROSTER_DOCKER_SOCKET`, else Docker's default socket.
pub fn socket() -> String {
    std::env::var("ROSTER_DOCKER_SOCKET").unwrap_or_else(|_| "/var/run/docker.sock".into())
}

/// A client of the test engine, for what a test does behind the source's back.
pub fn client(socket: &str) -> Docker {
    let version = bollard::ClientVersion {
        major_version: 1,
        minor_version: 41,
    };
    Docker::connect_with_unix(socket, 30, &version).expect("a client for the engine socket")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Podman's Docker-compatible socket for the tests: `ROSTER_PODMAN_SOCKET`, else where
/// `scripts/start-podman` makes it (`target/podman/podman.sock`).
pub fn podman_socket() -> String {
    std::env::var("ROSTER_PODMAN_SOCKET").unwrap_or_else(|_| {
        repo_root()
            .join("target/podman/podman.sock")
            .to_string_lossy()
            .into_owned()
    })
}

/// The engine, with the test image on it; `None` (after a printed notice) when there is
/// no engine and `CI` is unset. Under `CI` a missing engine fails the test: CI must run
/// these tests (`.ci/run` starts `dockerd` first).
pub async fn engine() -> Option<String> {
    engine_at(
        socket(),
        "`scripts/start-dockerd` (Podman: set ROSTER_DOCKER_SOCKET)",
    )
    .await
}

/// Podman's service, as [`engine`] finds Docker's (`.ci/run` starts it with
/// `scripts/start-podman`).
pub async fn podman() -> Option<String> {
    engine_at(podman_socket(), "`scripts/start-podman`").await
}

/// The engine on `socket`, as [`engine`] says; `start` says how to start one.
pub async fn engine_at(socket: String, start: &str) -> Option<String> {
    let docker = client(&socket);
    if let Err(e) = docker.ping().await {
        let message =
            format!("no container engine answers on {socket} ({e}); start one with {start}");
        if std::env::var_os("CI").is_some() {
            panic!("{message}");
        }
        eprintln!("skipped: {message}");
        return None;
    }
    if docker.inspect_image(IMAGE).await.is_err() {
        // The `docker` CLI imports into any engine with the Docker API, Podman's too.
        let status = Command::new("bash")
            .arg(repo_root().join("scripts/docker-test-image"))
            .env(
                "DOCKER_HOST",
                format!("unix://{}", socket.trim_start_matches("unix://")),
            )
            .status()
            .expect("bash runs");
        assert!(status.success(), "scripts/docker-test-image failed");
    }
    Some(socket)
}

/// A runtime config with the profile `shell` (`/bin/sh -c` in the test image) and
/// commands allowed.
pub fn config(socket: &str) -> DockerConfig {
    let shell = Profile {
        image: IMAGE.into(),
        command: vec!["/bin/sh".into(), "-c".into()],
        network: "none".into(),
        ..Default::default()
    };
    DockerConfig {
        socket: socket.to_string().into(),
        profiles: BTreeMap::from([("shell".to_string(), shell)]),
        allow_images: vec!["roster-test/*".into()],
        image: Some(IMAGE.into()),
        allow_commands: true,
        ..Default::default()
    }
}

/// A source on `state`, once the engine has answered it.
pub async fn source(config: DockerConfig, state: &Path) -> DockerSource {
    let source = DockerSource::with_runtime("test", config, state).expect("the source builds");
    assert!(
        source.wait_ready(WAIT).await,
        "the source did not reach the engine within {WAIT:?}"
    );
    source
}

use registry_core::{
    OutputEvent, OutputRequest, RuntimeSource, SourceKey, SourceWorker, SpawnRequest,
};

/// A spawn of `script` through the profile `shell`, named `name`.
pub fn shell(script: &str, name: &str) -> SpawnRequest {
    SpawnRequest {
        profile: Some("shell".into()),
        args: vec![script.into()],
        name: Some(name.into()),
        ..Default::default()
    }
}

/// Polls `get` until `check` holds, for [`WAIT`] at most.
pub async fn wait_for(
    source: &dyn RuntimeSource,
    key: &SourceKey,
    what: &str,
    check: impl Fn(&SourceWorker) -> bool,
) -> anyhow::Result<SourceWorker> {
    let key = key.clone();
    testkit::eventually_seen(what, WAIT, || {
        let key = key.clone();
        let check = &check;
        async move {
            let w = source.get(&key).await?;
            Ok(if check(&w) {
                Ok(w)
            } else {
                Err(format!("{w:?}"))
            })
        }
    })
    .await
}

/// All stdout and stderr text a worker's output stream gives until it closes (or, with
/// `until`, until stdout holds that text).
pub async fn read_output(
    source: &dyn RuntimeSource,
    key: &SourceKey,
    until: Option<&str>,
) -> anyhow::Result<(String, String)> {
    let mut rx = source
        .output(
            key,
            OutputRequest {
                after: 0,
                follow: true,
            },
        )
        .await?;
    let (mut out, mut err) = (String::new(), String::new());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if until.is_some_and(|u| out.contains(u)) {
            return Ok((out, err));
        }
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(OutputEvent::Chunk(c))) => {
                let text = String::from_utf8_lossy(&c.data);
                match c.stream {
                    registry_core::StreamKind::Stdout => out.push_str(&text),
                    registry_core::StreamKind::Stderr => err.push_str(&text),
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => return Ok((out, err)),
            Err(_) => anyhow::bail!("output did not end in {WAIT:?}; stdout so far {out:?}"),
        }
    }
}

/// A runtime's state directory for one test. Dropping it removes every container made
/// with its instance label (also after a failure), through the `docker` CLI.
pub struct StateDir {
    dir: tempfile::TempDir,
    socket: String,
}

impl StateDir {
    pub fn new(socket: &str) -> StateDir {
        StateDir {
            dir: tempfile::tempdir().expect("a temporary directory"),
            socket: socket.to_string(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let Ok(instance) = std::fs::read_to_string(self.dir.path().join("docker-instance")) else {
            return;
        };
        let host = format!("unix://{}", self.socket.trim_start_matches("unix://"));
        let filter = format!("label=roster.instance={}", instance.trim());
        let Ok(out) = Command::new("docker")
            .args(["-H", &host, "ps", "-aq", "--filter", &filter])
            .output()
        else {
            return;
        };
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .args(["-H", &host, "rm", "-f"])
                .args(&ids)
                .output();
        }
    }
}
