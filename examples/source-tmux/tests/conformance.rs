//! The registry core's conformance suite, run on the tmux source (with a real tmux) as its
//! concrete type and as `Arc<dyn RuntimeSource>`.

mod common;

use std::time::Duration;

use registry_core::conformance::{run_concrete_and_dyn, Expected, SpawnHarness};
use source_tmux::TmuxConfig;

use common::Server;

/// Small, so that the gap test writes little.
const RETENTION: u64 = 4096;

fn config(server: &Server) -> TmuxConfig {
    TmuxConfig {
        output_retention: RETENTION,
        allow_commands: true,
        ..server.config()
    }
}

fn harness(overflow: usize) -> SpawnHarness {
    SpawnHarness::with_profile("shell")
        .with_streams_merged()
        .with_output_retention(RETENTION)
        .with_events_to_overflow(overflow)
        // Generous: a loaded machine starts tmux sessions slowly, and the overflow test
        // starts one per event the stream can hold.
        .with_test_timeout(Duration::from_secs(120))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_concrete_type_and_as_dyn_runtime_source() -> anyhow::Result<()> {
    let server = Server::new();
    let source = server.source_with(config(&server));
    let harness = harness(source.events_to_overflow());
    // Every test ran and passed; the one of missing capabilities checks that a spawn with a
    // restart policy is refused (tmux sessions are not restarted).
    let expected =
        Expected::not_applicable(&[]).and_passed(&["unsupported_operations_return_unsupported"]);
    run_concrete_and_dyn(source, &harness, &expected).await?;
    assert!(
        server.sessions().is_empty(),
        "sessions left after shutdown: {:?}",
        server.sessions()
    );
    Ok(())
}
