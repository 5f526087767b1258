//! A worker's life: setting its session up, watching it, feeding it, stopping and ending it.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use registry_core::output_log::{OutputLog, MAX_CHUNK};
use registry_core::{
    HealthStatus, RegistryError, SourceHealth, SourceWorker, SpawnRequest, StreamKind, WorkerState,
};
use time::OffsetDateTime;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{is_env_name, TmuxConfig, MAX_GRACE};
use crate::error::TmuxError;
use crate::marker::EndMark;
use crate::names::Owner;
use crate::source::{Ending, Inner, InputItem, Phase, Record};
use crate::sys::{self, FifoPeek, Proc};
use crate::tmux::{
    command, format_escape, is_server_gone, pane_target, sh_quote, Commands, Pane, Tmux,
};

/// How often the monitor asks tmux about the panes while any worker is watched: one
/// `tmux list-panes` process per tick for all workers, none while no worker runs. (A
/// worker's normal end comes at once, with its wrapper's end mark; the monitor finds the
/// rest: sessions killed from outside, wrappers killed.)
pub(crate) const POLL: Duration = Duration::from_millis(250);

/// How long a new session may take to be ready (its wrapper waiting at the gate, the
/// output pipe open) before the spawn counts as failed.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How often making a session is tried when the server exits under the client.
const NEW_SESSION_ATTEMPTS: u32 = 5;

/// How long a worker's output may take to reach its end once its session is closed. Only
/// a stuck tmux could make it longer; the output is then cut off there.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long after a stop's SIGKILL the worker may take to end before its session is
/// killed and it counts as stopped anyway.
const KILL_FALLBACK: Duration = Duration::from_secs(5);

/// How long the pane of a worker whose wrapper has exited may stay open without output
/// before the worker ends anyway.
const LINGER: Duration = Duration::from_secs(2);

/// Workers whose wrapper has exited while their pane lives on: since when (or since the
/// last output), and the last output seq seen.
type Lingering = std::collections::HashMap<u64, (Instant, u64)>;

/// How many looks at the panes in a row must fail before the health is `degraded` (one
/// can fail as the server exits with its last session).
const FAILURES_TO_DEGRADE: u32 = 3;

/// How long the idle monitor sleeps at most (it wakes on every new worker anyway).
const IDLE_CHECK: Duration = Duration::from_secs(60);

/// PATH to look a program up in when neither the worker's environment nor this process
/// has one.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// How long a wrapper waits after its command has ended for the source to close the
/// session, before it ends by itself.
const WRAPPER_WAIT: Duration = Duration::from_secs(60);

/// The width and height of a worker's pane.
const PANE_SIZE: (&str, &str) = ("200", "50");

/// What a spawn request asks to run, checked against the config.
#[derive(Clone)]
pub(crate) struct Plan {
    argv: Vec<String>,
    /// The profile's environment, then the request's.
    env: BTreeMap<String, String>,
    cwd: Option<PathBuf>,
    pub(crate) retention: u64,
    pub(crate) grace: Duration,
}

impl Plan {
    /// What `request` runs: an unknown profile is `invalid_request`, a command where the
    /// config allows none `forbidden`, an environment name a shell cannot export
    /// `invalid_request`.
    pub(crate) fn new(config: &TmuxConfig, request: &SpawnRequest) -> Result<Plan, RegistryError> {
        let invalid = |m: String| RegistryError::InvalidRequest(m);
        let (mut argv, profile) = match (&request.profile, &request.command) {
            (Some(name), None) => {
                let profile = config.profiles.get(name).ok_or_else(|| {
                    let known: Vec<&str> = config.profiles.keys().map(String::as_str).collect();
                    invalid(format!(
                        "unknown profile {:?}; this runtime has: {}",
                        name.chars().take(64).collect::<String>(),
                        if known.is_empty() {
                            "no profiles".to_string()
                        } else {
                            known.join(", ")
                        }
                    ))
                })?;
                (profile.command.clone(), Some(profile))
            }
            (None, Some(command)) => {
                if !config.allow_commands {
                    return Err(RegistryError::Forbidden(
                        "this runtime only runs profiles, not commands".into(),
                    ));
                }
                (command.clone(), None)
            }
            _ => return Err(invalid("give either a profile or a command".into())),
        };
        argv.extend(request.args.iter().cloned());
        if !matches!(argv.first(), Some(p) if !p.is_empty()) {
            return Err(invalid("the command is empty".into()));
        }
        for key in request.env.keys() {
            if !is_env_name(key) {
                return Err(invalid(format!(
                    "`env`: {:?} is not an environment name a tmux worker can get (letters, \
                     digits and '_', not starting with a digit)",
                    key.chars().take(64).collect::<String>()
                )));
            }
        }
        let mut env = profile.map(|p| p.env.0.clone()).unwrap_or_default();
        env.extend(request.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(Plan {
            argv,
            env,
            cwd: profile.and_then(|p| p.cwd.as_ref().map(|c| c.0.clone())),
            retention: profile
                .and_then(|p| p.output_retention)
                .unwrap_or(config.output_retention),
            grace: profile
                .and_then(|p| p.grace)
                .unwrap_or(config.grace)
                .min(MAX_GRACE),
        })
    }

    /// Whether the program can run: its working directory exists and the program is an
    /// executable file (looked up on the worker's PATH). The reason is for the log.
    fn check_runnable(&self) -> Result<(), String> {
        let cwd = match &self.cwd {
            Some(dir) => dir.clone(),
            None => std::env::current_dir().map_err(|e| format!("no working directory: {e}"))?,
        };
        if !cwd.is_dir() {
            return Err("the working directory is not a directory".into());
        }
        let program = &self.argv[0];
        let found = if program.contains('/') {
            sys::is_executable(&cwd.join(program))
        } else {
            let path = self
                .env
                .get("PATH")
                .map(OsString::from)
                .or_else(|| std::env::var_os("PATH"))
                .unwrap_or_else(|| DEFAULT_PATH.into());
            std::env::split_paths(&path).any(|dir| sys::is_executable(&cwd.join(dir).join(program)))
        };
        if found {
            Ok(())
        } else {
            Err(format!("the program {program:?} is not an executable file"))
        }
    }
}

/// A session set up and waiting at its gate.
struct Launched {
    /// The nonce of the session's end mark.
    nonce: String,
    /// The read end of the session's output FIFO (its path already unlinked).
    fifo: File,
    /// Output that came before the gate opened (none, in practice).
    early: Option<Vec<u8>>,
}

impl Inner {
    fn fifo_path(&self, session: &str) -> PathBuf {
        self.state_dir.join(format!("{session}.out"))
    }

    fn env_path(&self, session: &str) -> PathBuf {
        self.state_dir.join(format!("{session}.env"))
    }

    /// The spawn's work, in a task of its own: sets the session up, opens its gate, and
    /// returns the worker (`running`, or `failed` with `spawn_failed`, or `stopped` when a
    /// stop came first).
    pub(crate) async fn start(
        self: Arc<Self>,
        id: u64,
        plan: Plan,
    ) -> Result<SourceWorker, RegistryError> {
        let session = self.owner.session(id);
        if let Err(reason) = plan.check_runnable() {
            tracing::info!(worker = id, %reason, "worker could not be started");
            return self.ended(id, Ending::SpawnFailed);
        }
        let launched = self.launch(id, &session, &plan).await;
        // The FIFO is open (or failed) and the wrapper has read its environment by now.
        let _ = std::fs::remove_file(self.fifo_path(&session));
        let _ = std::fs::remove_file(self.env_path(&session));
        let launched = match launched {
            Ok(launched) => launched,
            Err(error) => {
                tracing::warn!(worker = id, %error, "the worker's tmux session could not be set up");
                self.abandon(id, &session).await;
                return self.ended(id, Ending::SpawnFailed);
            }
        };
        self.open_gate(id, &session, launched).await
    }

    /// Makes the session: the wrapper (raw tty, environment, gate) running the command,
    /// `remain-on-exit`, and the pane's output piped into a FIFO this source reads. Returns
    /// once the wrapper waits at the gate and the pipe is open.
    async fn launch(&self, id: u64, session: &str, plan: &Plan) -> Result<Launched, TmuxError> {
        let io = |what: &'static str| move |error| TmuxError::Io { what, error };
        sys::create_private_dir(&self.state_dir).map_err(io("creating the state directory"))?;
        let fifo_path = self.fifo_path(session);
        let _ = std::fs::remove_file(&fifo_path);
        sys::mkfifo(&fifo_path).map_err(io("making the output FIFO"))?;
        let fifo = sys::open_fifo_reader(&fifo_path).map_err(io("opening the output FIFO"))?;
        let env_path = if plan.env.is_empty() {
            None
        } else {
            let path = self.env_path(session);
            write_env_file(&path, &plan.env).map_err(io("writing the environment file"))?;
            Some(path)
        };

        let target = pane_target(session);
        let mut new: Vec<OsString> = [
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            PANE_SIZE.0,
            "-y",
            PANE_SIZE.1,
            "-P",
            "-F",
            "#{pane_pid}",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        if let Some(cwd) = &plan.cwd {
            new.push("-c".into());
            new.push(format_escape(cwd.as_os_str()));
        }
        new.extend(["--", "/bin/sh", "-c"].map(OsString::from));
        let nonce = sys::random_hex(16);
        new.push(wrapper(&self.tmux, session, env_path.as_deref(), &nonce));
        new.push("roster-worker".into());
        new.extend(plan.argv.iter().map(OsString::from));
        let mut pipe = OsString::from("exec cat > ");
        pipe.push(sh_quote(fifo_path.as_os_str()));
        let commands = command(new)
            .then(["set-option", "-t", &target, "remain-on-exit", "on"])
            .then([
                OsStr::new("pipe-pane"),
                OsStr::new("-O"),
                OsStr::new("-t"),
                OsStr::new(&target),
                &format_escape(&pipe),
            ]);
        let out = self.new_session(session, commands).await?;
        let pid: i32 = out
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| TmuxError::Garbled {
                what: "new-session",
                answer: out.clone(),
            })?;
        let pane = Proc::now(pid);
        if let Some(record) = self.lock().workers.get_mut(&id) {
            record.pane = Some(pane);
        }
        self.await_ready(session).await?;
        let early = await_writer(&fifo).await?;
        Ok(Launched { nonce, fifo, early })
    }

    /// Runs the commands that make a session. When the last session on the server has just
    /// ended, the server is exiting, and a client that comes then fails with "server exited
    /// unexpectedly" (found by experiment): it is tried again, and a new server starts. The
    /// commands did not run (a server with the new session would not have exited).
    async fn new_session(&self, session: &str, commands: Commands) -> Result<String, TmuxError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.tmux.run("new-session", commands.clone()).await {
                Err(TmuxError::Failed { stderr, .. })
                    if attempt < NEW_SESSION_ATTEMPTS && is_server_gone(&stderr) =>
                {
                    tracing::debug!(
                        attempt,
                        "the tmux server exited as a session was made; again"
                    );
                    let _ = self.tmux.kill_session(session).await;
                    tokio::time::sleep(Duration::from_millis(20) * attempt).await;
                }
                other => return other,
            }
        }
    }

    /// Waits until the wrapper says the tty is raw and its environment read (it signals
    /// `<session>-r` and waits at the gate). Fails when the pane dies first, or after
    /// [`READY_TIMEOUT`].
    async fn await_ready(&self, session: &str) -> Result<(), TmuxError> {
        let mut waiter = self.tmux.wait_for(&format!("{session}-r"))?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let waited = tokio::select! {
                status = waiter.wait() => Some(status),
                () = tokio::time::sleep(POLL) => None,
            };
            // A waiter returns also when the server exits: the pane must be there and live.
            let alive = matches!(
                self.tmux.pane(session).await?,
                Some(Pane { dead: false, .. })
            );
            if !alive {
                return Err(TmuxError::Setup("the wrapper ended before the gate"));
            }
            match waited {
                Some(Ok(status)) if status.success() => return Ok(()),
                Some(Ok(status)) => {
                    return Err(TmuxError::Failed {
                        what: "wait-for",
                        status,
                        stderr: String::new(),
                    })
                }
                Some(Err(error)) => {
                    return Err(TmuxError::Run {
                        what: "wait-for",
                        error,
                    })
                }
                None if Instant::now() >= deadline => {
                    return Err(TmuxError::Timeout {
                        what: "wait-for (the wrapper's ready signal)",
                    })
                }
                None => {}
            }
        }
    }

    /// Starts reading the output, opens the gate (the subshell `exec`s the command), and
    /// marks the worker running; or, when a stop came first, ends it unrun.
    async fn open_gate(
        &self,
        id: u64,
        session: &str,
        launched: Launched,
    ) -> Result<SourceWorker, RegistryError> {
        let Some(log) = self.lock().workers.get(&id).map(|r| Arc::clone(&r.log)) else {
            return Err(RegistryError::internal("the worker record vanished"));
        };
        let receiver = match pipe::Receiver::from_file(launched.fifo) {
            Ok(receiver) => receiver,
            Err(error) => {
                tracing::warn!(worker = id, %error, "the worker's output FIFO could not be read");
                self.abandon(id, session).await;
                return self.ended(id, Ending::SpawnFailed);
            }
        };
        let reader = tokio::spawn(read_output(
            self.me.clone(),
            id,
            receiver,
            log,
            EndMark::new(&launched.nonce),
            launched.early,
        ));
        // Stopped while it was set up, or the source is going away: it never runs.
        let unwanted = {
            let t = self.lock();
            t.closed || t.workers.get(&id).is_some_and(|r| r.stop_requested)
        };
        if unwanted {
            self.abandon(id, session).await;
            drain(id, Some(reader)).await;
            return self.ended(id, Ending::Forced);
        }
        if let Err(error) = self
            .tmux
            .run(
                "wait-for",
                command(["wait-for", "-S", &format!("{session}-g")]),
            )
            .await
        {
            tracing::warn!(worker = id, %error, "the worker's gate could not be opened");
            self.abandon(id, session).await;
            drain(id, Some(reader)).await;
            return self.ended(id, Ending::SpawnFailed);
        }
        let info = {
            let mut t = self.lock();
            let Some(record) = t.workers.get_mut(&id) else {
                return Err(RegistryError::internal("the worker record vanished"));
            };
            record.info.state = WorkerState::Running;
            record.info.started_at = Some(OffsetDateTime::now_utc());
            record.phase = Phase::Watched;
            record.reader = Some(reader);
            if let Some(rx) = record.input_rx.take() {
                tokio::spawn(write_input(self.tmux.clone(), session.to_string(), rx));
            }
            let stop = record
                .stop_requested
                .then(|| record.pending_grace.unwrap_or(record.grace));
            let seen_end = record.seen_end;
            self.upsert(&mut t, id);
            if let (Some(grace), None) = (stop, seen_end) {
                self.begin_stop(&mut t, id, grace);
            }
            (t.workers.get(&id).map(|r| r.info.clone()), seen_end)
        };
        let (info, seen_end) = info;
        // A command that ended at once may have printed its end before it was watched.
        if let Some(how) = seen_end {
            self.begin_end(id, how);
        }
        self.wake.notify_one();
        info.ok_or_else(|| RegistryError::internal("the worker record vanished"))
    }

    /// Gets rid of a session that will not run: its process group killed, the session
    /// closed.
    async fn abandon(&self, id: u64, session: &str) {
        let pane = self.lock().workers.get(&id).and_then(|r| r.pane);
        if let Some(pane) = pane {
            pane.signal_group(libc::SIGKILL);
        }
        if let Err(error) = self.tmux.kill_session(session).await {
            tracing::warn!(worker = id, %error, "a session that will not run could not be closed");
        }
    }

    /// Makes worker `id` terminal and returns it.
    fn ended(&self, id: u64, how: Ending) -> Result<SourceWorker, RegistryError> {
        let mut t = self.lock();
        self.end(&mut t, id, how)
            .ok_or_else(|| RegistryError::internal("the worker record vanished"))
    }

    /// The wrapper says the command has ended, after all its output: the worker ends (or,
    /// when it is not watched yet, once it is).
    fn command_ended(&self, id: u64, how: Ending) {
        let watched = {
            let mut t = self.lock();
            let Some(record) = t.workers.get_mut(&id) else {
                return;
            };
            record.seen_end.get_or_insert(how);
            record.phase == Phase::Watched
        };
        if watched {
            self.begin_end(id, how);
        }
    }

    /// Hands a watched worker to a task that ends it (once: a worker no longer watched is
    /// left alone).
    pub(crate) fn begin_end(&self, id: u64, how: Ending) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        let mut t = self.lock();
        let Some(record) = t.workers.get_mut(&id) else {
            return;
        };
        if record.phase != Phase::Watched {
            return;
        }
        record.phase = Phase::Ending;
        let reader = record.reader.take();
        let session = record.session.clone();
        let pane = record.pane;
        drop(t);
        tokio::spawn(async move { me.finish(id, how, session, pane, reader).await });
    }

    /// Ends a worker: what is left of its process group killed, its session closed (which
    /// closes the output pipe), its output drained to the end, then its terminal state.
    async fn finish(
        &self,
        id: u64,
        how: Ending,
        session: String,
        pane: Option<Proc>,
        reader: Option<JoinHandle<()>>,
    ) {
        // A worker is its process group: once its process is gone, so is the rest. (tmux
        // reaped the process; the group is signalled only while its pid names no other
        // process.)
        if let Some(pane) = pane {
            pane.signal_group(libc::SIGKILL);
        }
        if how != Ending::Vanished {
            if let Err(error) = self.tmux.kill_session(&session).await {
                tracing::warn!(worker = id, %error, "the session of an ended worker could not be closed");
            }
        }
        drain(id, reader).await;
        let mut t = self.lock();
        self.end(&mut t, id, how);
    }

    /// Arms the one kill timer of a stopping worker: SIGKILL to its group at `at`, and if
    /// its pane has not died [`KILL_FALLBACK`] later, the session killed.
    pub(crate) fn arm_kill(&self, record: &mut Record, id: u64, at: Instant) {
        if let Some(timer) = record.kill_timer.take() {
            timer.abort();
        }
        record.kill_at = Some(at);
        let me = self.me.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            {
                let Some(inner) = me.upgrade() else {
                    return;
                };
                let t = inner.lock();
                match t.workers.get(&id) {
                    Some(r) if r.phase == Phase::Watched => {
                        if let Some(pane) = r.pane {
                            // The wrapper is spared: it reports the end, after all output.
                            pane.signal_members(libc::SIGKILL);
                        }
                    }
                    _ => return,
                }
            }
            tokio::time::sleep(KILL_FALLBACK).await;
            if let Some(inner) = me.upgrade() {
                inner.begin_end(id, Ending::Forced);
            }
        });
        record.kill_timer = Some(timer.abort_handle());
    }

    /// Checks the watched workers against the server's panes: a dead pane whose status is
    /// known ends its worker; a missing session too. (A worker normally ends with its
    /// wrapper's end mark, before its pane could die; a dead pane means the wrapper itself
    /// was killed, or gave up waiting for this source.)
    ///
    /// A pane can be dead (its pty closed) with its process a zombie that tmux has not
    /// reaped: now and then tmux 3.3 misses the SIGCHLD of a pane's process (seen on fresh
    /// servers, found by experiment), and reaps it only at the next SIGCHLD of any child.
    /// For such a pane the server gets a SIGCHLD from here, which makes it reap whatever
    /// has exited (a spurious one costs it one `waitpid`); the status shows at the next look.
    ///
    /// A pane can also be live with its process's status known: the wrapper has exited,
    /// and tmux still writes the output to the pipe, or something else of the worker still
    /// holds the pty. The rest of the worker's process group is killed then (a worker is its
    /// group); if the pane still lives once no output has come for [`LINGER`], the worker
    /// ends with its status anyway (what a process outside its group writes is cut off).
    fn observe(&self, watched: &[(u64, String)], panes: &[Pane], lingering: &mut Lingering) {
        let mut poke = None;
        lingering.retain(|id, _| watched.iter().any(|(w, _)| w == id));
        for (id, session) in watched {
            let id = *id;
            let Some(pane) = panes.iter().find(|p| &p.session == session) else {
                self.begin_end(id, Ending::Vanished);
                continue;
            };
            // The pane's process is the wrapper, which exits with its command's status.
            let how = pane.status.map_or(Ending::Signaled, ending_of);
            if pane.ended() {
                self.begin_end(id, how);
            } else if pane.dead {
                poke = Some(pane.server);
            } else if pane.status.is_some() || pane.signaled {
                let Some((group, seq)) = self
                    .lock()
                    .workers
                    .get(&id)
                    .map(|r| (r.pane, r.log.last_seq()))
                else {
                    continue;
                };
                let now = Instant::now();
                match lingering.get_mut(&id) {
                    None => {
                        if let Some(group) = group {
                            group.signal_group(libc::SIGKILL);
                        }
                        lingering.insert(id, (now, seq));
                    }
                    Some((since, last)) if *last != seq => (*since, *last) = (now, seq),
                    Some((since, _)) if now.duration_since(*since) >= LINGER => {
                        tracing::debug!(
                            worker = id,
                            "the pane of an exited worker lingers; ending it"
                        );
                        self.begin_end(id, how);
                    }
                    Some(_) => {}
                }
            }
        }
        if let Some(server) = poke.filter(|pid| *pid > 1) {
            // SAFETY: a signal to a pid the server just gave as its own; no memory involved.
            unsafe { libc::kill(server, libc::SIGCHLD) };
        }
    }

    fn watched(&self) -> Vec<(u64, String)> {
        self.lock()
            .workers
            .iter()
            .filter(|(_, r)| r.phase == Phase::Watched)
            .map(|(id, r)| (*id, r.session.clone()))
            .collect()
    }
}

/// The wrapper every session runs: makes the tty raw and silent, takes the environment,
/// says it is ready, waits at the gate, then becomes the command (`exec`).
fn wrapper(tmux: &Tmux, session: &str, env: Option<&Path>, nonce: &str) -> OsString {
    let mut client = sh_quote(tmux.program().as_os_str());
    client.push(" -f /dev/null -L ");
    client.push(sh_quote(OsStr::new(tmux.socket())));
    let channel = |c: &str| sh_quote(OsStr::new(&format!("{session}-{c}")));
    // The wrapper's own messages (a shell's "Terminated" for its killed child, a tmux
    // client's error naming the socket) go nowhere: only the command writes to the pane.
    // Its stderr waits on fd 3 until the command gets it back.
    let mut s =
        OsString::from("exec 3>&2 2>/dev/null\nunset TMUX TMUX_PANE\nstty raw -echo || exit 125\n");
    if let Some(env) = env {
        let quoted = sh_quote(env.as_os_str());
        s.push(". ");
        s.push(&quoted);
        s.push(" || exit 125\nrm -f ");
        s.push(&quoted);
        s.push("\n");
    }
    // The wrapper survives the signals sent to its process group (a handler of its own;
    // a subshell and the command get the default actions back), so that it can report the
    // end. The command's process is a subshell made before the gate opens: a stop that
    // comes once the worker runs always finds it in the group. The subshell says it is
    // ready, waits at the gate, and becomes the command. The wrapper waits for it, prints
    // the end mark with its status, and waits for the source to close the session; should
    // the source be gone, it ends by itself after a while, with the command's status.
    s.push("trap : HUP INT QUIT TERM USR1 USR2 ALRM\n(");
    s.push(&client);
    s.push(" wait-for -S ");
    s.push(channel("r"));
    s.push(" </dev/null && ");
    s.push(&client);
    s.push(" wait-for ");
    s.push(channel("g"));
    s.push(" </dev/null || exit 125\nexec \"$@\" 2>&3 3>&-)\ns=$?\nexec 3>&-\nprintf ");
    s.push(sh_quote(OsStr::new(&EndMark::printf_format(nonce))));
    s.push(format!(
        " \"$s\"\nsleep {}\nexit \"$s\"",
        WRAPPER_WAIT.as_secs()
    ));
    s
}

/// How a worker ended, from the status its wrapper's shell saw: above 128, a signal
/// (128 + its number, as shells report it), else the exit code.
fn ending_of(status: i32) -> Ending {
    if (129..=128 + 64).contains(&status) {
        Ending::Signaled
    } else {
        Ending::Exited(status)
    }
}

/// Writes the `export` lines the wrapper sources, readable by this user alone.
fn write_env_file(path: &Path, env: &BTreeMap<String, String>) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    let mut text = Vec::new();
    for (key, value) in env {
        // Keys are checked names; values are quoted.
        text.extend_from_slice(b"export ");
        text.extend_from_slice(key.as_bytes());
        text.push(b'=');
        text.extend_from_slice(sh_quote(OsStr::new(value)).as_bytes());
        text.push(b'\n');
    }
    file.write_all(&text)?;
    file.sync_all()
}

/// Waits until the pipe-pane command has the FIFO open for writing.
async fn await_writer(fifo: &File) -> Result<Option<Vec<u8>>, TmuxError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        match sys::peek_fifo(fifo) {
            Ok(FifoPeek::Writer) => return Ok(None),
            Ok(FifoPeek::Data(data)) => return Ok(Some(data)),
            Ok(FifoPeek::NoWriter) => {}
            Err(error) => {
                return Err(TmuxError::Io {
                    what: "reading the output FIFO",
                    error,
                })
            }
        }
        if Instant::now() >= deadline {
            return Err(TmuxError::Timeout {
                what: "pipe-pane (its command never opened the FIFO)",
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Copies the session's output from its FIFO into the log until the pipe closes, taking
/// out the wrapper's end mark; the mark ends the worker with the status it carries.
async fn read_output(
    me: Weak<Inner>,
    id: u64,
    mut fifo: pipe::Receiver,
    log: Arc<OutputLog>,
    mut mark: EndMark,
    early: Option<Vec<u8>>,
) {
    let mut writer = log.writer(StreamKind::Stdout);
    let mut take = |data: &[u8], writer: &mut registry_core::output_log::OutputWriter| {
        let (out, status) = mark.feed(data);
        writer.write(&out);
        if let (Some(status), Some(inner)) = (status, me.upgrade()) {
            inner.command_ended(id, ending_of(status));
        }
    };
    if let Some(data) = early {
        take(&data, &mut writer);
    }
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        match fifo.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => take(&buf[..n], &mut writer),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => {
                tracing::warn!(%error, "reading a worker's output failed");
                break;
            }
        }
    }
    writer.write(&mark.finish());
    writer.flush();
}

/// Waits for the output reader to reach the end of the pipe, for [`DRAIN_TIMEOUT`] at most.
async fn drain(id: u64, reader: Option<JoinHandle<()>>) {
    let Some(reader) = reader else {
        return;
    };
    let abort = reader.abort_handle();
    if tokio::time::timeout(DRAIN_TIMEOUT, reader).await.is_err() {
        abort.abort();
        tracing::warn!(
            worker = id,
            "the output of an ended worker did not end; it is cut off"
        );
    }
}

/// Writes a worker's input in order: each piece with one tmux client, `load-buffer` from
/// its stdin then `paste-buffer -r` into the pane (every byte as it is, no LF → CR).
async fn write_input(tmux: Tmux, session: String, mut rx: mpsc::UnboundedReceiver<InputItem>) {
    let buffer = format!("{session}-in");
    let target = pane_target(&session);
    while let Some((data, permit)) = rx.recv().await {
        let commands = command(["load-buffer", "-b", &buffer, "-"]).then([
            "paste-buffer",
            "-d",
            "-r",
            "-b",
            &buffer,
            "-t",
            &target,
        ]);
        // A client that never reached the server did nothing: that is tried again (a loaded
        // machine may fail a fork or a connect for a moment), so input once accepted is not
        // lost to it. Any other failure (the pane is gone, the client timed out after it may
        // have written) is not retried, so that nothing is written twice.
        let mut pause = INPUT_RETRY_FIRST;
        let deadline = tokio::time::Instant::now() + INPUT_RETRY_FOR;
        let result = loop {
            let result = tmux
                .run_with_input("paste-buffer", commands.clone(), Some(&data))
                .await;
            match result {
                Err(error) if did_nothing(&error) && tokio::time::Instant::now() < deadline => {
                    tracing::debug!(%error, "input could not be handed to tmux; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                result => break result,
            }
        };
        drop(permit);
        if let Err(error) = result {
            tracing::warn!(%error, "input could not be written to a worker; its further input is dropped");
            break;
        }
    }
}

/// The first wait before a piece of input is handed to tmux again; it doubles up to 1 s.
const INPUT_RETRY_FIRST: Duration = Duration::from_millis(20);
/// How long a piece of input is tried before it is given up.
const INPUT_RETRY_FOR: Duration = Duration::from_secs(10);

/// Whether a tmux client's failure means it did nothing: it could not be started, or could
/// not connect to the server (which is there, or the error would say so).
fn did_nothing(error: &TmuxError) -> bool {
    match error {
        TmuxError::Run { .. } => true,
        TmuxError::Failed { stderr, .. } => {
            stderr.contains("error connecting to") && !stderr.contains("No such file or directory")
        }
        _ => false,
    }
}

/// Watches the panes of live workers (one `list-panes` every [`POLL`] while any is
/// watched) and removes finished records past `retain_finished`. Ends with the source.
pub(crate) async fn monitor(me: Weak<Inner>) {
    let mut failing = 0u32;
    let mut lingering = Lingering::new();
    loop {
        let Some(inner) = me.upgrade() else {
            return;
        };
        let next_sweep = inner.sweep();
        let watched = inner.watched();
        if watched.is_empty() {
            let wake = Arc::clone(&inner.wake);
            drop(inner);
            let until = next_sweep.unwrap_or_else(|| Instant::now() + IDLE_CHECK);
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep_until(until) => {}
            }
            continue;
        }
        match inner.tmux.panes().await {
            Ok(panes) => {
                failing = 0;
                inner.set_health(SourceHealth::ready());
                inner.observe(&watched, &panes, &mut lingering);
            }
            // No server, no session: every watched worker is gone.
            Err(TmuxError::NoServer) => {
                failing = 0;
                inner.set_health(SourceHealth::ready());
                inner.observe(&watched, &[], &mut lingering);
            }
            Err(error) => {
                failing += 1;
                if failing == FAILURES_TO_DEGRADE {
                    tracing::warn!(%error, "the tmux server does not answer");
                }
                if failing < FAILURES_TO_DEGRADE {
                    drop(inner);
                    tokio::time::sleep(POLL).await;
                    continue;
                }
                inner.set_health(SourceHealth {
                    status: HealthStatus::Degraded,
                    message: Some(
                        "the tmux server does not answer; workers are not watched".into(),
                    ),
                    ..SourceHealth::ready()
                });
            }
        }
        drop(inner);
        tokio::time::sleep(POLL).await;
    }
}

/// Kills the sessions (and the process groups of their live panes) that sources no longer
/// running left on the server, and their files in the state directory.
pub(crate) async fn clean_leftovers(me: Weak<Inner>) {
    let Some(inner) = me.upgrade() else {
        return;
    };
    let panes = match inner.tmux.panes().await {
        Ok(panes) => panes,
        Err(TmuxError::NoServer) => Vec::new(),
        Err(error) => {
            tracing::warn!(%error, "could not look for sessions an earlier run left");
            Vec::new()
        }
    };
    let mut killed = 0;
    for pane in panes {
        if Owner::of(&pane.session).is_none_or(|owner| owner.alive()) {
            continue;
        }
        if !pane.dead {
            Proc::now(pane.pid).signal_group(libc::SIGKILL);
        }
        match inner.tmux.kill_session(&pane.session).await {
            Ok(()) => killed += 1,
            Err(error) => {
                tracing::warn!(%error, "a session an earlier run left could not be killed")
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(&inner.state_dir) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let stem = name
                .strip_suffix(".out")
                .or_else(|| name.strip_suffix(".env"));
            if stem.and_then(Owner::of).is_some_and(|owner| !owner.alive()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    if killed > 0 {
        tracing::info!(
            sessions = killed,
            "killed the sessions an earlier run left on the tmux server"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    use super::*;

    #[test]
    fn only_a_client_that_never_reached_the_server_is_tried_again() {
        let failed = |stderr: &str| TmuxError::Failed {
            what: "paste-buffer",
            status: ExitStatus::from_raw(1 << 8),
            stderr: stderr.into(),
        };
        let run = TmuxError::Run {
            what: "paste-buffer",
            error: io::Error::from_raw_os_error(libc::EAGAIN),
        };
        assert!(did_nothing(&run));
        assert!(did_nothing(&failed(
            "error connecting to /tmp/tmux-0/x (Resource temporarily unavailable)"
        )));
        // No server: the worker's session is gone with it.
        assert!(!did_nothing(&failed(
            "error connecting to /tmp/tmux-0/x (No such file or directory)"
        )));
        assert!(!did_nothing(&failed("can't find pane: %3")));
        assert!(!did_nothing(&TmuxError::Timeout {
            what: "paste-buffer"
        }));
    }
}
