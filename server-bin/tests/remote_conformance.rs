//! The registry core's conformance suite on the remote source, against a real upstream
//! roster server started in the test (an embedded runtime behind the HTTP API).

mod common;

use anyhow::Result;
use registry_core::conformance::{run_concrete_and_dyn, Expected, SpawnHarness};
use registry_core::{RuntimeId, SourceConfig, SourceKind};
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
        table: table.into(),
        state_dir: std::env::temp_dir().into(),
    };
    Ok(RemoteSource::from_config(&config)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_remote_concrete_type_and_as_dyn_runtime_source() -> Result<()> {
    let up = upstream().await?;
    let source = remote(&up)?;
    let harness = SpawnHarness::with_profile("shell")
        .with_output_retention(RETENTION)
        .with_events_to_overflow(source.events_to_overflow());
    // Every test ran and passed but the one that needs a missing capability.
    let expected = Expected::not_applicable(&["unsupported_operations_return_unsupported"]);
    run_concrete_and_dyn(source, &harness, &expected).await?;
    up.stop().await?;
    Ok(())
}
