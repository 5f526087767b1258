//! `legacy-launcher`: starts a command the way an older launcher did, for Roster's `local`
//! source to find.
//!
//! ```text
//! legacy-launcher --spool DIR [--name NAME] [--log FILE] [--socket PATH] [--no-socket] -- CMD ARGS…
//! ```
//!
//! It starts `CMD` as a child in a process group of its own, with stdin from a pipe and
//! stdout and stderr appended to the log file (default `DIR/<id>.log`). Bytes received on a
//! Unix socket (default `DIR/<id>.sock`; any number of connections over time) go to the
//! child's stdin. Then it writes the descriptor `DIR/<id>.json` atomically (a temporary file
//! renamed into place) with the child's pid and start time, prints the descriptor's path on
//! stdout, and waits for the child. When the child ends it removes the socket, leaves the
//! descriptor and the log (as the old launchers did), and exits with the child's code (128 +
//! the signal's number for a child killed by a signal).

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Starts a command the way an older launcher did: a descriptor in a spool directory, output
/// to a log file, input from a Unix socket.
#[derive(Debug, Parser)]
#[command(name = "legacy-launcher", version)]
struct Args {
    /// The spool directory the descriptor goes to (created if missing).
    #[arg(long, value_name = "DIR")]
    spool: PathBuf,
    /// A name for the worker.
    #[arg(long)]
    name: Option<String>,
    /// The log file (default `DIR/<id>.log`); output is appended.
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
    /// The input socket (default `DIR/<id>.sock`).
    #[arg(long, value_name = "PATH", conflicts_with = "no_socket")]
    socket: Option<PathBuf>,
    /// No input socket: the worker takes no input (its stdin is closed).
    #[arg(long)]
    no_socket: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("legacy-launcher: {e:#}");
            ExitCode::from(127)
        }
    }
}

fn run(args: Args) -> Result<u8> {
    fs::create_dir_all(&args.spool).context("creating the spool directory")?;
    let id = new_id();
    let log_path = args
        .log
        .clone()
        .unwrap_or_else(|| args.spool.join(format!("{id}.log")));
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening the log {}", log_path.display()))?;

    let socket_path = (!args.no_socket).then(|| {
        args.socket
            .clone()
            .unwrap_or_else(|| args.spool.join(format!("{id}.sock")))
    });
    let listener = match &socket_path {
        Some(path) => Some(
            UnixListener::bind(path)
                .with_context(|| format!("binding the socket {}", path.display()))?,
        ),
        None => None,
    };

    let (program, rest) = args.command.split_first().context("no command given")?;
    let mut child = Command::new(program)
        .args(rest)
        .stdin(if listener.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", program.to_string_lossy()))?;
    let pid = child.id();

    // From here on the child runs: whatever fails, it is waited for.
    let outcome = describe(&args, &id, pid, &log_path, socket_path.as_deref());
    if let (Some(listener), Some(stdin)) = (listener, child.stdin.take()) {
        let stdin = Arc::new(Mutex::new(Some(stdin)));
        std::thread::spawn(move || serve_input(listener, stdin));
    }
    match &outcome {
        Ok(descriptor) => {
            let mut out = io::stdout().lock();
            writeln!(out, "{}", descriptor.display())?;
            out.flush()?;
        }
        Err(e) => eprintln!("legacy-launcher: writing the descriptor: {e:#}"),
    }
    let status = child.wait().context("waiting for the child")?;
    if let Some(path) = &socket_path {
        let _ = fs::remove_file(path);
    }
    outcome?;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => 128u8.wrapping_add(sig as u8),
        (None, None) => 1,
    })
}

/// A fresh id: this launcher's pid and the time, unique in the spool directory.
fn new_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("w{}-{nanos:x}", std::process::id())
}

/// Writes the descriptor atomically and returns its path.
fn describe(args: &Args, id: &str, pid: u32, log: &Path, socket: Option<&Path>) -> Result<PathBuf> {
    let started = start_time(pid).context("reading the child's start time")?;
    let started_at = OffsetDateTime::from_unix_timestamp(started)?.format(&Rfc3339)?;
    let text = |p: &Path| -> Result<String> {
        let abs = std::path::absolute(p)?;
        match abs.to_str() {
            Some(s) => Ok(s.to_string()),
            None => bail!("a path that is not UTF-8 can't go into the descriptor"),
        }
    };
    let mut descriptor = serde_json::json!({
        "pid": pid,
        "started_at": started_at,
        "log": text(log)?,
        "launcher": "legacy-launcher",
    });
    if let Some(name) = &args.name {
        descriptor["name"] = name.clone().into();
    }
    if let Some(socket) = socket {
        descriptor["socket"] = text(socket)?.into();
    }
    let tmp = args.spool.join(format!("{id}.tmp"));
    let path = args.spool.join(format!("{id}.json"));
    let mut file = File::create(&tmp)?;
    file.write_all(serde_json::to_string_pretty(&descriptor)?.as_bytes())?;
    file.sync_all()?;
    fs::rename(&tmp, &path)?;
    Ok(path)
}

/// The start time of process `pid` in whole seconds since the epoch: field 22 of
/// `/proc/<pid>/stat` (clock ticks since boot) plus `btime` of `/proc/stat`.
fn start_time(pid: u32) -> Result<i64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces and parentheses: count from after the last `)`.
    let rest = &stat[stat.rfind(')').context("a stat line without `)`")? + 1..];
    let ticks: u64 = rest
        .split_ascii_whitespace()
        .nth(19)
        .context("a stat line without field 22")?
        .parse()?;
    let btime: i64 = fs::read_to_string("/proc/stat")?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .context("no btime")?
        .trim()
        .parse()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Ok(btime + (ticks / hz) as i64)
}

/// Forwards what every connection to the socket sends to the child's stdin, one
/// connection per thread, one read at a time under the lock (so a connection that stays
/// open holds back no other).
fn serve_input(listener: UnixListener, stdin: Arc<Mutex<Option<ChildStdin>>>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let stdin = Arc::clone(&stdin);
        std::thread::spawn(move || forward(conn, stdin));
    }
}

fn forward(mut conn: UnixStream, stdin: Arc<Mutex<Option<ChildStdin>>>) {
    let mut buf = [0u8; 8192];
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut guard = stdin.lock().unwrap_or_else(|e| e.into_inner());
        let Some(pipe) = guard.as_mut() else { return };
        if pipe
            .write_all(&buf[..n])
            .and_then(|()| pipe.flush())
            .is_err()
        {
            // The child closed its stdin: nothing more goes through.
            *guard = None;
            return;
        }
    }
}
