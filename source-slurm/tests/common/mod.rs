//! What the tests of the slurm source share: finding the test cluster that
//! `scripts/start-slurm` starts (a clear failure under CI, a printed notice and a skip
//! elsewhere), a config for it, and what a test does behind the source's back (`scancel`,
//! stopping and starting slurmctld).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use registry_core::{
    OutputEvent, OutputRequest, RuntimeSource, SourceKey, SourceWorker, SpawnRequest,
};
use source_slurm::{Profile, SlurmConfig, SlurmSource};

/// How long any condition may take to come true (a loaded machine schedules slowly).
pub const WAIT: Duration = Duration::from_secs(60);

/// The test cluster: where it answers and how to reach it.
#[derive(Clone, Debug)]
pub struct Cluster {
    pub url: String,
    pub user: String,
    pub token_file: PathBuf,
    /// `SLURM_CONF` for scontrol, scancel, squeue.
    pub slurm_conf: String,
    pub dir: PathBuf,
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The cluster `scripts/start-slurm` made (it is run here when its files are missing or
/// its slurmrestd does not answer); `None` (after a printed notice) when there is none and
/// `CI` is unset. Under `CI` a missing cluster fails the test: CI must run these tests.
pub async fn cluster() -> Option<Cluster> {
    let dir = repo_root().join("target/slurm");
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let found = || -> Option<Cluster> {
        let env = read("env")?;
        Some(Cluster {
            url: read("url")?,
            user: read("user")?,
            token_file: dir.join("token"),
            slurm_conf: env.trim().strip_prefix("SLURM_CONF=")?.to_string(),
            dir: dir.clone(),
        })
    };
    let answers = |c: &Cluster| {
        let token = std::fs::read_to_string(&c.token_file).unwrap_or_default();
        Command::new("curl")
            .args(["-sf", "-m", "20", "-o", "/dev/null"])
            .arg("-H")
            .arg(format!("X-SLURM-USER-NAME: {}", c.user))
            .arg("-H")
            .arg(format!("X-SLURM-USER-TOKEN: {token}"))
            .arg(format!("{}/slurm/v0.0.38/ping", c.url))
            .status()
            .is_ok_and(|s| s.success())
    };
    if let Some(c) = found().filter(answers) {
        return Some(c);
    }
    let have_slurm = Path::new("/usr/sbin/slurmctld").exists();
    if have_slurm {
        start_slurm();
        if let Some(c) = found().filter(answers) {
            return Some(c);
        }
    }
    let message = "no Slurm test cluster answers; start one with `scripts/start-slurm` \
                   (Debian: slurm-wlm, slurmrestd, munge)";
    if std::env::var_os("CI").is_some() {
        panic!("{message}");
    }
    eprintln!("skipped: {message}");
    None
}

/// Runs `scripts/start-slurm` (idempotent: starts what is not running).
pub fn start_slurm() {
    let status = Command::new("bash")
        .arg(repo_root().join("scripts/start-slurm"))
        .status()
        .expect("bash runs");
    assert!(status.success(), "scripts/start-slurm failed");
}

impl Cluster {
    /// A Slurm command (`scancel`, `scontrol`, …) against the test cluster.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.slurm_conf);
        c
    }

    /// A runtime config with the profile `shell` (`/bin/sh -c`), commands allowed, output
    /// files in `output_dir`, and a quick poll.
    pub fn config(&self, output_dir: &Path) -> SlurmConfig {
        let shell = Profile {
            command: Some(vec!["/bin/sh".into(), "-c".into()]),
            ..Default::default()
        };
        SlurmConfig {
            url: self.url.clone().into(),
            user: self.user.clone(),
            token_file: Some(self.token_file.clone().into()),
            output_dir: Some(output_dir.to_path_buf().into()),
            profiles: BTreeMap::from([("shell".to_string(), shell)]),
            allow_commands: true,
            poll_interval: Duration::from_millis(250),
            ..Default::default()
        }
    }

    /// The pid of one of the cluster's daemons (`slurmctld`, `slurmd`, `slurmrestd`).
    pub fn pid(&self, daemon: &str) -> Option<i32> {
        std::fs::read_to_string(self.dir.join(format!("run/{daemon}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

/// A runtime's state and output directories for one test. Dropping it cancels every job
/// of its runtime still on the cluster (also after a failure).
pub struct Dirs {
    pub state: tempfile::TempDir,
    pub output: tempfile::TempDir,
    cluster: Cluster,
}

impl Dirs {
    pub fn new(cluster: &Cluster) -> Dirs {
        Dirs {
            state: tempfile::tempdir().expect("a temporary directory"),
            output: tempfile::tempdir().expect("a temporary directory"),
            cluster: cluster.clone(),
        }
    }

    /// The job name prefix of this runtime named `runtime`.
    pub fn prefix(&self, runtime: &str) -> Option<String> {
        let instance = std::fs::read_to_string(self.state.path().join("slurm-instance")).ok()?;
        Some(format!("roster-{runtime}-{}-", instance.trim()))
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        let Ok(instance) = std::fs::read_to_string(self.state.path().join("slurm-instance")) else {
            return;
        };
        let Ok(out) = self
            .cluster
            .command("squeue")
            .args(["-h", "-o", "%i %j"])
            .output()
        else {
            return;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some((id, name)) = line.split_once(' ') {
                if name.contains(instance.trim()) {
                    let _ = self.cluster.command("scancel").arg(id).status();
                }
            }
        }
    }
}

/// A source named `test` on `dirs`, once the cluster has answered it.
pub async fn source(config: SlurmConfig, dirs: &Dirs) -> SlurmSource {
    let source =
        SlurmSource::with_runtime("test", config, dirs.state.path()).expect("the source builds");
    assert!(
        source.wait_ready(WAIT).await,
        "the source did not reach the cluster within {WAIT:?}: {:?}",
        source.health().await
    );
    source
}

/// A spawn of `script` through the profile `shell`, named `name`.
pub fn shell(script: &str, name: &str) -> SpawnRequest {
    SpawnRequest {
        profile: Some("shell".into()),
        args: vec![script.into()],
        name: Some(name.into()),
        ..Default::default()
    }
}

/// Polls `get` until `check` holds, for `within` at most.
pub async fn wait_for(
    source: &dyn RuntimeSource,
    key: &SourceKey,
    what: &str,
    within: Duration,
    check: impl Fn(&SourceWorker) -> bool,
) -> anyhow::Result<SourceWorker> {
    let key = key.clone();
    testkit::eventually_seen(what, within, || {
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

/// stdout and stderr a worker's output stream gives until it closes (or, with `until`,
/// until stdout holds that text), within [`WAIT`].
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
