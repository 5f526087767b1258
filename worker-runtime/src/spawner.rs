//! The runtime's spawner threads: the long-lived threads that start workers, and the child
//! processes they hand back.

use std::io;
use std::os::fd::OwnedFd;
use std::process::ExitStatus;
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread;

use tokio::net::unix::pipe;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::sys::{self, Exec};
use crate::util::lock;
use crate::watchdog::Watchdogs;

/// How many threads start workers. Each spends most of a spawn asleep while its child runs
/// up to its `execve` (see [`sys::spawn`]), so a few of them keep the kernel busy on two
/// cores; more add nothing but threads.
pub(crate) const THREADS: usize = 4;

struct Job {
    exec: Exec,
    reply: oneshot::Sender<io::Result<Spawned>>,
}

/// A freshly started worker.
#[derive(Debug)]
pub(crate) struct Spawned {
    pub(crate) child: Child,
    /// Resolves once the watchdog's pipe holds the worker's group (see [`Watchdogs::add`]).
    pub(crate) watched: oneshot::Receiver<()>,
}

/// Hands spawns to a few dedicated, long-lived std threads.
///
/// Workers carry `PR_SET_PDEATHSIG`, which the kernel fires when the *thread* that started
/// them exits. Starting them from tokio's worker threads (which come and go) or from a
/// caller's thread would kill workers at random; these threads live exactly as long as the
/// runtime (they end when the runtime's state is dropped and this sender with it), so
/// workers die with the runtime. Several threads, not one: each sleeps while its child runs
/// up to its `execve`, and the others start workers meanwhile.
#[derive(Debug)]
pub(crate) struct Spawner {
    jobs: mpsc::Sender<Job>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}

impl Spawner {
    /// Starts the threads. They enter `handle` so that the children's pipes are registered
    /// with the caller's tokio runtime.
    ///
    /// Right after each spawn a thread tells `watchdog` about the new process group, so that
    /// the window in which a worker is unknown to the watchdog is as short as it can be.
    pub(crate) fn start(handle: Handle, watchdog: Arc<Watchdogs>) -> io::Result<Spawner> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        let parent = sys::own_pid();
        let mut threads = Vec::with_capacity(THREADS);
        for n in 0..THREADS {
            let (handle, watchdog, queue) =
                (handle.clone(), Arc::clone(&watchdog), Arc::clone(&queue));
            let thread = thread::Builder::new()
                .name(format!("worker-spawner-{n}"))
                .spawn(move || {
                    let _entered = handle.enter();
                    let mut stack = vec![0u8; sys::CHILD_STACK];
                    loop {
                        // The lock is held only to take a job, never while spawning.
                        let Ok(job) = lock(&queue).recv() else {
                            return;
                        };
                        let result = spawn_child(&job.exec, parent, &mut stack).map(|child| {
                            // The worker's process group id is its leader's pid.
                            let watched = watchdog.add(child.pid);
                            Spawned { child, watched }
                        });
                        // The caller may have gone away; the child is then dropped (and
                        // reaped in the background).
                        let _ = job.reply.send(result);
                    }
                });
            match thread {
                Ok(thread) => threads.push(thread),
                // The threads started so far end with the sender.
                Err(e) => return Err(e),
            }
        }
        Ok(Spawner { jobs, threads })
    }

    /// Whether every thread still runs (they end only with the runtime, or if one panicked).
    pub(crate) fn is_alive(&self) -> bool {
        self.threads.iter().all(|t| !t.is_finished())
    }

    /// Queues `exec` for a spawner thread; the receiver yields the spawn's result.
    pub(crate) fn submit(&self, exec: Exec) -> io::Result<oneshot::Receiver<io::Result<Spawned>>> {
        let (reply, result) = oneshot::channel();
        self.jobs
            .send(Job { exec, reply })
            .map_err(|_| io::Error::other("spawner thread is gone"))?;
        Ok(result)
    }
}

/// Starts `exec` on this thread and wraps it for tokio (this thread must have entered the
/// runtime's handle).
fn spawn_child(exec: &Exec, parent: i32, stack: &mut [u8]) -> io::Result<Child> {
    let raw = sys::spawn(exec, parent, stack)?;
    let mut child = Child {
        pid: raw.pid,
        pidfd: raw.pidfd,
        status: None,
        stdin: None,
        stdout: None,
        stderr: None,
    };
    // From here on `child` reaps the process.
    let wrapped = (|| {
        for fd in [&raw.stdin, &raw.stdout, &raw.stderr] {
            sys::set_nonblocking(fd)?;
        }
        child.stdin = Some(pipe::Sender::from_owned_fd_unchecked(raw.stdin)?);
        child.stdout = Some(pipe::Receiver::from_owned_fd_unchecked(raw.stdout)?);
        child.stderr = Some(pipe::Receiver::from_owned_fd_unchecked(raw.stderr)?);
        io::Result::Ok(())
    })();
    if let Err(e) = wrapped {
        // A worker nobody could supervise must not run. Not reaped yet, so the group id is
        // still the child's.
        let _ = sys::signal_group(child.pid, libc::SIGKILL);
        return Err(e);
    }
    Ok(child)
}

/// A worker's process, its pipes and its reaping.
///
/// Dropped before it was reaped, it is handed to a reaper thread that waits for it (it is not
/// killed: the caller decides that), so no zombie is left behind.
#[derive(Debug)]
pub(crate) struct Child {
    pid: i32,
    /// Set while nobody waits on it; taken by [`Child::take_pidfd`].
    pidfd: Option<OwnedFd>,
    status: Option<ExitStatus>,
    pub(crate) stdin: Option<pipe::Sender>,
    pub(crate) stdout: Option<pipe::Receiver>,
    pub(crate) stderr: Option<pipe::Receiver>,
}

impl Child {
    /// The process id, until the process is reaped.
    pub(crate) fn id(&self) -> Option<u32> {
        match self.status {
            None => u32::try_from(self.pid).ok(),
            Some(_) => None,
        }
    }

    /// The pidfd made with the process, if the kernel gave one.
    pub(crate) fn take_pidfd(&mut self) -> Option<OwnedFd> {
        self.pidfd.take()
    }

    /// Waits for the process to exit and reaps it. Cancel-safe: nothing is lost when the
    /// future is dropped (a pidfd taken for the wait is reopened next time, if need be).
    pub(crate) async fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        loop {
            if let Some(status) = sys::reap(self.pid, true)? {
                self.status = Some(status);
                return Ok(status);
            }
            // Still running: wait without reaping, then look again.
            let pidfd = match self.pidfd.take() {
                Some(fd) => Some(fd),
                None => sys::pidfd_open(self.pid).ok(),
            };
            match pidfd {
                Some(fd) => sys::wait_readable(fd).await?,
                None => {
                    let pid = self.pid;
                    tokio::task::spawn_blocking(move || sys::wait_exited_unreaped(pid))
                        .await
                        .map_err(|_| io::Error::other("the wait for a worker was cancelled"))??;
                }
            }
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.status.is_none() && !matches!(sys::reap(self.pid, true), Ok(Some(_)) | Err(_)) {
            reap_later(self.pid);
        }
    }
}

/// Hands a child that still runs to the reaper thread, which reaps such children one by one
/// as they end. The queue holds at most one entry per dropped, unfinished child.
fn reap_later(pid: i32) {
    static REAPER: OnceLock<Mutex<Option<mpsc::Sender<i32>>>> = OnceLock::new();
    let reaper = REAPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<i32>();
        let started = thread::Builder::new()
            .name("worker-reaper".into())
            .spawn(move || {
                for pid in rx {
                    let _ = sys::reap(pid, false);
                }
            });
        Mutex::new(started.ok().map(|_| tx))
    });
    if let Some(tx) = lock(reaper).as_ref() {
        let _ = tx.send(pid);
    }
}

#[cfg(test)]
impl Child {
    /// Starts `argv` on the calling thread, as a spawner thread would (for this crate's unit
    /// tests; the death signal is then tied to the test's thread).
    pub(crate) fn start_here(argv: &[&str]) -> io::Result<Child> {
        let argv: Vec<String> = argv.iter().map(|a| (*a).to_string()).collect();
        let env = vec![("PATH".into(), crate::runtime::DEFAULT_PATH.into())];
        let exec = Exec::new(&argv, &env, None, crate::runtime::DEFAULT_PATH)?;
        let mut stack = vec![0u8; sys::CHILD_STACK];
        spawn_child(&exec, sys::own_pid(), &mut stack)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    /// A `/proc/<pid>/status` field as a number (hex for the signal masks).
    fn field(status: &str, name: &str) -> u64 {
        let value = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {status}"));
        u64::from_str_radix(value.trim(), 16).unwrap()
    }

    /// The child's whole stdout, once it has exited with success (and been reaped).
    async fn read_to_success(child: &mut Child) -> String {
        let mut out = String::new();
        let mut stdout = child.stdout.take().unwrap();
        stdout.read_to_string(&mut out).await.unwrap();
        assert!(child.wait().await.unwrap().success(), "{out}");
        out
    }

    #[tokio::test]
    async fn a_child_is_a_fresh_process_in_its_own_group_found_on_path() {
        // A bare name: looked up on the PATH given to the child. `cat` reads its own status.
        let mut child =
            Child::start_here(&["cat", "/proc/self/status", "/proc/self/stat"]).unwrap();
        let pid = child.id().unwrap();
        let out = read_to_success(&mut child).await;
        assert_eq!(child.id(), None, "reaped");
        // Nothing blocked, and SIGPIPE at its default although this process ignores it.
        assert_eq!(field(&out, "SigBlk:"), 0, "{out}");
        assert_eq!(
            field(&out, "SigIgn:") & (1 << (libc::SIGPIPE - 1)),
            0,
            "{out}"
        );
        // Its process group is its own (field 5 of stat).
        let stat = out.lines().last().unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let pgid: u32 = after_name.split(' ').nth(2).unwrap().parse().unwrap();
        assert_eq!(pgid, pid, "{stat}");
    }

    #[tokio::test]
    async fn a_program_without_a_shebang_runs_with_the_shell_and_its_arguments() {
        let script = std::env::temp_dir().join(format!("roster-no-shebang-{}", std::process::id()));
        std::fs::write(&script, "echo \"scripted $1\"\n").unwrap();
        let mut perms = std::fs::metadata(&script).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&script, perms).unwrap();
        // A fork elsewhere in this test process may hold the file open for writing for a
        // moment (until its exec): the kernel then refuses to run it, with ETXTBSY.
        let mut tries = 0;
        let mut child = loop {
            match Child::start_here(&[script.to_str().unwrap(), "here"]) {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                started => break started.unwrap(),
            }
        };
        let out = read_to_success(&mut child).await;
        std::fs::remove_file(&script).unwrap();
        assert_eq!(out, "scripted here\n");
    }

    #[tokio::test]
    async fn what_fails_before_exec_is_an_error_of_the_spawn_with_its_cause() {
        let env = vec![("PATH".into(), "/nonexistent-dir:/bin".into())];
        let mut stack = vec![0u8; sys::CHILD_STACK];
        let spawn = |argv: &[&str], cwd: Option<&str>, stack: &mut [u8]| {
            let argv: Vec<String> = argv.iter().map(|a| (*a).to_string()).collect();
            let exec = Exec::new(&argv, &env, cwd.map(std::path::Path::new), "/bin").unwrap();
            sys::spawn(&exec, sys::own_pid(), stack).map(|c| c.pid)
        };
        let missing = spawn(&["no-such-program-anywhere"], None, &mut stack).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound, "{missing}");
        let not_a_file = spawn(&["/"], None, &mut stack).unwrap_err();
        assert_eq!(
            not_a_file.raw_os_error(),
            Some(libc::EACCES),
            "{not_a_file}"
        );
        let bad_cwd = spawn(&["/bin/true"], Some("/nonexistent-dir"), &mut stack).unwrap_err();
        assert_eq!(bad_cwd.kind(), io::ErrorKind::NotFound, "{bad_cwd}");
    }
}
