//! The registry core's conformance suite on the `local` source, with workers started the
//! old way: by the legacy launcher, through real descriptor files, logs, sockets and
//! processes. Run once on `LocalSource` and once on `Arc<dyn RuntimeSource>`.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use registry_core::conformance::{run_concrete_and_dyn, Expected, Harness, SourceUnderTest};
use registry_core::SourceWorker;
use source_local::{LocalConfig, LocalSource};
use support::{launch, WAIT};
use testkit::eventually;

/// Small, so that the gap test writes little.
const RETENTION: u64 = 4096;

/// Starts each script with the legacy launcher into a spool directory, and waits until the
/// source lists the worker by its name.
struct LauncherHarness {
    spool: PathBuf,
    events_to_overflow: usize,
}

#[async_trait::async_trait]
impl Harness for LauncherHarness {
    async fn start_shell(
        &self,
        source: &dyn SourceUnderTest,
        script: &str,
        name: &str,
    ) -> Result<SourceWorker> {
        // The suite ends its workers itself (by stop, or the file its scripts watch for).
        launch(&self.spool, name, script, &[]).await?.detach();
        let what = format!("the source to list the worker {name:?}");
        eventually(&what, WAIT, || async move {
            let list = source
                .list()
                .await
                .context("list while waiting for a worker")?;
            Ok(list.into_iter().find(|w| w.name.as_deref() == Some(name)))
        })
        .await
    }

    fn output_retention(&self) -> Option<u64> {
        Some(RETENTION)
    }

    fn events_to_overflow(&self) -> Option<usize> {
        Some(self.events_to_overflow)
    }

    fn streams_merged(&self) -> bool {
        true
    }

    fn test_timeout(&self) -> Duration {
        // The overflow test starts some 260 launchers one after another.
        Duration::from_secs(180)
    }
}

fn source(spool: &Path) -> Result<LocalSource> {
    let mut config = LocalConfig::new(spool);
    config.output_retention = RETENTION;
    Ok(LocalSource::new(config)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_local_concrete_type_and_as_dyn_runtime_source() -> Result<()> {
    let spool = tempfile::tempdir()?;
    let source = source(spool.path())?;
    let harness = LauncherHarness {
        spool: spool.path().to_path_buf(),
        events_to_overflow: source.events_to_overflow(),
    };
    // Every test ran and passed but the one that needs spawning.
    let expected = Expected::not_applicable(&["spawn_is_idempotent_by_request_id"]).and_passed(&[
        "output_beyond_retention_starts_with_gap",
        "events_overflow_is_followed_by_resync",
        "unsupported_operations_return_unsupported",
        "stop_escalates_to_kill_after_grace",
        "input_reaches_the_worker",
    ]);
    run_concrete_and_dyn(source, &harness, &expected).await?;
    Ok(())
}
