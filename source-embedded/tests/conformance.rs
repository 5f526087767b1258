//! The registry core's conformance suite, run on the embedded source as its concrete type
//! and as `Arc<dyn RuntimeSource>`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use registry_core::conformance::{run_all, Report, SpawnHarness, TESTS};
use registry_core::{
    Capabilities, OutputRequest, OutputStream, RegistryError, RuntimeSource, SourceEvents,
    SourceHealth, SourceKey, SourceWorker, SpawnRequest,
};
use source_embedded::{EmbeddedConfig, EmbeddedSource};
use worker_runtime::Profile;

/// Small, so that the gap test writes little.
const RETENTION: u64 = 4096;

fn config() -> EmbeddedConfig {
    let shell = Profile {
        command: vec!["/bin/sh".into(), "-c".into()],
        ..Default::default()
    };
    EmbeddedConfig {
        allow_commands: true,
        profiles: BTreeMap::from([("shell".to_string(), shell)]),
        output_retention: RETENTION,
        // Small, so that the overflow test needs few workers.
        event_retention: 16,
        ..Default::default()
    }
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
    for name in [
        "output_beyond_retention_starts_with_gap",
        "events_overflow_is_followed_by_resync",
        "spawn_is_idempotent_by_request_id",
    ] {
        assert!(
            report.passed.contains(&name),
            "{name} did not pass: {report}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_concrete_type() -> anyhow::Result<()> {
    let source = EmbeddedSource::new(config())?;
    let harness = SpawnHarness::with_profile("shell")
        .with_output_retention(RETENTION)
        .with_events_to_overflow(source.events_to_overflow());
    let report = run_all(&source, &harness).await?;
    assert_complete(&report);
    source.shutdown(None).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_as_dyn_runtime_source() -> anyhow::Result<()> {
    let concrete = EmbeddedSource::new(config())?;
    let overflow = concrete.events_to_overflow();
    let source: Arc<dyn RuntimeSource> = Arc::new(concrete);
    // By command this time, which the config allows.
    let harness = SpawnHarness::with_command()
        .with_output_retention(RETENTION)
        .with_events_to_overflow(overflow);
    let report = run_all(&*source, &harness).await?;
    assert_complete(&report);
    source.shutdown(None).await;
    Ok(())
}

/// The embedded source with input and removal switched off, as a source that lacks them
/// would be: it says so in its capabilities and refuses them with `Unsupported`.
#[derive(Debug)]
struct WithoutInputAndRemove(EmbeddedSource);

#[async_trait::async_trait]
impl RuntimeSource for WithoutInputAndRemove {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            input: false,
            remove: false,
            ..self.0.capabilities()
        }
    }
    async fn health(&self) -> SourceHealth {
        self.0.health().await
    }
    async fn list(&self) -> Result<Vec<SourceWorker>, RegistryError> {
        self.0.list().await
    }
    async fn get(&self, key: &SourceKey) -> Result<SourceWorker, RegistryError> {
        self.0.get(key).await
    }
    async fn spawn(&self, request: SpawnRequest) -> Result<SourceWorker, RegistryError> {
        self.0.spawn(request).await
    }
    async fn stop(&self, key: &SourceKey, grace: Option<Duration>) -> Result<(), RegistryError> {
        self.0.stop(key, grace).await
    }
    async fn input(&self, _: &SourceKey, _: Bytes) -> Result<(), RegistryError> {
        Err(RegistryError::Unsupported("no input here".into()))
    }
    async fn remove(&self, _: &SourceKey) -> Result<(), RegistryError> {
        Err(RegistryError::Unsupported("no removal here".into()))
    }
    async fn events(&self) -> Result<SourceEvents, RegistryError> {
        self.0.events().await
    }
    async fn output(
        &self,
        key: &SourceKey,
        request: OutputRequest,
    ) -> Result<OutputStream, RegistryError> {
        self.0.output(key, request).await
    }
    async fn shutdown(&self, grace: Option<Duration>) {
        self.0.shutdown(grace).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_picks_tests_by_capabilities_and_checks_unsupported() -> anyhow::Result<()> {
    let source = WithoutInputAndRemove(EmbeddedSource::new(config())?);
    let harness = SpawnHarness::with_profile("shell")
        .with_output_retention(RETENTION)
        .with_events_to_overflow(source.0.events_to_overflow());
    let report = run_all(&source, &harness).await?;
    println!("{report}");
    assert!(
        report
            .passed
            .contains(&"unsupported_operations_return_unsupported"),
        "{report}"
    );
    let not_applicable: Vec<&str> = report.not_applicable.iter().map(|s| s.name).collect();
    for name in [
        "input_reaches_the_worker",
        "input_to_ended_worker_is_conflict",
        "remove_live_is_conflict_and_remove_terminal_removes",
    ] {
        assert!(not_applicable.contains(&name), "{name}: {report}");
    }
    assert!(
        report
            .passed
            .contains(&"stop_escalates_to_kill_after_grace"),
        "{report}"
    );
    source.shutdown(None).await;
    Ok(())
}
