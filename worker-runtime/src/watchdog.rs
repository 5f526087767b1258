//! The watchdog process: kills the workers' process groups when the runtime's process dies.

use std::io::Write;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::sys;
use crate::util::lock;

/// The watchdog's script, for POSIX `sh`. It keeps the live worker process groups as told on
/// stdin (`add <pgid>`, `del <pgid>`). The set is a multiset and `del` removes one entry: if a
/// group id is reused by a new worker before the old group's `del` arrives, the new worker
/// stays protected. Its stdin is a pipe whose only writer is the
/// runtime's process, so end of file means that process is gone — however it ended, SIGKILL
/// included, since the kernel closes the pipe. Then it SIGKILLs every group left in the set.
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
    pub(crate) fn start() -> std::io::Result<Watchdog> {
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(SCRIPT)
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
        let watchdog = Arc::new(Watchdog::start().unwrap());
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

    #[test]
    fn a_killed_watchdog_is_reported_gone() {
        let watchdog = Watchdog::start().unwrap();
        assert!(watchdog.is_alive());
        let pid = i32::try_from(watchdog.pid()).unwrap();
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child's.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        assert!(eventually(|| !watchdog.is_alive()));
        watchdog.close();
    }
}
