//! The registry core's conformance suite on the remote source, against a real upstream
//! roster server started in the test (an embedded runtime behind the HTTP API).

mod common;

use std::sync::Arc;

use anyhow::Result;
use registry_core::conformance::{run_all, Report, SpawnHarness, TESTS};
use registry_core::{RuntimeId, RuntimeSource, SourceConfig};
use server_bin::ServeOptions;
use source_remote::RemoteSource;

use common::{config, TestServer};

/// Small, so that the gap test writes little.
const RETENTION: u64 = 4096;

async fn upstream() -> Result<TestServer> {
    TestServer::start_with(
        config(&format!("output_retention = {RETENTION}")),
        ServeOptions::default(),
    )
    .await
}

fn remote(upstream: &TestServer) -> Result<RemoteSource> {
    let table: toml::Table = format!(
        "url = \"http://{}\"\nremote_runtime = \"local\"",
        upstream.addr
    )
    .parse()?;
    let config = SourceConfig {
        runtime_id: RuntimeId::new("far")?,
        table,
        state_dir: std::env::temp_dir(),
    };
    Ok(RemoteSource::from_config(&config)?)
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
async fn conformance_remote_concrete_type() -> Result<()> {
    let up = upstream().await?;
    let source = remote(&up)?;
    let harness = SpawnHarness::with_profile("shell")
        .with_output_retention(RETENTION)
        .with_events_to_overflow(source.events_to_overflow());
    let report = run_all(&source, &harness).await?;
    assert_complete(&report);
    source.shutdown(None).await;
    up.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_remote_as_dyn_runtime_source() -> Result<()> {
    let up = upstream().await?;
    let concrete = remote(&up)?;
    let overflow = concrete.events_to_overflow();
    let source: Arc<dyn RuntimeSource> = Arc::new(concrete);
    let harness = SpawnHarness::with_command()
        .with_output_retention(RETENTION)
        .with_events_to_overflow(overflow);
    let report = run_all(&*source, &harness).await?;
    assert_complete(&report);
    source.shutdown(None).await;
    up.stop().await?;
    Ok(())
}
