//! Talking to the tmux server: one `tmux` client process per request.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

use crate::error::TmuxError;

/// How long one tmux command may take before it is given up (and its client killed).
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The oldest tmux this source works with: 3.3 has `#{pane_dead_signal}`.
pub(crate) const MIN_VERSION: (u32, u32) = (3, 3);

/// The variables of this process's environment a tmux client gets; every other one is left
/// out. A server started by such a client passes no more than these on to its workers, so
/// the secrets of this process (tokens in its environment) never reach a worker.
const PASSED_ENV: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMUX_TMPDIR"];

/// The format of one line of [`Tmux::panes`].
const PANE_FORMAT: &str = "#{session_name}\t#{pane_pid}\t#{pane_dead}\t#{pane_dead_status}\t\
                           #{pane_dead_signal}\t#{pid}";

/// A tmux server, by its socket name, and the program that talks to it.
#[derive(Clone)]
pub(crate) struct Tmux {
    program: PathBuf,
    socket: String,
}

/// One pane of the server, as `list-panes` tells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Pane {
    pub(crate) session: String,
    pub(crate) pid: i32,
    /// The pane's process has ended and everything it wrote went to the pane's pipe.
    pub(crate) dead: bool,
    /// The exit status, once dead and known.
    pub(crate) status: Option<i32>,
    /// A signal ended the process (tmux gives its number or its name).
    pub(crate) signaled: bool,
    /// The tmux server's pid.
    pub(crate) server: i32,
}

impl Pane {
    /// Whether the pane is dead and tmux knows how its process ended.
    pub(crate) fn ended(&self) -> bool {
        self.dead && (self.status.is_some() || self.signaled)
    }
}

/// A list of tmux commands for one client, separated as tmux wants.
#[derive(Clone, Default)]
pub(crate) struct Commands {
    args: Vec<OsString>,
}

impl Commands {
    /// Appends a command. Each part is passed through as it is: a part that ends in `;`
    /// (which tmux would take as a command separator) is escaped.
    pub(crate) fn then<I, S>(mut self, parts: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        if !self.args.is_empty() {
            self.args.push(";".into());
        }
        self.args
            .extend(parts.into_iter().map(|p| escape_separator(p.as_ref())));
        self
    }
}

/// One command.
pub(crate) fn command<I, S>(parts: I) -> Commands
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Commands::default().then(parts)
}

impl Tmux {
    pub(crate) fn new(program: PathBuf, socket: String) -> Self {
        Tmux { program, socket }
    }

    /// The program, for the workers' wrapper.
    pub(crate) fn program(&self) -> &Path {
        &self.program
    }

    /// The socket name, for the workers' wrapper.
    pub(crate) fn socket(&self) -> &str {
        &self.socket
    }

    /// A client of this server: no config file (the server is this source's, set up the
    /// same way whoever's machine it is), a small environment, killed when dropped.
    fn client(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.arg("-f")
            .arg("/dev/null")
            .arg("-L")
            .arg(&self.socket)
            .env_clear()
            .envs(passed_env())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// As [`client`](Self::client), blocking, for `Drop`.
    pub(crate) fn blocking_client(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(&self.program);
        cmd.arg("-f")
            .arg("/dev/null")
            .arg("-L")
            .arg(&self.socket)
            .env_clear()
            .envs(passed_env())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    }

    /// Runs `commands` and returns what they printed.
    pub(crate) async fn run(
        &self,
        what: &'static str,
        commands: Commands,
    ) -> Result<String, TmuxError> {
        self.run_with_input(what, commands, None).await
    }

    /// Runs `commands` with `input` on the client's stdin (for `load-buffer -`).
    pub(crate) async fn run_with_input(
        &self,
        what: &'static str,
        commands: Commands,
        input: Option<&[u8]>,
    ) -> Result<String, TmuxError> {
        let mut cmd = self.client();
        cmd.args(&commands.args);
        if input.is_some() {
            cmd.stdin(Stdio::piped());
        }
        let run = async {
            let mut child = cmd
                .spawn()
                .map_err(|error| TmuxError::Run { what, error })?;
            if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
                // A client that fails early closes its stdin; its status says why.
                let _ = stdin.write_all(data).await;
                drop(stdin);
            }
            child
                .wait_with_output()
                .await
                .map_err(|error| TmuxError::Run { what, error })
        };
        let output = tokio::time::timeout(COMMAND_TIMEOUT, run)
            .await
            .map_err(|_| TmuxError::Timeout { what })??;
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        if is_no_server(&stderr) {
            return Err(TmuxError::NoServer);
        }
        Err(TmuxError::Failed {
            what,
            status: output.status,
            stderr,
        })
    }

    /// Starts `wait-for channel`: the client ends once the channel is signalled.
    pub(crate) fn wait_for(&self, channel: &str) -> Result<Child, TmuxError> {
        let mut cmd = self.client();
        cmd.args(command(["wait-for", channel]).args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd.spawn().map_err(|error| TmuxError::Run {
            what: "wait-for",
            error,
        })
    }

    /// Every pane of the server; [`TmuxError::NoServer`] when no server runs.
    pub(crate) async fn panes(&self) -> Result<Vec<Pane>, TmuxError> {
        let out = self
            .run(
                "list-panes",
                command(["list-panes", "-a", "-F", PANE_FORMAT]),
            )
            .await?;
        out.lines()
            .filter(|l| !l.is_empty())
            .map(|line| {
                parse_pane(line).ok_or_else(|| TmuxError::Garbled {
                    what: "list-panes",
                    answer: line.to_string(),
                })
            })
            .collect()
    }

    /// The pane of session `name`, or `None` when the session is gone.
    pub(crate) async fn pane(&self, name: &str) -> Result<Option<Pane>, TmuxError> {
        let target = pane_target(name);
        match self
            .run(
                "display-message",
                command(["display-message", "-p", "-t", &target, PANE_FORMAT]),
            )
            .await
        {
            Ok(out) => Ok(parse_pane(out.trim_end_matches('\n'))),
            Err(TmuxError::NoServer) => Ok(None),
            Err(TmuxError::Failed { stderr, .. }) if is_missing_target(&stderr) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Kills session `name`; a session that is already gone is no error.
    pub(crate) async fn kill_session(&self, name: &str) -> Result<(), TmuxError> {
        match self
            .run(
                "kill-session",
                command(["kill-session", "-t", &session_target(name)]),
            )
            .await
        {
            Ok(_) | Err(TmuxError::NoServer) => Ok(()),
            Err(TmuxError::Failed { stderr, .. }) if is_missing_target(&stderr) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The tmux version, `(major, minor)`; `None` for a build that does not say (a
    /// development build), which is taken as new enough.
    pub(crate) fn blocking_version(&self) -> Result<Option<(u32, u32)>, TmuxError> {
        let out = std::process::Command::new(&self.program)
            .arg("-V")
            .env_clear()
            .envs(passed_env())
            .stdin(Stdio::null())
            .output()
            .map_err(|error| TmuxError::Run { what: "-V", error })?;
        if !out.status.success() {
            return Err(TmuxError::Failed {
                what: "-V",
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(parse_version(&String::from_utf8_lossy(&out.stdout)))
    }
}

fn passed_env() -> impl Iterator<Item = (&'static str, OsString)> {
    PASSED_ENV
        .iter()
        .filter_map(|k| std::env::var_os(k).map(|v| (*k, v)))
}

/// A session target that matches the name exactly (not as a prefix or pattern).
pub(crate) fn session_target(name: &str) -> String {
    format!("={name}")
}

/// The (only) pane of session `name`.
pub(crate) fn pane_target(name: &str) -> String {
    format!("={name}:")
}

/// Whether a client's error says the server is not running: its socket refuses
/// connections, or is not there. (Any other failure to connect, such as a full backlog on
/// a busy machine, is not taken for a stopped server.)
fn is_no_server(stderr: &str) -> bool {
    stderr.contains("no server running")
        || (stderr.contains("error connecting to") && stderr.contains("No such file or directory"))
}

/// Whether a client's error says the server went away while the client talked to it: a
/// server exits once its last session is gone, and a client that connects just then
/// loses it.
pub(crate) fn is_server_gone(stderr: &str) -> bool {
    stderr.contains("server exited unexpectedly") || stderr.contains("lost server")
}

/// Whether a client's error says the target does not exist.
fn is_missing_target(stderr: &str) -> bool {
    stderr.contains("can't find") || stderr.contains("no such")
}

fn parse_pane(line: &str) -> Option<Pane> {
    let mut f = line.split('\t');
    let session = f.next()?.to_string();
    let pid = f.next()?.parse().ok()?;
    let dead = f.next()? == "1";
    let status = f.next()?;
    let signal = f.next()?;
    let server = f.next()?.parse().ok()?;
    Some(Pane {
        session,
        pid,
        dead,
        status: status.parse().ok(),
        signaled: !signal.is_empty(),
        server,
    })
}

/// Reads `tmux 3.3a`, `tmux 3.4`, `tmux next-3.5` as `(3, 3)`, …; `None` for `tmux master`.
pub(crate) fn parse_version(text: &str) -> Option<(u32, u32)> {
    let word = text.split_whitespace().nth(1)?;
    let digits = word.trim_start_matches(|c: char| !c.is_ascii_digit());
    let mut parts = digits.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor: String = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some((major, minor.parse().ok()?))
}

/// A part of a tmux command line that tmux passes on unchanged: tmux takes a part ending in
/// `;` as a command separator unless it ends in `\;`, which it turns into `;`.
fn escape_separator(part: &OsStr) -> OsString {
    let bytes = part.as_bytes();
    match bytes.split_last() {
        Some((b';', head)) => {
            let mut out = head.to_vec();
            out.extend_from_slice(b"\\;");
            OsString::from_vec(out)
        }
        _ => part.to_os_string(),
    }
}

/// `text` quoted for `sh`: one word, taken literally.
pub(crate) fn sh_quote(text: &OsStr) -> OsString {
    let mut out = vec![b'\''];
    for &b in text.as_bytes() {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    OsString::from_vec(out)
}

/// `text` in a place where tmux expands formats (`#{…}`): every `#` doubled.
pub(crate) fn format_escape(text: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(text.len());
    for &b in text.as_bytes() {
        out.push(b);
        if b == b'#' {
            out.push(b'#');
        }
    }
    OsString::from_vec(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_ending_in_a_semicolon_are_escaped_and_separators_are_not() {
        let c = command(["a;", "b"]).then(["\\;", ";", "c"]);
        let got: Vec<&str> = c.args.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(got, ["a\\;", "b", ";", "\\\\;", "\\;", "c"]);
    }

    #[test]
    fn shell_quoting_keeps_every_byte() {
        assert_eq!(sh_quote(OsStr::new("a b")), "'a b'");
        assert_eq!(sh_quote(OsStr::new("it's")), "'it'\\''s'");
        assert_eq!(sh_quote(OsStr::new("")), "''");
        assert_eq!(format_escape(OsStr::new("/a#b/#{x}")), "/a##b/##{x}");
    }

    #[test]
    fn versions_read_from_tmux_dash_v() {
        assert_eq!(parse_version("tmux 3.3a\n"), Some((3, 3)));
        assert_eq!(parse_version("tmux 3.4"), Some((3, 4)));
        assert_eq!(parse_version("tmux next-3.5"), Some((3, 5)));
        assert_eq!(parse_version("tmux 2.9a"), Some((2, 9)));
        assert_eq!(parse_version("tmux master"), None);
        assert!(Some((3, 2)) < Some(MIN_VERSION) && Some((3, 3)) >= Some(MIN_VERSION));
    }

    #[test]
    fn pane_lines_parse() {
        let p = parse_pane("s1\t42\t1\t3\t\t7").unwrap();
        assert_eq!(
            (p.pid, p.dead, p.status, p.signaled),
            (42, true, Some(3), false)
        );
        assert!(p.ended());
        assert_eq!(p.server, 7);
        let p = parse_pane("s1\t42\t1\t\tkill\t7").unwrap();
        assert!(p.signaled && p.ended());
        let p = parse_pane("s1\t42\t1\t\t\t7").unwrap();
        assert!(!p.ended(), "dead, but the status is not known yet");
        let p = parse_pane("s1\t42\t0\t\t\t7").unwrap();
        assert!(!p.dead && !p.ended());
        assert!(parse_pane("garbage").is_none());
    }
}
