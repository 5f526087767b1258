//! The registry core's conformance suite, run on the docker source against the real engines,
//! as its concrete type and as `Arc<dyn RuntimeSource>`: Docker Engine, then Podman's
//! Docker-compatible service (the same suite, another socket).

mod common;

use std::time::Duration;

use registry_core::conformance::{run_concrete_and_dyn, Expected, SpawnHarness};

/// Small, so that the gap test writes little.
const RETENTION: u64 = 4096;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_concrete_type_and_as_dyn_runtime_source() -> anyhow::Result<()> {
    let Some(socket) = common::engine().await else {
        return Ok(());
    };
    conformance_on(&socket).await
}

/// The same suite against Podman's Docker-compatible service (`scripts/start-podman`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_against_podman_concrete_type_and_as_dyn_runtime_source() -> anyhow::Result<()>
{
    let Some(socket) = common::podman().await else {
        return Ok(());
    };
    conformance_on(&socket).await
}

/// One engine's suite at a time: both at once on a loaded 2-core machine slow container
/// stops past the suite's own 10 s waits.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn conformance_on(socket: &str) -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let state = common::StateDir::new(socket);
    let config = source_docker::DockerConfig {
        output_retention: RETENTION,
        ..common::config(socket)
    };
    let source = common::source(config, state.path()).await;
    let harness = SpawnHarness::with_profile("shell")
        .with_output_retention(RETENTION)
        .with_events_to_overflow(source.events_to_overflow())
        // Generous: a loaded machine makes containers slowly, and the overflow test makes
        // one per event the stream can hold.
        .with_test_timeout(Duration::from_secs(180));
    // No restart capability (a restart would be a new container): the suite checks that a
    // spawn asking for one is refused.
    let expected =
        Expected::not_applicable(&[]).and_passed(&["unsupported_operations_return_unsupported"]);
    run_concrete_and_dyn(source, &harness, &expected).await?;
    Ok(())
}
