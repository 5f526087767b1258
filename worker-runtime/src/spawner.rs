//! The runtime's spawner thread: the one thread that forks workers.

use std::io;
use std::sync::{mpsc, Arc};
use std::thread;

use tokio::process::{Child, Command};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::watchdog::Watchdog;

struct Job {
    command: Command,
    reply: oneshot::Sender<io::Result<Spawned>>,
}

/// A freshly forked worker.
#[derive(Debug)]
pub(crate) struct Spawned {
    pub(crate) child: Child,
    /// Resolves once the watchdog's pipe holds the worker's group (see [`Watchdog::add`]).
    pub(crate) watched: oneshot::Receiver<()>,
}

/// Hands commands to a dedicated, long-lived std thread that spawns them.
///
/// Workers carry `PR_SET_PDEATHSIG`, which the kernel fires when the *thread* that forked them
/// exits. Forking from tokio's worker threads (which come and go) or from a caller's thread
/// would kill workers at random; this thread lives exactly as long as the runtime (it ends when
/// the runtime's state is dropped and this sender with it), so workers die with the runtime.
#[derive(Debug)]
pub(crate) struct Spawner {
    jobs: mpsc::Sender<Job>,
    thread: thread::JoinHandle<()>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}

impl Spawner {
    /// Starts the thread. It enters `handle` so that the children's pipes and exit
    /// notifications are registered with the caller's tokio runtime.
    ///
    /// Right after each fork it tells `watchdog` about the new process group, so that the
    /// window in which a worker is unknown to the watchdog is as short as it can be.
    pub(crate) fn start(handle: Handle, watchdog: Arc<Watchdog>) -> io::Result<Spawner> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let thread = thread::Builder::new()
            .name("worker-spawner".into())
            .spawn(move || {
                let _entered = handle.enter();
                while let Ok(mut job) = queue.recv() {
                    let result = job.command.spawn().map(|child| {
                        // The worker's process group id is its leader's pid.
                        let watched = match child.id().and_then(|pid| i32::try_from(pid).ok()) {
                            Some(pgid) => watchdog.add(pgid),
                            // No pid (not so right after a spawn): nothing to wait for.
                            None => oneshot::channel().1,
                        };
                        Spawned { child, watched }
                    });
                    // The caller may have gone away; the child is then dropped, and tokio
                    // reaps it in the background.
                    let _ = job.reply.send(result);
                }
            })?;
        Ok(Spawner { jobs, thread })
    }

    /// Whether the thread still runs (it ends only with the runtime, or if it panicked).
    pub(crate) fn is_alive(&self) -> bool {
        !self.thread.is_finished()
    }

    /// Queues `command` for the spawner thread; the receiver yields the spawn's result.
    pub(crate) fn submit(
        &self,
        command: Command,
    ) -> io::Result<oneshot::Receiver<io::Result<Spawned>>> {
        let (reply, result) = oneshot::channel();
        self.jobs
            .send(Job { command, reply })
            .map_err(|_| io::Error::other("spawner thread is gone"))?;
        Ok(result)
    }
}
