//! Supervision: a worker's process from the fork to the reap. It wires up a new process
//! (output capture, stdin writer, a stop that came early), waits for the leader without
//! reaping it, kills the rest of its group, drains its pipes, records the outcome and has the
//! watchdog forget the group. The group's id is guarded so that no signal reaches a reused id.

use std::io;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use registry_core::output_log::OutputLog;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use super::plan::Plan;
use super::{Inner, Process, StdinItem, Table};
use crate::output::capture;
use crate::spawner::Child;
use crate::sys::{self, WorkerCgroup};
use crate::types::{
    FailReason, HealthState, LastExit, LocalId, RuntimeError, State, Stream, WorkerInfo,
};
use crate::util::lock;
use crate::watchdog::Watchdogs;

/// How long a worker's pipes may stay open *and idle* after its process group was killed. Only
/// a process that left the group (and so escaped the kill) can hold them open; the worker then
/// ends once no output has come for this long. Each read restarts the wait, so output that is
/// still flowing is never cut, however busy the machine.
const DRAIN_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long to wait for a killed group's last members to disappear before telling the
/// watchdog to forget it anyway.
const FORGET_TIMEOUT: Duration = Duration::from_secs(3);

/// A worker's process group, as its record and its supervisor task share it.
///
/// The group id is the leader's pid, so it names the worker's group only until the leader is
/// reaped. The supervisor marks the group gone before it reaps the leader, and every other
/// signal to the group is sent under the same lock after checking that mark; so no signal can
/// reach a process that reuses the id, also while the runtime is being dropped (when the
/// supervisor can no longer reach the record). A lock, not just an atomic flag: with a flag a
/// sender could check it, the supervisor set it and reap, and the sender then signal.
pub(super) struct Group {
    pgid: i32,
    gone: Mutex<bool>,
    /// The run's cgroup, where workers are contained: a SIGKILL goes to all of it too.
    cgroup: Option<WorkerCgroup>,
}

impl Group {
    pub(super) fn new(pgid: i32, cgroup: Option<WorkerCgroup>) -> Self {
        Group {
            pgid,
            gone: Mutex::new(false),
            cgroup,
        }
    }

    /// Sends `signal` to the group unless it is marked gone; a SIGKILL also kills every
    /// process of the run's cgroup (those that left the group included).
    pub(super) fn signal(&self, signal: i32) {
        let gone = lock(&self.gone);
        if !*gone {
            let _ = sys::signal_group(self.pgid, signal);
            if signal == libc::SIGKILL {
                if let Some(cgroup) = &self.cgroup {
                    cgroup.kill();
                }
            }
        }
    }

    /// Marks the group gone: its leader has exited and is about to be reaped. Only the
    /// supervisor calls it.
    pub(super) fn mark_gone(&self) {
        *lock(&self.gone) = true;
    }

    /// Whether the leader has exited.
    pub(super) fn is_gone(&self) -> bool {
        *lock(&self.gone)
    }
}

impl Inner {
    /// Wires up a freshly spawned process (the spawner thread has told the watchdog about it
    /// already): output capture, stdin writer, pending stop, supervisor.
    fn started(
        self: &Arc<Self>,
        id: LocalId,
        mut child: Child,
        cgroup: Option<WorkerCgroup>,
    ) -> Result<WorkerInfo, RuntimeError> {
        let Some(pgid) = child.id().and_then(|pid| i32::try_from(pid).ok()) else {
            // Only possible if the child was already reaped, which nothing does before us.
            return self.spawn_failed(
                id,
                "the program could not be started: it has no process id".into(),
            );
        };
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let stdin = child.stdin.take();

        let mut table = lock(&self.table);
        let Some(record) = table.workers.get_mut(&id) else {
            // Unreachable: only terminal records are removed. Do not leave the process behind.
            drop(table);
            // Not reaped yet (the wait below does that), so the id is still the worker's.
            let _ = sys::signal_group(pgid, libc::SIGKILL);
            if let Some(cgroup) = cgroup {
                cgroup.kill();
                self.handle.spawn(remove_cgroup(cgroup));
            }
            self.handle.spawn(async move {
                let _ = child.wait().await;
            });
            return Err(RuntimeError::Internal("the worker record vanished".into()));
        };
        let log = Arc::clone(&record.output);
        let activity = Arc::new(Notify::new());
        let mut captures: Vec<JoinHandle<()>> = Vec::with_capacity(2);
        if let Some(pipe) = stdout {
            let (log, activity) = (Arc::clone(&log), Arc::clone(&activity));
            captures.push(
                self.handle
                    .spawn(capture(pipe, Stream::Stdout, log, activity)),
            );
        }
        if let Some(pipe) = stderr {
            let (log, activity) = (Arc::clone(&log), Arc::clone(&activity));
            captures.push(
                self.handle
                    .spawn(capture(pipe, Stream::Stderr, log, activity)),
            );
        }
        // Even if stdin was already closed (`close_input` while starting), what was queued
        // before is written first.
        if let (Some(pipe), Some(rx)) = (stdin, record.stdin_rx.take()) {
            self.handle
                .spawn(write_stdin(rx, pipe, Arc::clone(&record.stdin_broken)));
        }
        let group = Arc::new(Group::new(pgid, cgroup));
        record.process = Some(Process {
            group: Arc::clone(&group),
        });
        record.info.started_at = Some(SystemTime::now());
        record.info.retry_at = None;
        record.run_started = Some(Instant::now());
        if record.stop_requested {
            // A stop arrived while the process was being created: carry it out now.
            let due = record.kill_at.unwrap_or_else(Instant::now);
            if due <= Instant::now() {
                group.signal(libc::SIGKILL);
            } else {
                group.signal(libc::SIGTERM);
                self.arm_kill_timer(record, id, due);
            }
        } else {
            record.info.state = State::Running;
            if let Some(probe) = &record.probe {
                let task = self.handle.spawn(super::probing::probe_run(
                    Arc::downgrade(self),
                    id,
                    record.info.restarts,
                    Arc::clone(probe),
                ));
                if let Some(previous) = record.probe_task.replace(task.abort_handle()) {
                    previous.abort();
                }
            }
        }
        let info = record.info.clone();
        table.upsert(id);
        drop(table);

        self.handle.spawn(supervise(
            Arc::downgrade(self),
            id,
            child,
            group,
            captures,
            activity,
            log,
        ));
        Ok(info)
    }
}

/// How long a new worker waits for the watchdog's pipe to hold its group before it is
/// reported running anyway. The writer thread takes a line within microseconds unless the
/// machine is starved or the watchdog stopped reading.
const WATCHED_WITHIN: Duration = Duration::from_secs(5);

/// Waits until the watchdog's pipe holds a new worker's group, so that a worker reported
/// running has its children protected against this process being SIGKILLed (otherwise a
/// client could see `running` and kill the host before the line was written). Gives up after
/// [`WATCHED_WITHIN`]; the line stays queued and is written when the writer can. When the
/// watchdog died before it took the line, the new one is told every live group, this one
/// included: then this waits (within the same bound) until that one is ready.
async fn wait_until_watched(watched: tokio::sync::oneshot::Receiver<()>, watchdog: &Watchdogs) {
    let deadline = tokio::time::Instant::now() + WATCHED_WITHIN;
    match tokio::time::timeout_at(deadline, watched).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !watchdog.wait_ready(Some(left)).await {
                tracing::warn!(
                    "the worker watchdog died before it took a new worker, and no new one \
                     holds it yet; the worker runs, its children unprotected until one does"
                );
            }
        }
        Err(_) => tracing::warn!(
            "the worker watchdog has not taken a new worker within {WATCHED_WITHIN:?}; the \
             worker runs, its children unprotected until it does"
        ),
    }
}

impl Inner {
    /// Turns a worker whose process ended into one waiting to be restarted: `starting` with
    /// `retry_at`, one more restart, the previous run's end, a fresh stdin queue, and a line in
    /// its output that marks the restart (output seqs go on). Its timer starts the next run.
    pub(super) fn schedule_restart(
        self: &Arc<Self>,
        table: &mut Table,
        id: LocalId,
        delay: Duration,
        last: LastExit,
    ) {
        let (queue, rx) = match table.workers.get(&id) {
            Some(record) => self.stdin_queue(&record.spec),
            None => return,
        };
        let Some(record) = table.workers.get_mut(&id) else {
            return;
        };
        record.process = None;
        record.run_started = None;
        if let Some(task) = record.probe_task.take() {
            task.abort();
        }
        // The SIGKILL due for a run the probe stopped must not reach the next run.
        if let Some(timer) = record.kill_timer.take() {
            timer.abort();
        }
        record.kill_at = None;
        let unhealthy = std::mem::take(&mut record.unhealthy_kill);
        if let Some(health) = &mut record.info.health {
            // Nothing is known of the next run yet.
            health.status = HealthState::Unknown;
            health.since = last.at;
        }
        record.stdin = Some(queue);
        record.stdin_rx = Some(rx);
        record.stdin_broken = Arc::new(AtomicBool::new(false));
        record.info.state = State::Starting;
        record.info.restarts = record.info.restarts.saturating_add(1);
        record.info.last_exit = Some(last);
        // From the same instant as the run's end, so `retry_at - last_exit.at` is the delay.
        record.info.retry_at = Some(last.at + delay);
        let mut ended = match (last.code, last.signal) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(signal)) => format!("signal {signal}"),
            (None, None) => "an unknown status".to_string(),
        };
        if unhealthy {
            ended = format!("its health probe failed ({ended})");
        }
        let marker = format!(
            "[roster] restart {} after {ended}; next run in {} ms\n",
            record.info.restarts,
            delay.as_millis()
        );
        record.output.push(Stream::Stderr, Bytes::from(marker));
        let timer = self
            .handle
            .spawn(restart_after(Arc::downgrade(self), id, delay));
        record.retry_timer = Some(timer.abort_handle());
        table.upsert(id);
    }
}

/// Waits out a restart's delay, then starts the worker's next run, unless a stop came first
/// (it aborts this task or, once the timer has fired, finds it taken).
async fn restart_after(weak: Weak<Inner>, id: LocalId, delay: Duration) {
    tokio::time::sleep(delay).await;
    // No run starts without a watchdog: wait for the new one (a stop meanwhile aborts this).
    let watchdog = match weak.upgrade() {
        Some(inner) => Arc::clone(&inner.watchdog),
        None => return,
    };
    watchdog.wait_ready(None).await;
    drop(watchdog);
    let Some(inner) = weak.upgrade() else {
        return;
    };
    let plan = {
        let mut table = lock(&inner.table);
        let Some(record) = table.workers.get_mut(&id) else {
            return;
        };
        if record.retry_timer.take().is_none() || record.info.state.is_terminal() {
            return;
        }
        match inner.plan(&record.spec) {
            Ok(plan) => plan,
            Err(e) => {
                // In the view, where the registry logs it under the worker's public id.
                table.note(id, format!("the worker cannot be restarted: {e}"));
                table.end(id, State::Failed, None, None, Some(FailReason::SpawnFailed));
                return;
            }
        }
    };
    drop(inner);
    let _ = start_worker(weak, id, plan).await;
}

/// Forks the process (on the spawner thread) and wires it up. Runs as its own task.
pub(super) async fn start_worker(
    weak: Weak<Inner>,
    id: LocalId,
    plan: Plan,
) -> Result<WorkerInfo, RuntimeError> {
    let gone = || RuntimeError::Internal("the runtime was shut down".into());
    let (submitted, watchdog, cgroup) = {
        let inner = weak.upgrade().ok_or_else(gone)?;
        // Where workers are contained, each run gets a new cgroup, which the child enters
        // before its `execve`.
        let cgroup = match inner.cgroups.as_ref().map(|tree| tree.create()).transpose() {
            Ok(cgroup) => cgroup,
            Err(e) => {
                return inner
                    .spawn_failed(id, format!("the worker's cgroup could not be made: {e}"));
            }
        };
        let submitted = plan.exec().and_then(|exec| {
            let exec = match &cgroup {
                Some(cgroup) => exec.in_cgroup(cgroup.procs_fd()),
                None => exec,
            };
            inner.spawner.submit(exec)
        });
        (submitted, Arc::clone(&inner.watchdog), cgroup)
    };
    let result = match submitted {
        Ok(reply) => reply
            .await
            .unwrap_or_else(|_| Err(io::Error::other("the spawner thread is gone"))),
        Err(e) => Err(e),
    };
    let result = match result {
        Ok(spawned) => {
            wait_until_watched(spawned.watched, &watchdog).await;
            Ok(spawned.child)
        }
        Err(e) => Err(e),
    };
    // If the runtime is gone, the child (if any) is dropped here and dies with the spawner
    // threads (PR_SET_PDEATHSIG); the reaper thread reaps it.
    let inner = weak.upgrade().ok_or_else(gone)?;
    match result {
        Ok(child) => inner.started(id, child, cgroup),
        Err(e) => {
            if let Some(cgroup) = cgroup {
                cgroup.remove();
            }
            inner.spawn_failed(id, plan.failure_message(&e))
        }
    }
}

/// Waits for the worker's leader, marks its group gone, kills the rest of the group, reaps
/// the leader, waits for the pipes to drain, then records the outcome.
async fn supervise(
    weak: Weak<Inner>,
    id: LocalId,
    mut child: Child,
    group: Arc<Group>,
    captures: Vec<JoinHandle<()>>,
    activity: Arc<Notify>,
    log: Arc<OutputLog>,
) {
    let pgid = group.pgid;
    let early_status = wait_for_exit_unreaped(pgid, &mut child).await;
    // From here on nobody else signals the group: the reap below frees the id. Marked on the
    // group itself, so that this holds also when the runtime is being dropped.
    group.mark_gone();
    // A worker is its process group: when the leader is gone, so is the rest. While the
    // leader is an unreaped zombie the group id cannot be reused, so this hits only the worker.
    let _ = sys::signal_group(pgid, libc::SIGKILL);
    // Where workers are contained, its cgroup holds the rest, those outside the group too.
    if let Some(cgroup) = &group.cgroup {
        cgroup.kill();
    }
    let status = match early_status {
        Some(status) => status,
        None => child.wait().await,
    };

    let cut = drain(captures, &activity).await;

    tokio::spawn(forget_group(weak.clone(), pgid));
    tokio::spawn(remove_group_cgroup(group));
    match weak.upgrade() {
        Some(inner) => {
            if cut {
                lock(&inner.table).note(
                    id,
                    "a process that left the worker's process group kept its output open; \
                     output was read until it had been idle for 2 s"
                        .into(),
                );
            }
            inner.finished(id, status)
        }
        // The runtime is gone and the record with it: no `End` for a worker nobody can see.
        None => log.close(),
    }
}

/// Waits for the capture tasks to reach end of file. Only a process that left the worker's
/// group can keep the pipes open now; once no output has come for [`DRAIN_IDLE_TIMEOUT`], the
/// captures are cut off, and the answer is `true`.
async fn drain(captures: Vec<JoinHandle<()>>, activity: &Notify) -> bool {
    let aborts: Vec<_> = captures.iter().map(JoinHandle::abort_handle).collect();
    let all_done = async {
        for capture in captures {
            let _ = capture.await;
        }
    };
    tokio::pin!(all_done);
    loop {
        tokio::select! {
            () = &mut all_done => return false,
            // A read happened: wait afresh.
            () = activity.notified() => {}
            () = tokio::time::sleep(DRAIN_IDLE_TIMEOUT) => {
                for abort in aborts {
                    abort.abort();
                }
                return true;
            }
        }
    }
}

/// Waits until the process `pid` has exited, without reaping it.
///
/// Returns `None` when it exited and is still a zombie. It uses a pidfd, or where pidfds are
/// not available (kernels before 5.3) `waitid` with `WNOWAIT` on a blocking thread. Only if
/// both fail does it reap, returning `Some(status)`; then the group kill that follows has a
/// small window in which the group id could have been reused.
pub(super) async fn wait_for_exit_unreaped(
    pid: i32,
    child: &mut Child,
) -> Option<io::Result<ExitStatus>> {
    // The pidfd made with the process names it from its first instant; opening one now is
    // for kernels without CLONE_PIDFD.
    let pidfd = child.take_pidfd().or_else(|| sys::pidfd_open(pid).ok());
    wait_unreaped(pid, child, pidfd).await
}

async fn wait_unreaped(
    pid: i32,
    child: &mut Child,
    pidfd: Option<std::os::fd::OwnedFd>,
) -> Option<io::Result<ExitStatus>> {
    if let Some(pidfd) = pidfd {
        if sys::wait_readable(pidfd).await.is_ok() {
            return None;
        }
    }
    // The blocking thread is held for the worker's life. Nothing reaps the child meanwhile:
    // only its `wait` and its drop do.
    match tokio::task::spawn_blocking(move || sys::wait_exited_unreaped(pid)).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot wait for a worker without reaping it");
            Some(child.wait().await)
        }
        Err(_) => Some(child.wait().await),
    }
}

/// How long a killed cgroup may take to be empty before it is left behind (with a note in
/// the log). Its processes are SIGKILLed: they go within milliseconds unless the machine
/// is starved.
const CGROUP_EMPTY_TIMEOUT: Duration = Duration::from_secs(30);

/// Removes a run's cgroup once it is empty (its group is gone and it was killed).
async fn remove_group_cgroup(group: Arc<Group>) {
    if let Some(cgroup) = &group.cgroup {
        wait_removed(cgroup).await;
    }
}

/// Removes a cgroup that no run uses.
async fn remove_cgroup(cgroup: WorkerCgroup) {
    wait_removed(&cgroup).await;
}

async fn wait_removed(cgroup: &WorkerCgroup) {
    let deadline = Instant::now() + CGROUP_EMPTY_TIMEOUT;
    let mut pause = Duration::from_millis(2);
    loop {
        if !cgroup.populated() && cgroup.remove() {
            return;
        }
        if Instant::now() > deadline {
            tracing::warn!("a worker's cgroup is still not empty after it was killed; it stays");
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Tells the watchdog to forget a group once its last member is gone (or after a while).
pub(super) async fn forget_group(weak: Weak<Inner>, pgid: i32) {
    let deadline = Instant::now() + FORGET_TIMEOUT;
    let mut pause = Duration::from_millis(2);
    while sys::group_exists(pgid) && Instant::now() < deadline {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
    if let Some(inner) = weak.upgrade() {
        inner.watchdog.del(pgid);
    }
}

/// Writes queued input to the worker's stdin, in order; each item's permits return to the
/// budget once it is written. Ends when the queue is closed (the pipe then closes: EOF for the
/// worker) or the pipe breaks.
async fn write_stdin(
    mut queue: mpsc::UnboundedReceiver<StdinItem>,
    mut pipe: pipe::Sender,
    broken: Arc<AtomicBool>,
) {
    while let Some((data, _permit)) = queue.recv().await {
        if pipe.write_all(&data).await.is_err() {
            broken.store(true, Ordering::Release);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::process::Command;

    use super::*;
    use crate::output::OutputReader;

    const DEADLINE: Duration = Duration::from_secs(10);

    /// The state letter of `/proc/<pid>/stat` (`Z` for a zombie).
    fn proc_state(pid: i32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat[stat.rfind(')')? + 2..].chars().next()
    }

    /// Whether `signal` is pending for the whole process `pid` (`ShdPnd`).
    fn shared_pending(pid: i32, signal: i32) -> bool {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let mask = status
            .lines()
            .find_map(|l| l.strip_prefix("ShdPnd:"))
            .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
            .unwrap();
        mask & (1 << (signal - 1)) != 0
    }

    #[tokio::test]
    async fn without_pidfds_the_wait_for_the_leader_leaves_it_unreaped() {
        let mut child = Child::start_here(&["/bin/sh", "-c", "exit 3"]).unwrap();
        let pid = i32::try_from(child.id().unwrap()).unwrap();
        let early = wait_unreaped(pid, &mut child, None).await;
        assert!(early.is_none(), "{early:?}");
        // A zombie still: its pid, and so the group id, cannot have been reused.
        assert_eq!(proc_state(pid), Some('Z'));
        assert_eq!(child.wait().await.unwrap().code(), Some(3));
    }

    #[tokio::test]
    async fn a_group_marked_gone_is_never_signalled() {
        let mut command = Command::new("sleep");
        command.arg("100").process_group(0);
        // SAFETY: between fork and exec, only async-signal-safe calls without allocation.
        unsafe {
            command.pre_exec(|| {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGUSR1);
                libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                Ok(())
            });
        }
        let mut child = command.spawn().unwrap();
        let pid = i32::try_from(child.id().unwrap()).unwrap();
        let group = Group::new(pid, None);
        group.mark_gone();
        group.signal(libc::SIGUSR1);
        assert!(!shared_pending(pid, libc::SIGUSR1), "signalled once gone");
        // The check itself sees a signal that was sent: SIGUSR1 is blocked, so it stays pending.
        sys::signal_group(pid, libc::SIGUSR1).unwrap();
        assert!(shared_pending(pid, libc::SIGUSR1));
        child.kill().await.unwrap();
    }

    #[tokio::test]
    async fn the_supervisor_marks_the_group_gone_also_when_the_runtime_is_gone() {
        let child = Child::start_here(&["/bin/sh", "-c", "exit 0"]).unwrap();
        let pid = i32::try_from(child.id().unwrap()).unwrap();
        let group = Arc::new(Group::new(pid, None));
        let log = OutputLog::new(1024);
        let supervised = supervise(
            Weak::new(),
            LocalId(1),
            child,
            Arc::clone(&group),
            Vec::new(),
            Arc::new(Notify::new()),
            Arc::clone(&log),
        );
        tokio::time::timeout(DEADLINE, supervised).await.unwrap();
        assert!(group.is_gone());
        let mut reader = OutputReader::new(&log, 0, true).unwrap();
        assert_eq!(reader.next().await, None, "closed, without End");
    }
}
