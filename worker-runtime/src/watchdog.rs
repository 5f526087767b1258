//! The watchdog process: kills the workers' process groups when the runtime's process dies.

use std::io::Write;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;

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

/// The runtime's handle on its watchdog process.
///
/// Writes are a few bytes each (atomic on a pipe) and the watchdog reads continuously, so they
/// do not block in practice.
#[derive(Debug)]
pub(crate) struct Watchdog {
    stdin: Mutex<Option<ChildStdin>>,
    child: Mutex<Option<Child>>,
}

impl Watchdog {
    /// Starts `/bin/sh -c <script>` in its own process group, stdin a pipe from us, stdout and
    /// stderr to /dev/null, with a minimal environment. It is deliberately not given
    /// `PR_SET_PDEATHSIG`: it must outlive us.
    pub(crate) fn start() -> std::io::Result<Watchdog> {
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(SCRIPT)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        sys::configure_watchdog(&mut command);
        let mut child = command.spawn()?;
        let stdin = child.stdin.take();
        Ok(Watchdog {
            stdin: Mutex::new(stdin),
            child: Mutex::new(Some(child)),
        })
    }

    /// Tells the watchdog about a new worker process group.
    pub(crate) fn add(&self, pgid: i32) {
        self.send(&format!("add {pgid}\n"));
    }

    /// Tells the watchdog that a worker process group is gone.
    pub(crate) fn del(&self, pgid: i32) {
        self.send(&format!("del {pgid}\n"));
    }

    fn send(&self, line: &str) {
        let mut stdin = lock(&self.stdin);
        if let Some(pipe) = stdin.as_mut() {
            if let Err(e) = pipe.write_all(line.as_bytes()) {
                tracing::warn!(
                    error = %e,
                    "the worker watchdog is gone; workers are no longer protected against the runtime's process being killed"
                );
                *stdin = None;
            }
        }
    }

    /// Closes the pipe (the watchdog then kills what is left in its set and exits) and reaps
    /// the watchdog on a short-lived thread.
    pub(crate) fn close(&self) {
        lock(&self.stdin).take();
        if let Some(mut child) = lock(&self.child).take() {
            let _ = std::thread::Builder::new()
                .name("worker-watchdog-reaper".into())
                .spawn(move || {
                    let _ = child.wait();
                });
        }
    }
}
