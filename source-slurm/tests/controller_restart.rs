//! slurmctld stopped and started again while a job runs: the runtime is `unavailable`
//! (with `retry_at`) and the worker `unknown` meanwhile, then both come back, the worker
//! under the same key with its output going on. Its own test binary: it takes the
//! cluster's controller away from every other test while it runs.

mod common;

use std::time::Duration;

use common::{shell, wait_for, Dirs, WAIT};
use registry_core::{HealthStatus, RuntimeSource, SourceEvent, WorkerState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slurmctld_restarted_mid_run_leaves_workers_unknown_then_brings_them_back(
) -> anyhow::Result<()> {
    let Some(cluster) = common::cluster().await else {
        return Ok(());
    };
    let dirs = Dirs::new(&cluster);
    let source = common::source(cluster.config(dirs.output.path()), &dirs).await;
    let mut events = source.events().await?;
    let script = "i=0; while [ $i -lt 600 ]; do echo tick$i; i=$((i+1)); sleep 0.2; done";
    let w = source.spawn(shell(script, "through")).await?;
    common::read_output(&source, &w.key, Some("tick2\n")).await?;

    let pid = cluster.pid("slurmctld").expect("slurmctld's pid file");
    // SAFETY: a plain kill(2) of the test cluster's controller, whose pid file
    // scripts/start-slurm wrote.
    assert_eq!(
        unsafe { libc::kill(pid, libc::SIGTERM) },
        0,
        "kill slurmctld"
    );
    let unknown = wait_for(&source, &w.key, "unknown", WAIT, |w| {
        w.state == WorkerState::Unknown
    })
    .await?;
    assert!(unknown.last_seen_at.is_some(), "{unknown:?}");
    let health = source.health().await;
    assert_eq!(health.status, HealthStatus::Unavailable, "{health:?}");
    assert!(health.retry_at.is_some(), "{health:?}");
    let message = health.message.unwrap_or_default();
    assert!(message.contains("slurmctld"), "{message}");
    assert!(!message.contains("127.0.0.1"), "{message}");
    let spawn = source.spawn(shell("true", "meanwhile")).await.unwrap_err();
    assert_eq!(spawn.code(), "runtime_unavailable", "{spawn}");

    // Back, with its saved state: the job ran on under slurmd all along.
    tokio::task::spawn_blocking(common::start_slurm).await?;
    let back = wait_for(&source, &w.key, "running again", WAIT, |w| {
        w.state == WorkerState::Running
    })
    .await?;
    assert_eq!(back.key, w.key);
    assert!(source.wait_ready(WAIT).await, "{:?}", source.health().await);
    let seen_then = common::read_output(&source, &w.key, Some("tick2\n"))
        .await?
        .0;
    let last = seen_then.lines().count();
    let want = format!("tick{}\n", last + 3);
    common::read_output(&source, &w.key, Some(&want)).await?;

    source.stop(&w.key, Some(Duration::from_secs(5))).await?;
    let ended = wait_for(&source, &w.key, "stopped", WAIT, |w| w.state.is_terminal()).await?;
    assert_eq!(ended.state, WorkerState::Stopped, "{ended:?}");

    // The lifecycle stream told the whole story in order.
    let mut states = Vec::new();
    let mut healths = Vec::new();
    while let Ok(Some(event)) =
        tokio::time::timeout(Duration::from_millis(300), events.recv()).await
    {
        match event {
            SourceEvent::Upsert(v) if v.key == w.key => states.push(v.state),
            SourceEvent::Health(h) => healths.push(h.status),
            _ => {}
        }
    }
    let pos = |s: WorkerState| states.iter().position(|x| *x == s);
    assert!(
        pos(WorkerState::Running).is_some()
            && pos(WorkerState::Running) < pos(WorkerState::Unknown)
            && pos(WorkerState::Unknown) < states.iter().rposition(|x| *x == WorkerState::Running)
            && states.last() == Some(&WorkerState::Stopped),
        "{states:?}"
    );
    assert!(
        healths.contains(&HealthStatus::Unavailable)
            && healths.last() == Some(&HealthStatus::Ready),
        "{healths:?}"
    );
    source.shutdown(None).await;
    Ok(())
}
