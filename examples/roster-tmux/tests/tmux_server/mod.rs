//! A private tmux server for one test: named uniquely, killed when the test ends (also when
//! it fails), its socket file removed.
#![allow(dead_code)]

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The tmux server `tmux -L <name>`.
pub struct TmuxServer(pub String);

impl TmuxServer {
    /// The sessions on this tmux server (none when the server is not running).
    pub fn sessions(&self) -> Vec<String> {
        let out = Command::new("tmux")
            .args(["-L", &self.0, "list-sessions", "-F", "#{session_name}"])
            .stderr(Stdio::null())
            .output()
            .expect("tmux runs (install it: apt-get install tmux)");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Where tmux keeps the server's socket file.
    fn socket_file(&self) -> Option<PathBuf> {
        let uid = std::fs::metadata("/proc/self").ok()?.uid();
        let dir = std::env::var_os("TMUX_TMPDIR").unwrap_or_else(|| "/tmp".into());
        Some(PathBuf::from(dir).join(format!("tmux-{uid}")).join(&self.0))
    }
}

impl Drop for TmuxServer {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.0, "kill-server"])
            .stderr(Stdio::null())
            .status();
        // tmux leaves its socket file behind; a test leaves nothing.
        if let Some(socket) = self.socket_file() {
            let _ = std::fs::remove_file(socket);
        }
    }
}
