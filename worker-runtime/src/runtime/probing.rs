//! Probing: the task that runs one worker's health probe during one run, at its interval and
//! within the runtime's bound of probes at once, and turns the results into the worker's
//! health — and, with `on_unhealthy = "restart"`, into a stop of the run that the restart
//! policy then follows.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Instant, SystemTime};

use tokio::io::AsyncReadExt;
use tokio::time::MissedTickBehavior;

use super::plan::Plan;
use super::supervise::{forget_group, wait_for_exit_unreaped};
use super::Inner;
use crate::probe::{self, OnUnhealthy, ProbePlan, Target};
use crate::sys::{self, Exec};
use crate::types::{Health, HealthState, LocalId};
use crate::util::lock;

/// A worker's probe with what an `exec` probe runs with: the worker's own environment and
/// working directory.
pub(super) struct ProbeRun {
    plan: ProbePlan,
    env: Vec<(OsString, OsString)>,
    cwd: Option<PathBuf>,
}

impl ProbeRun {
    pub(super) fn new(plan: ProbePlan, worker: &Plan) -> Self {
        ProbeRun {
            plan,
            env: worker.env.clone(),
            cwd: worker.cwd.clone(),
        }
    }
}

/// Successes and failures in a row, so far in this run.
#[derive(Default)]
struct Streak {
    successes: u32,
    failures: u32,
}

/// Probes run `run` (the worker's restart count when it started) of worker `id` until the
/// run ends, a stop is asked for, or the probe stops the run for being unhealthy. Aborted
/// when the run ends.
pub(super) async fn probe_run(weak: Weak<Inner>, id: LocalId, run: u32, probe: Arc<ProbeRun>) {
    tokio::time::sleep(probe.plan.initial_delay).await;
    let mut ticks = tokio::time::interval(probe.plan.interval);
    // A probe that took long (or waited for a permit) is not followed by a burst.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut streak = Streak::default();
    loop {
        ticks.tick().await;
        let permits = match weak.upgrade() {
            Some(inner) => Arc::clone(&inner.probes),
            None => return,
        };
        // The timeout counts from when the probe runs, not from when it waited for a permit.
        let Ok(permit) = permits.acquire_owned().await else {
            return;
        };
        let ok = tokio::time::timeout(probe.plan.timeout, attempt(&weak, &probe))
            .await
            .unwrap_or(false);
        drop(permit);
        let Some(inner) = weak.upgrade() else {
            return;
        };
        if !inner.probed(id, run, ok, &mut streak, &probe.plan) {
            return;
        }
    }
}

/// One probe attempt. Dropped at its timeout: an `exec` probe's process group is killed then.
async fn attempt(weak: &Weak<Inner>, probe: &ProbeRun) -> bool {
    match &probe.plan.target {
        Target::Tcp { host, port } => probe::tcp(host, *port).await,
        Target::Http { host, port, path } => probe::http(host, *port, path).await,
        Target::Exec(argv) => exec(weak, probe, argv).await,
    }
}

/// Kills an `exec` probe's process group when the attempt ends before its leader was reaped
/// (at the timeout), and has the watchdog forget the group.
struct ProbeGroup {
    pgid: i32,
    weak: Weak<Inner>,
    /// False once the leader exited and the rest of the group was killed.
    live: bool,
}

impl Drop for ProbeGroup {
    fn drop(&mut self) {
        if self.live {
            // The leader is not reaped yet (its `Child` is dropped after this guard, and
            // tokio reaps it then), so the id still names the probe's group.
            let _ = sys::signal_group(self.pgid, libc::SIGKILL);
        }
        if let Some(inner) = self.weak.upgrade() {
            inner
                .handle
                .spawn(forget_group(self.weak.clone(), self.pgid));
        }
    }
}

/// One `exec` probe: the command in a process group of its own, started like a worker (so it
/// dies with the runtime's process and the watchdog knows its group), its output discarded.
/// Success is exit code 0.
async fn exec(weak: &Weak<Inner>, probe: &ProbeRun, argv: &[String]) -> bool {
    let exec = match Exec::new(argv, &probe.env, probe.cwd.as_deref(), super::DEFAULT_PATH) {
        Ok(exec) => exec,
        Err(e) => {
            tracing::debug!(error = %e, "a health probe's command could not be prepared");
            return false;
        }
    };
    let submitted = match weak.upgrade() {
        Some(inner) => inner.spawner.submit(exec),
        None => return false,
    };
    let spawned = match submitted {
        Ok(reply) => match reply.await {
            Ok(Ok(spawned)) => spawned,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "a health probe's command could not be started");
                return false;
            }
            Err(_) => return false,
        },
        Err(_) => return false,
    };
    let mut child = spawned.child;
    // Stdin closed (a read gets end of file); what the probe writes is read and dropped, so
    // a chatty probe neither blocks on a full pipe nor dies of SIGPIPE. The readers end when
    // the probe's group is gone.
    drop(child.stdin.take());
    for out in [child.stdout.take(), child.stderr.take()]
        .into_iter()
        .flatten()
    {
        tokio::spawn(discard(out));
    }
    let Some(pgid) = child.id().and_then(|pid| i32::try_from(pid).ok()) else {
        return false;
    };
    let mut group = ProbeGroup {
        pgid,
        weak: weak.clone(),
        live: true,
    };
    let early = wait_for_exit_unreaped(pgid, &mut child).await;
    // The leader has exited and is unreaped: whatever it left in its group goes now.
    let _ = sys::signal_group(pgid, libc::SIGKILL);
    group.live = false;
    let status = match early {
        Some(status) => status,
        None => child.wait().await,
    };
    drop(group);
    status.is_ok_and(|s| s.success())
}

/// Reads `out` to its end and drops what it reads.
async fn discard(mut out: tokio::net::unix::pipe::Receiver) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = out.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

impl Inner {
    /// Applies one probe result to run `run` of worker `id`. Returns whether probing goes on.
    fn probed(
        self: &Arc<Self>,
        id: LocalId,
        run: u32,
        ok: bool,
        streak: &mut Streak,
        plan: &ProbePlan,
    ) -> bool {
        let mut table = lock(&self.table);
        let Some(record) = table.workers.get_mut(&id) else {
            return false;
        };
        if record.info.state.is_terminal()
            || record.info.restarts != run
            || record.stop_requested
            || record.unhealthy_kill
        {
            return false;
        }
        let Some(health) = record.info.health else {
            return false;
        };
        if ok {
            streak.successes = streak.successes.saturating_add(1);
            streak.failures = 0;
        } else {
            streak.failures = streak.failures.saturating_add(1);
            streak.successes = 0;
        }
        let next = if ok && streak.successes >= plan.success_threshold {
            HealthState::Healthy
        } else if !ok && streak.failures >= plan.failure_threshold {
            HealthState::Unhealthy
        } else {
            health.status
        };
        if next == health.status {
            return true;
        }
        record.info.health = Some(Health {
            status: next,
            since: SystemTime::now(),
            probe: health.probe,
        });
        let restart = next == HealthState::Unhealthy && plan.on_unhealthy == OnUnhealthy::Restart;
        let mut going_on = true;
        let group = record
            .process
            .as_ref()
            .map(|p| Arc::clone(&p.group))
            .filter(|g| !g.is_gone());
        if let (true, Some(group)) = (restart, group) {
            // Stopped as a stop request would, but the end is a failure that the restart
            // policy follows.
            tracing::info!(worker = %id, "a worker failed its health probe; restarting it");
            record.unhealthy_kill = true;
            group.signal(libc::SIGTERM);
            let due = Instant::now() + record.grace;
            self.arm_kill_timer(record, id, due);
            going_on = false;
        }
        table.upsert(id);
        going_on
    }
}
