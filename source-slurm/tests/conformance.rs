//! The registry core's conformance suite, run on the slurm source against the real
//! one-node test cluster, as its concrete type and as `Arc<dyn RuntimeSource>`.

mod common;

use std::time::Duration;

use registry_core::conformance::{run_concrete_and_dyn, Expected, SpawnHarness};

/// Small, so that the gap test writes little.
const RETENTION: u64 = 4096;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_concrete_type_and_as_dyn_runtime_source() -> anyhow::Result<()> {
    let Some(cluster) = common::cluster().await else {
        return Ok(());
    };
    let dirs = common::Dirs::new(&cluster);
    let config = source_slurm::SlurmConfig {
        output_retention: RETENTION,
        ..cluster.config(dirs.output.path())
    };
    let source = common::source(config, &dirs).await;
    let harness = SpawnHarness::with_profile("shell")
        .with_output_retention(RETENTION)
        .with_events_to_overflow(source.events_to_overflow())
        // Generous: a loaded machine schedules jobs slowly, and the overflow test makes
        // one job per event the stream can hold.
        .with_test_timeout(Duration::from_secs(240));
    // No input (a batch job has no stdin to write) and no restart: the suite checks that
    // both are refused, and the input tests do not apply.
    let expected = Expected::not_applicable(&[
        "input_reaches_the_worker",
        "input_to_ended_worker_is_conflict",
    ])
    .and_passed(&["unsupported_operations_return_unsupported"]);
    run_concrete_and_dyn(source, &harness, &expected).await?;
    Ok(())
}
