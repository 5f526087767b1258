//! What the tests of the tmux source share: a private tmux server per test, killed at the
//! end (also on failure), and a source on it.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use source_tmux::{Profile, TmuxConfig, TmuxSource};

/// How long any condition may take to come true.
pub const WAIT: Duration = Duration::from_secs(20);

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Fails (never skips) when tmux is missing.
pub fn require_tmux() {
    let found = Command::new("tmux")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "these tests need tmux 3.3 or newer on PATH; install it (e.g. `apt-get install tmux`)"
    );
}

/// A private tmux server (by socket name) and a state directory for one test. Dropping it
/// kills that server, and only that one.
pub struct Server {
    pub socket: String,
    pub state: tempfile::TempDir,
}

impl Server {
    pub fn new() -> Server {
        require_tmux();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        Server {
            socket: format!("roster-test-{}-{n}", std::process::id()),
            state: tempfile::tempdir().expect("a temporary directory"),
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state.path().join("runtime")
    }

    /// Runs `tmux -L <socket> args…` and returns its output.
    pub fn tmux(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .args(["-f", "/dev/null", "-L", &self.socket])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("tmux runs")
    }

    /// The names of the server's sessions (none when no server runs).
    pub fn sessions(&self) -> Vec<String> {
        let out = self.tmux(&["list-sessions", "-F", "#{session_name}"]);
        if !out.status.success() {
            return Vec::new();
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The pids of the server's panes.
    pub fn pane_pids(&self) -> Vec<i32> {
        let out = self.tmux(&["list-panes", "-a", "-F", "#{pane_pid}"]);
        if !out.status.success() {
            return Vec::new();
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// A config on this server with a `shell` profile (`/bin/sh -c`).
    pub fn config(&self) -> TmuxConfig {
        TmuxConfig {
            socket_name: Some(self.socket.clone().into()),
            profiles: BTreeMap::from([(
                "shell".to_string(),
                Profile {
                    command: vec!["/bin/sh".into(), "-c".into()],
                    ..Default::default()
                },
            )]),
            ..Default::default()
        }
    }

    /// A source with [`config`](Self::config).
    pub fn source(&self) -> TmuxSource {
        self.source_with(self.config())
    }

    pub fn source_with(&self, config: TmuxConfig) -> TmuxSource {
        TmuxSource::new(config, self.state_dir()).expect("a tmux source")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.tmux(&["kill-server"]);
        // tmux leaves its socket file behind; a test leaves nothing.
        if let Ok(me) = std::fs::metadata("/proc/self") {
            use std::os::unix::fs::MetadataExt;
            let dir = std::env::var_os("TMUX_TMPDIR").unwrap_or_else(|| "/tmp".into());
            let socket = Path::new(&dir)
                .join(format!("tmux-{}", me.uid()))
                .join(&self.socket);
            let _ = std::fs::remove_file(socket);
        }
    }
}

/// Polls `cond` every 20 ms until it holds, for [`WAIT`] at most.
pub async fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    let what = format!("timed out waiting until {what}");
    if let Err(e) = testkit::eventually_sync(&what, WAIT, cond).await {
        panic!("{e}");
    }
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn process_exists(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next().map(str::to_string));
            state.as_deref() != Some("Z")
        }
        Err(_) => false,
    }
}
