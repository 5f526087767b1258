//! The watchdog process: kills the workers' process groups when the runtime's process dies.
//! [`Watchdogs`] keeps one running: it knows every live group, and when the watchdog dies it
//! starts a new one and tells it every group again.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use crate::sys;
use crate::util::lock;

/// The watchdog's script, for POSIX `sh`. It keeps the live worker process groups as told on
/// stdin (`add <pgid>`, `del <pgid>`). The set is a multiset and `del` removes one entry: if a
/// group id is reused by a new worker before the old group's `del` arrives, the new worker
/// stays protected. Its stdin is a pipe whose only writer is the
/// runtime's process, so end of file means that process is gone — however it ended, SIGKILL
/// included, since the kernel closes the pipe. Then it SIGKILLs every group left in the set.
/// Where workers are contained, its one argument is the runtime's cgroup: then it also
/// kills everything in it (`cgroup.kill`) and removes the cgroups once they are empty.
/// It ignores SIGHUP and SIGINT so that a terminal's hang-up or Ctrl-C, which may take the host
/// down, does not take the watchdog down first.
const SCRIPT: &str = r#"
trap '' HUP INT
groups=' '
while read -r op id; do
  case "$id" in
    ''|*[!0-9]*) continue ;;
  esac
  case "$op" in
    add) groups="$groups$id " ;;
    del)
      rest=' '
      found=
      for g in $groups; do
        if [ -z "$found" ] && [ "$g" = "$id" ]; then
          found=1
        else
          rest="$rest$g "
        fi
      done
      groups=$rest
      ;;
  esac
done
for id in $groups; do
  kill -s KILL -- "-$id" 2>/dev/null
done
if [ -n "$1" ]; then
  echo 1 > "$1/cgroup.kill"
  i=0
  while [ $i -lt 50 ]; do
    for d in "$1"/w-*; do rmdir "$d" 2>/dev/null; done
    rmdir "$1" 2>/dev/null && break
    sleep 0.1
    i=$((i+1))
  done
fi 2>/dev/null
"#;

/// Messages that may wait for the writer thread. Each worker sends two in its life (`add`
/// when it starts, `del` once its group is gone), and the watchdog reads continuously, so the
/// queue stays nearly empty; it fills only when the watchdog stops reading (it hangs, or was
/// stopped) and its pipe (about 6000 lines) is full too.
const QUEUE: usize = 4096;

/// One line for the watchdog. An `Add` carries a sender that is told once the line is in the
/// watchdog's pipe.
#[derive(Debug)]
enum Line {
    Add(i32, oneshot::Sender<()>),
    Del(i32),
}

/// The runtime's handle on its watchdog process.
///
/// Lines go through a bounded queue to a dedicated writer thread, so a caller (the spawner
/// thread, a tokio task) never blocks on the pipe. If the queue overflows, the runtime gives up
/// on the watchdog: it kills it, so that the watchdog can never act on a set of groups that
/// misses a `del` (and kill a group whose id was reused), and reports it gone
/// ([`Watchdog::is_alive`]). Workers then still die with the runtime through
/// `PR_SET_PDEATHSIG` and the runtime's `Drop`; only their own children lose the protection
/// against the runtime's process being SIGKILLed.
#[derive(Debug)]
pub(crate) struct Watchdog {
    /// The writer thread's queue; `None` once closed or given up on.
    queue: Mutex<Option<SyncSender<Line>>>,
    child: Mutex<Option<Child>>,
    pid: u32,
    /// Set when a write failed or the queue overflowed.
    failed: Arc<AtomicBool>,
}

impl Watchdog {
    /// Starts `/bin/sh -c <script>` in its own process group, stdin a pipe from us, stdout and
    /// stderr to /dev/null, with a minimal environment, and the thread that writes to it. The
    /// watchdog is deliberately not given `PR_SET_PDEATHSIG`: it must outlive us.
    pub(crate) fn start(cgroup: Option<&Path>) -> std::io::Result<Watchdog> {
        let mut command = Command::new("/bin/sh");
        command.arg("-c").arg(SCRIPT).arg("roster-watchdog");
        if let Some(cgroup) = cgroup {
            command.arg(cgroup);
        }
        command
            .env_clear()
            .env("PATH", crate::runtime::DEFAULT_PATH)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        sys::configure_watchdog(&mut command);
        let mut child = command.spawn()?;
        let pid = child.id();
        let Some(stdin) = child.stdin.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other("the watchdog has no stdin"));
        };
        let failed = Arc::new(AtomicBool::new(false));
        let (queue, lines) = mpsc::sync_channel(QUEUE);
        let writer = {
            let failed = Arc::clone(&failed);
            std::thread::Builder::new()
                .name("worker-watchdog-writer".into())
                .spawn(move || write_lines(lines, stdin, &failed))
        };
        if let Err(e) = writer {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        Ok(Watchdog {
            queue: Mutex::new(Some(queue)),
            child: Mutex::new(Some(child)),
            pid,
            failed,
        })
    }

    /// Tells the watchdog about a new worker process group. The receiver resolves once the
    /// line is in the watchdog's pipe: from then on the watchdog sees it even if this process
    /// is killed, since it reads its pipe to the end before it acts. It fails (the sender is
    /// dropped with the line) when the watchdog is or was given up on.
    pub(crate) fn add(&self, pgid: i32) -> oneshot::Receiver<()> {
        let (written, receiver) = oneshot::channel();
        self.send(Line::Add(pgid, written));
        receiver
    }

    /// Tells the watchdog that a worker process group is gone.
    pub(crate) fn del(&self, pgid: i32) {
        self.send(Line::Del(pgid));
    }

    /// Queues a line; never blocks. A line that can't be queued is dropped.
    fn send(&self, line: Line) {
        let mut queue = lock(&self.queue);
        let Some(tx) = queue.as_ref() else {
            return;
        };
        match tx.try_send(line) {
            Ok(()) => {}
            // The writer ended after a failed write, and said so.
            Err(TrySendError::Disconnected(_)) => *queue = None,
            Err(TrySendError::Full(_)) => {
                *queue = None;
                drop(queue);
                tracing::warn!(
                    "the worker watchdog does not keep up; it is stopped, and workers' children are \
                     no longer protected against the runtime's process being killed"
                );
                self.failed.store(true, Ordering::Release);
                if let Some(child) = lock(&self.child).as_mut() {
                    let _ = child.kill();
                }
            }
        }
    }

    /// Whether the watchdog still runs and takes our lines.
    pub(crate) fn is_alive(&self) -> bool {
        if self.failed.load(Ordering::Acquire) {
            return false;
        }
        match lock(&self.child).as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The watchdog's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Closes the queue: the writer thread writes what is queued, then closes the pipe (the
    /// watchdog then kills what is left in its set and exits). The watchdog is reaped on a
    /// short-lived thread.
    pub(crate) fn close(&self) {
        lock(&self.queue).take();
        if let Some(mut child) = lock(&self.child).take() {
            let _ = std::thread::Builder::new()
                .name("worker-watchdog-reaper".into())
                .spawn(move || {
                    let _ = child.wait();
                });
        }
    }
}

/// How often the keeper looks whether the watchdog still runs.
const CHECK_EVERY: Duration = Duration::from_millis(200);
/// The wait before the first restart of a watchdog that died. Not zero: whatever killed it
/// (an operator's `kill`, the OOM killer) may do so again, and the runtime's health reports
/// the loss for at least this long, so that a health check sees it.
const RESTART_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between restarts: the backoff doubles up to this.
const RESTART_MAX: Duration = Duration::from_secs(30);
/// A watchdog that lived this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// How long a new watchdog may take to have every live group in its pipe.
const REGISTERED_WITHIN: Duration = Duration::from_secs(5);

/// How a watchdog is started, given the runtime's cgroup.
pub(crate) type Starter = fn(Option<&Path>) -> std::io::Result<Watchdog>;

/// The runtime's watchdog, kept running.
///
/// It holds the multiset of live process groups (`add` and `del` go through it to the
/// current watchdog under one lock), so that a new watchdog can be told all of them. A task
/// ([`keep`]) checks every [`CHECK_EVERY`] whether the watchdog still runs; when it is gone
/// the runtime is not [`ready`](Self::ready) (spawns are refused, health says so), and after
/// a capped exponential backoff a new one is started, given every live group, and the runtime
/// is ready again once the new watchdog's pipe holds them all.
pub(crate) struct Watchdogs {
    slot: Mutex<Slot>,
    /// True while a watchdog runs that has every live group; changes are counted in
    /// `changes`.
    ready: AtomicBool,
    /// Bumped at every change of `ready`, for those who report health.
    changes: watch::Sender<u64>,
    closed: AtomicBool,
    /// Starts a watchdog: [`Watchdog::start`], but a test may make it fail.
    pub(crate) starter: Mutex<Starter>,
    /// The runtime's cgroup, for each watchdog.
    cgroup: Option<PathBuf>,
}

struct Slot {
    current: Option<Arc<Watchdog>>,
    /// Live groups and how often each was added without a `del`.
    groups: BTreeMap<i32, usize>,
    /// When the keeper tries next, while there is no watchdog.
    next_try: Option<Instant>,
}

impl std::fmt::Debug for Watchdogs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchdogs")
            .field("ready", &self.ready())
            .finish_non_exhaustive()
    }
}

impl Watchdogs {
    /// Starts the first watchdog and the task that keeps one running (on `handle`).
    pub(crate) fn start(
        handle: &tokio::runtime::Handle,
        cgroup: Option<PathBuf>,
    ) -> std::io::Result<Arc<Watchdogs>> {
        let first = Watchdog::start(cgroup.as_deref())?;
        let (changes, _) = watch::channel(0);
        let watchdogs = Arc::new(Watchdogs {
            slot: Mutex::new(Slot {
                current: Some(Arc::new(first)),
                groups: BTreeMap::new(),
                next_try: None,
            }),
            ready: AtomicBool::new(true),
            changes,
            closed: AtomicBool::new(false),
            starter: Mutex::new(Watchdog::start),
            cgroup,
        });
        handle.spawn(keep(Arc::downgrade(&watchdogs)));
        Ok(watchdogs)
    }

    /// Tells the watchdog about a new group; the receiver resolves once its line is in the
    /// watchdog's pipe (see [`Watchdog::add`]). It fails when there is no working watchdog;
    /// the group is still known, and a new watchdog is told about it.
    pub(crate) fn add(&self, pgid: i32) -> oneshot::Receiver<()> {
        let mut slot = lock(&self.slot);
        *slot.groups.entry(pgid).or_default() += 1;
        match &slot.current {
            Some(watchdog) => watchdog.add(pgid),
            None => oneshot::channel().1,
        }
    }

    /// Tells the watchdog that a group is gone.
    pub(crate) fn del(&self, pgid: i32) {
        let mut slot = lock(&self.slot);
        if let Some(count) = slot.groups.get_mut(&pgid) {
            *count -= 1;
            if *count == 0 {
                slot.groups.remove(&pgid);
            }
        }
        if let Some(watchdog) = &slot.current {
            watchdog.del(pgid);
        }
    }

    /// Whether the last watchdog started holds every live group (it may have died since:
    /// [`is_alive`](Self::is_alive) says that too).
    fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Whether the runtime is protected now: a watchdog runs that holds every live group.
    /// Spawns wait for this.
    pub(crate) fn is_alive(&self) -> bool {
        self.ready()
            && lock(&self.slot)
                .current
                .as_ref()
                .is_some_and(|w| w.is_alive())
    }

    /// How long until a new watchdog may be back, for a refused spawn's retry hint.
    pub(crate) fn retry_after(&self) -> Duration {
        let next = lock(&self.slot).next_try;
        let wait = next.map_or(Duration::ZERO, |at| {
            at.saturating_duration_since(Instant::now())
        });
        wait.max(Duration::from_secs(1))
    }

    /// A receiver that sees a new value at every change of [`ready`](Self::ready).
    pub(crate) fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Waits until [`is_alive`](Self::is_alive), or for at most `within` when given. Whether
    /// it is. (A watchdog that dies is noticed by the keeper, which then announces the loss
    /// and, later, the new one: each is a change this wakes up for.)
    pub(crate) async fn wait_ready(&self, within: Option<Duration>) -> bool {
        let mut changes = self.changes();
        let wait = async {
            loop {
                changes.borrow_and_update();
                if self.is_alive() || self.closed.load(Ordering::Acquire) {
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        };
        match within {
            Some(limit) => {
                let _ = tokio::time::timeout(limit, wait).await;
            }
            None => wait.await,
        }
        self.is_alive()
    }

    /// The current watchdog's pid (0 while there is none).
    pub(crate) fn pid(&self) -> u32 {
        lock(&self.slot).current.as_ref().map_or(0, |w| w.pid())
    }

    /// Closes the current watchdog (it kills the groups it still knows) and ends the keeper.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        if let Some(watchdog) = lock(&self.slot).current.take() {
            watchdog.close();
        }
        self.set_ready(false);
    }

    fn set_ready(&self, ready: bool) {
        if self.ready.swap(ready, Ordering::AcqRel) != ready {
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Starts a new watchdog, tells it every live group and makes it the current one; the
    /// old one (dead) is closed. Waits until the new pipe holds every group.
    async fn replace(&self) -> std::io::Result<()> {
        let starter = *lock(&self.starter);
        let cgroup = self.cgroup.clone();
        let started = tokio::task::spawn_blocking(move || starter(cgroup.as_deref()))
            .await
            .map_err(|_| std::io::Error::other("the watchdog's start was interrupted"))??;
        let new = Arc::new(started);
        let (old, registered) = {
            let mut slot = lock(&self.slot);
            if self.closed.load(Ordering::Acquire) {
                drop(slot);
                new.close();
                return Ok(());
            }
            let registered: Vec<_> = slot
                .groups
                .iter()
                .flat_map(|(&pgid, &count)| std::iter::repeat_n(pgid, count))
                .map(|pgid| new.add(pgid))
                .collect();
            slot.next_try = None;
            (slot.current.replace(Arc::clone(&new)), registered)
        };
        if let Some(old) = old {
            old.close();
        }
        let all = async {
            for written in registered {
                if written.await.is_err() {
                    return false;
                }
            }
            true
        };
        match tokio::time::timeout(REGISTERED_WITHIN, all).await {
            Ok(true) if new.is_alive() => Ok(()),
            _ => Err(std::io::Error::other(
                "the new watchdog did not take the live process groups",
            )),
        }
    }
}

/// Keeps a watchdog running for as long as the [`Watchdogs`] live and are not closed.
async fn keep(weak: Weak<Watchdogs>) {
    let mut backoff = RESTART_FIRST;
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        let Some(watchdogs) = weak.upgrade() else {
            return;
        };
        if watchdogs.closed.load(Ordering::Acquire) {
            return;
        }
        let alive = lock(&watchdogs.slot)
            .current
            .as_ref()
            .is_some_and(|w| w.is_alive());
        if alive {
            if since.elapsed() >= STABLE_AFTER {
                backoff = RESTART_FIRST;
            }
            continue;
        }
        tracing::warn!(
            "the worker watchdog is gone; no worker is started until a new one runs (in {} ms)",
            backoff.as_millis()
        );
        watchdogs.set_ready(false);
        drop(watchdogs);
        // Try until a new watchdog runs, waiting longer each time.
        loop {
            let Some(watchdogs) = weak.upgrade() else {
                return;
            };
            lock(&watchdogs.slot).next_try = Some(Instant::now() + backoff);
            drop(watchdogs);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RESTART_MAX);
            let Some(watchdogs) = weak.upgrade() else {
                return;
            };
            if watchdogs.closed.load(Ordering::Acquire) {
                return;
            }
            match watchdogs.replace().await {
                Ok(()) => {
                    if !watchdogs.closed.load(Ordering::Acquire) {
                        tracing::info!(
                            "a new worker watchdog runs and holds every live process group"
                        );
                        watchdogs.set_ready(true);
                    }
                    since = Instant::now();
                    break;
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot start a new worker watchdog; trying again in {} ms",
                    backoff.as_millis()
                ),
            }
        }
    }
}

/// The writer thread: writes each queued line to the watchdog's stdin, until the queue is
/// closed (then the pipe closes with `stdin`) or a write fails (the watchdog is gone).
///
/// Each line goes in one `write` (far below `PIPE_BUF`, so the kernel keeps it whole): were
/// this process killed between the pieces of a line, the watchdog would read half of it.
fn write_lines(lines: Receiver<Line>, mut stdin: ChildStdin, failed: &AtomicBool) {
    for line in lines {
        let (text, written) = match line {
            Line::Add(pgid, written) => (format!("add {pgid}\n"), Some(written)),
            Line::Del(pgid) => (format!("del {pgid}\n"), None),
        };
        if let Err(e) = stdin.write_all(text.as_bytes()) {
            failed.store(true, Ordering::Release);
            tracing::warn!(
                error = %e,
                "the worker watchdog is gone; workers' children are no longer protected against \
                 the runtime's process being killed"
            );
            return;
        }
        if let Some(written) = written {
            let _ = written.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// Polls `check` every 10 ms for up to 10 s.
    fn eventually(mut check: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if check() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        check()
    }

    #[test]
    fn a_watchdog_that_stops_reading_never_blocks_a_sender_and_is_given_up() {
        let watchdog = Arc::new(Watchdog::start(None).unwrap());
        assert!(watchdog.is_alive());
        let pid = i32::try_from(watchdog.pid()).unwrap();
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child's.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        // Far more lines than the pipe and the queue hold together.
        let (done_tx, done_rx) = mpsc::channel();
        let sender = {
            let watchdog = Arc::clone(&watchdog);
            std::thread::spawn(move || {
                for _ in 0..10_000 {
                    drop(watchdog.add(1_000_000));
                    watchdog.del(1_000_000);
                }
                let _ = done_tx.send(());
            })
        };
        let finished = done_rx.recv_timeout(Duration::from_secs(10)).is_ok();
        if !finished {
            // Let the blocked sender go before failing.
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        sender.join().unwrap();
        assert!(finished, "a send blocked on a watchdog that does not read");
        assert!(eventually(|| !watchdog.is_alive()));
        watchdog.close();
    }

    fn no_watchdog(_: Option<&Path>) -> std::io::Result<Watchdog> {
        Err(std::io::Error::other("no watchdog in this test"))
    }

    fn kill(pid: u32) {
        let pid = i32::try_from(pid).unwrap();
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child's.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    }

    async fn eventually_async(mut check: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if check() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        check()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_dead_watchdog_is_replaced_by_one_that_knows_every_live_group() {
        let watchdogs = Watchdogs::start(&tokio::runtime::Handle::current(), None).unwrap();
        let mut group = Command::new("sleep");
        group.arg("300");
        std::os::unix::process::CommandExt::process_group(&mut group, 0);
        let mut member = group.spawn().unwrap();
        let pgid = i32::try_from(member.id()).unwrap();
        watchdogs.add(pgid).await.unwrap();
        let first = watchdogs.pid();
        *lock(&watchdogs.starter) = no_watchdog;
        kill(first);
        assert!(eventually_async(|| !watchdogs.ready()).await);
        assert!(!watchdogs.is_alive());
        // While no new one can start, it stays so.
        tokio::time::sleep(RESTART_FIRST * 2).await;
        assert!(!watchdogs.ready());
        assert!(watchdogs.retry_after() >= Duration::from_secs(1));
        *lock(&watchdogs.starter) = Watchdog::start;
        assert!(watchdogs.wait_ready(Some(Duration::from_secs(20))).await);
        assert!(watchdogs.is_alive());
        assert_ne!(watchdogs.pid(), first);
        // The new watchdog holds the group: closing its pipe makes it kill the group.
        watchdogs.close();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = member.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        if status.is_none() {
            let _ = member.kill();
            let _ = member.wait();
        }
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.and_then(|s| s.signal()), Some(libc::SIGKILL));
    }

    #[test]
    fn a_killed_watchdog_is_reported_gone() {
        let watchdog = Watchdog::start(None).unwrap();
        assert!(watchdog.is_alive());
        let pid = i32::try_from(watchdog.pid()).unwrap();
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child's.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        assert!(eventually(|| !watchdog.is_alive()));
        watchdog.close();
    }
}
