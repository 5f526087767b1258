//! The registry core's conformance suite, run on the tmux source (with a real tmux) as its
//! concrete type and as `Arc<dyn RuntimeSource>`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use registry_core::conformance::{run_all, Report, SpawnHarness, TESTS};
use registry_core::RuntimeSource;
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

/// Every test ran and passed but the one that needs a missing capability.
fn assert_complete(report: &Report) {
    println!("{report}");
    assert!(report.skipped.is_empty(), "{report}");
    let not_applicable: Vec<&str> = report.not_applicable.iter().map(|s| s.name).collect();
    assert_eq!(
        not_applicable,
        ["unsupported_operations_return_unsupported"],
        "{report}"
    );
    assert_eq!(report.passed.len(), TESTS.len() - 1, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_concrete_type() -> anyhow::Result<()> {
    let server = Server::new();
    let source = server.source_with(config(&server));
    let report = run_all(&source, &harness(source.events_to_overflow())).await?;
    assert_complete(&report);
    source.shutdown(None).await;
    assert!(
        server.sessions().is_empty(),
        "sessions left after shutdown: {:?}",
        server.sessions()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_as_dyn_runtime_source() -> anyhow::Result<()> {
    let server = Server::new();
    let concrete = server.source_with(config(&server));
    let overflow = concrete.events_to_overflow();
    let source: Arc<dyn RuntimeSource> = Arc::new(concrete);
    let report = run_all(&*source, &harness(overflow)).await?;
    assert_complete(&report);
    source.shutdown(None).await;
    assert!(server.sessions().is_empty(), "{:?}", server.sessions());
    Ok(())
}
