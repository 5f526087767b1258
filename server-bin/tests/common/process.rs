//! The real `roster` binary as a child process: started with its stdout and stderr captured,
//! waited on until it serves, signalled, and killed and reaped when dropped; and the processes
//! in `/proc`, to find what a test's workers left behind.
//!
//! Every wait here polls with sleeps: an async test calls it through
//! `tokio::task::block_in_place`.

use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};

/// How long the harness waits for the process to serve, or to end and close its pipes.
pub const PROCESS_WAIT: Duration = Duration::from_secs(20);
/// The pause between two looks at a polled condition.
pub const POLL: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------------------------
// The roster process

/// Everything a pipe of the child has written so far, read by a thread of its own.
pub struct Captured {
    bytes: Arc<Mutex<Vec<u8>>>,
    done: Arc<AtomicBool>,
}

impl Captured {
    fn new(mut from: impl Read + Send + 'static) -> Captured {
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(AtomicBool::new(false));
        let (b, d) = (bytes.clone(), done.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => b
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend_from_slice(&buf[..n]),
                }
            }
            d.store(true, Ordering::Release);
        });
        Captured { bytes, done }
    }

    /// The bytes read so far.
    pub fn bytes(&self) -> Vec<u8> {
        self.bytes.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The bytes read so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }

    /// Whether the pipe has been read to its end.
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }
}

/// A `roster` process this test started. Dropping it SIGKILLs and reaps the process if it
/// still runs, so a failing test leaves nothing behind (its workers die with it: SPEC §2).
pub struct Roster {
    child: Child,
    pub stdout: Captured,
    pub stderr: Captured,
}

impl Drop for Roster {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Roster {
    /// Starts `roster args…` with `env` added (`RUST_LOG` is `info` unless given); stdin is
    /// empty, stdout and stderr are captured.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Result<Roster> {
        Roster::spawn_in(None, args, env)
    }

    /// [`Roster::spawn`] in the working directory `cwd`.
    pub fn spawn_in(cwd: Option<&Path>, args: &[&str], env: &[(&str, &str)]) -> Result<Roster> {
        // `option_env!`, so that tests of other packages can share this harness and start
        // their own binary with `spawn_program`.
        let program = option_env!("CARGO_BIN_EXE_roster")
            .context("this test package has no `roster` binary; use Roster::spawn_program")?;
        Roster::spawn_program(Path::new(program), cwd, args, env)
    }

    /// Starts `program args…` (a `roster` built with other kinds, say) as [`Roster::spawn_in`].
    pub fn spawn_program(
        program: &Path,
        cwd: Option<&Path>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Roster> {
        let mut cmd = Command::new(program);
        if let Some(cwd) = cwd {
            cmd.current_dir(cwd);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if !env.iter().any(|(k, _)| *k == "RUST_LOG") {
            cmd.env("RUST_LOG", "info");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let stdout = Captured::new(child.stdout.take().context("stdout")?);
        let stderr = Captured::new(child.stderr.take().context("stderr")?);
        Ok(Roster {
            child,
            stdout,
            stderr,
        })
    }

    /// `roster serve --listen 127.0.0.1:0 --state-dir <state> extra…`, once it serves; returns
    /// it and its address.
    pub fn serve(
        state: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<(Roster, SocketAddr)> {
        let state = state.to_str().context("a UTF-8 state path")?;
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--state-dir", state];
        args.extend_from_slice(extra);
        Roster::serving(&args, env)
    }

    /// `roster serve --config <config> --state-dir <state>` (it listens where the config
    /// says), once it serves; returns it and its address.
    pub fn serve_config(
        config: &Path,
        state: &Path,
        env: &[(&str, &str)],
    ) -> Result<(Roster, SocketAddr)> {
        let config = config.to_str().context("a UTF-8 config path")?;
        let state = state.to_str().context("a UTF-8 state path")?;
        Roster::serving(&["serve", "--config", config, "--state-dir", state], env)
    }

    /// Starts `roster args…` and waits until it serves.
    fn serving(args: &[&str], env: &[(&str, &str)]) -> Result<(Roster, SocketAddr)> {
        let mut roster = Roster::spawn(args, env)?;
        let addr = roster.wait_serving()?;
        Ok((roster, addr))
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("a pid fits in i32")
    }

    /// Sends `signal` to the process, which must not have been reaped yet (so the pid is
    /// still this process's).
    pub fn signal(&mut self, signal: i32) -> Result<()> {
        ensure!(
            self.child.try_wait()?.is_none(),
            "roster already exited; stderr:\n{}",
            self.stderr.text()
        );
        // SAFETY: kill(2) with a pid of our own unreaped child; no memory is involved.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        ensure!(rc == 0, "kill: {}", std::io::Error::last_os_error());
        Ok(())
    }

    /// SIGTERM (a graceful stop), then the exit status once the process and its output have
    /// ended.
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM)?;
        self.wait_exit_and_output(PROCESS_WAIT)
    }

    /// SIGKILL, then the exit status once the process and its output have ended.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.child.kill()?;
        self.wait_exit_and_output(PROCESS_WAIT)
    }

    /// Waits for the process to end.
    pub fn wait_exit(&mut self, within: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "roster did not exit within {within:?}; stderr:\n{}",
                    self.stderr.text()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits for the process to end and then for its pipes to be read to their end: the
    /// last log lines are written just before the exit and may still be in the pipe when
    /// the exit is seen.
    pub fn wait_exit_and_output(&mut self, within: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + within;
        let status = self.wait_exit(within)?;
        while !(self.stdout.is_done() && self.stderr.is_done()) {
            ensure!(Instant::now() < deadline, "roster's pipes stayed open");
            std::thread::sleep(POLL);
        }
        Ok(status)
    }

    /// Waits for the process to end and for its pipes to be read to their end; returns the
    /// status, stdout and stderr.
    pub fn finish(mut self, within: Duration) -> Result<(ExitStatus, String, String)> {
        let status = self.wait_exit_and_output(within)?;
        Ok((status, self.stdout.text(), self.stderr.text()))
    }

    /// The address in the `roster is serving listen=…` log line, once it is there; a
    /// wildcard address becomes loopback with the same port.
    pub fn wait_serving(&mut self) -> Result<SocketAddr> {
        let deadline = Instant::now() + PROCESS_WAIT;
        loop {
            if let Some(addr) = serving_addr(&self.stderr.text()) {
                return Ok(addr);
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "roster exited ({status}) before serving; stderr:\n{}",
                    self.stderr.text()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "roster did not serve in time; stderr:\n{}",
                    self.stderr.text()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout.text(), self.stderr.text())
    }
}

/// The listen address of the serving line, in text (`listen=ADDR`) or JSON
/// (`"listen":"ADDR"`) format.
pub fn serving_addr(log: &str) -> Option<SocketAddr> {
    let line = log.lines().find(|l| l.contains("roster is serving"))?;
    let text = if let Some((_, rest)) = line.split_once("listen=") {
        rest.split_whitespace().next()?
    } else {
        let (_, rest) = line.split_once("\"listen\":\"")?;
        rest.split('"').next()?
    };
    let mut addr: SocketAddr = text.parse().ok()?;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Some(addr)
}

// ---------------------------------------------------------------------------------------------
// Processes in /proc

/// One process: its pid and start time name it across pid reuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub pid: i32,
    pub ppid: i32,
    pub start: u64,
    pub zombie: bool,
    pub cmdline: String,
}

/// Every process now, zombies included.
pub fn processes() -> Vec<Process> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| {
        let pid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        read_process(pid)
    })
    .collect()
}

/// The process `pid`, if there is one.
pub fn read_process(pid: i32) -> Option<Process> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything: fields start after the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    Some(Process {
        pid,
        zombie: *fields.first()? == "Z",
        ppid: fields.get(1)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
        cmdline: String::from_utf8_lossy(&cmdline).replace('\0', " "),
    })
}

/// Live (not zombie) processes whose command line holds `marker`.
pub fn with_marker(marker: &str) -> Vec<Process> {
    processes()
        .into_iter()
        .filter(|p| !p.zombie && p.cmdline.contains(marker))
        .collect()
}

/// Every live descendant of `root`.
pub fn descendants(root: i32) -> Vec<Process> {
    let all = processes();
    let mut found: Vec<Process> = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for p in all.iter().filter(|p| p.ppid == parent && !p.zombie) {
            if !found.iter().any(|f| f.pid == p.pid) {
                frontier.push(p.pid);
                found.push(p.clone());
            }
        }
    }
    found
}

/// Those of `procs` that still run (same pid and start time, not a zombie).
pub fn still_running(procs: &[Process]) -> Vec<Process> {
    procs
        .iter()
        .filter_map(|p| read_process(p.pid).filter(|now| now.start == p.start && !now.zombie))
        .collect()
}

/// Polls until none of `procs` and no process with `marker` runs.
pub fn wait_all_gone(procs: &[Process], marker: &str, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let mut left = still_running(procs);
        for p in with_marker(marker) {
            if !left.iter().any(|l| l.pid == p.pid) {
                left.push(p);
            }
        }
        if left.is_empty() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "processes left behind after {within:?}: {left:#?}"
        );
        std::thread::sleep(POLL);
    }
}
