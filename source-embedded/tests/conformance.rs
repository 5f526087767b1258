//! The registry core's conformance suite, run on the embedded source as its concrete type
//! and as `Arc<dyn RuntimeSource>`.

use std::collections::BTreeMap;
use std::time::Duration;

use registry_core::conformance::{
    run_all, run_concrete_and_dyn_with, Expected, Harness, SpawnHarness,
};
use registry_core::{Capabilities, RuntimeSource, SourceWorker, SpawnRequest};
use source_embedded::{EmbeddedConfig, EmbeddedSource};
use testkit::Fake;
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
const EXPECTED: Expected = Expected {
    not_applicable: &["unsupported_operations_return_unsupported"],
    passed: &[
        "output_beyond_retention_starts_with_gap",
        "events_overflow_is_followed_by_resync",
        "spawn_is_idempotent_by_request_id",
    ],
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_concrete_type_and_as_dyn_runtime_source() -> anyhow::Result<()> {
    let source = EmbeddedSource::new(config())?;
    let by_profile = SpawnHarness::with_profile("shell")
        .with_output_retention(RETENTION)
        .with_events_to_overflow(source.events_to_overflow());
    // As `Arc<dyn RuntimeSource>` by command, which the config allows.
    let by_command = SpawnHarness::with_command()
        .with_output_retention(RETENTION)
        .with_events_to_overflow(source.events_to_overflow());
    run_concrete_and_dyn_with(source, [&by_profile, &by_command], &EXPECTED).await?;
    Ok(())
}

/// The embedded source with some capabilities switched off, as a source that lacks them
/// would be: it says so in its capabilities and refuses them with `Unsupported`.
fn restricted(inner: EmbeddedSource, off: impl FnOnce(&mut Capabilities)) -> Fake<EmbeddedSource> {
    Fake::new(inner).with_capabilities(off)
}

/// A harness that takes its time: each worker it starts is handed back only `delay` after
/// the spawn, as a harness that waits for an outside launcher might.
#[derive(Debug)]
struct SlowHarness {
    inner: SpawnHarness,
    delay: Duration,
}

#[async_trait::async_trait]
impl Harness for SlowHarness {
    async fn start_shell(
        &self,
        // Named in full: in scope, its methods would clash with `RuntimeSource`'s.
        source: &dyn registry_core::conformance::SourceUnderTest,
        script: &str,
        name: &str,
    ) -> anyhow::Result<SourceWorker> {
        let worker = self.inner.start_shell(source, script, name).await?;
        // A deliberate delay that stands for a slow harness, not a wait for a condition.
        tokio::time::sleep(self.delay).await;
        Ok(worker)
    }
    fn shell_request(&self, script: &str) -> Option<SpawnRequest> {
        self.inner.shell_request(script)
    }
    fn output_retention(&self) -> Option<u64> {
        self.inner.output_retention()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_without_stop_ends_live_workers_by_itself() -> anyhow::Result<()> {
    let source = restricted(EmbeddedSource::new(config())?, |c| c.stop = false);
    let harness = SpawnHarness::with_profile("shell")
        .with_output_retention(RETENTION)
        .with_events_to_overflow(source.inner().events_to_overflow());
    let report = run_all(&source, &harness).await?;
    println!("{report}");
    assert!(report.skipped.is_empty(), "{report}");
    for name in [
        "spawn_list_and_get_agree",
        "output_end_follows_last_chunk_and_no_follow_closes",
        "events_start_with_resync_equal_to_list",
        "remove_live_is_conflict_and_remove_terminal_removes",
        "unsupported_operations_return_unsupported",
    ] {
        assert!(report.passed.contains(&name), "{name}: {report}");
    }
    assert!(source
        .inner()
        .list()
        .await?
        .iter()
        .all(|w| w.state.is_terminal()));
    source.shutdown(None).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_workers_of_the_suite_outlive_a_slow_harness() -> anyhow::Result<()> {
    use registry_core::conformance as suite;
    let harness = SlowHarness {
        inner: SpawnHarness::with_profile("shell").with_output_retention(RETENTION),
        delay: Duration::from_secs(4),
    };
    // Each test that needs a live worker, on a source of its own (so they can run at once),
    // with stop switched off: only the script itself decides how long the worker lives.
    let sources = (0..5)
        .map(|_| {
            Ok(restricted(EmbeddedSource::new(config())?, |c| {
                c.stop = false
            }))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (a, b, c, d, e) = tokio::join!(
        suite::spawn_list_and_get_agree(&sources[0], &harness),
        suite::output_end_follows_last_chunk_and_no_follow_closes(&sources[1], &harness),
        suite::events_start_with_resync_equal_to_list(&sources[2], &harness),
        suite::remove_live_is_conflict_and_remove_terminal_removes(&sources[3], &harness),
        suite::unsupported_operations_return_unsupported(&sources[4], &harness),
    );
    for (name, result) in [
        ("spawn_list_and_get_agree", a),
        ("output_end_follows_last_chunk_and_no_follow_closes", b),
        ("events_start_with_resync_equal_to_list", c),
        ("remove_live_is_conflict_and_remove_terminal_removes", d),
        ("unsupported_operations_return_unsupported", e),
    ] {
        if let Err(error) = result {
            panic!("{name}: {error:#}");
        }
    }
    for source in &sources {
        source.shutdown(None).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_picks_tests_by_capabilities_and_checks_unsupported() -> anyhow::Result<()> {
    let source = restricted(EmbeddedSource::new(config())?, |c| {
        c.input = false;
        c.remove = false;
    });
    let harness = SpawnHarness::with_profile("shell")
        .with_output_retention(RETENTION)
        .with_events_to_overflow(source.inner().events_to_overflow());
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_messages_name_workers_by_name_never_by_key() -> anyhow::Result<()> {
    use registry_core::conformance as suite;
    // Broken on purpose: `list` is always empty.
    let source =
        restricted(EmbeddedSource::new(config())?, |_| {}).with_list(|| Some(Ok(Vec::new())));
    let harness = SpawnHarness::with_profile("shell");
    let failures = [
        suite::spawn_list_and_get_agree(&source, &harness).await,
        suite::events_start_with_resync_equal_to_list(&source, &harness).await,
    ];
    let keys: Vec<String> = RuntimeSource::list(source.inner())
        .await?
        .iter()
        .map(|w| w.key.as_str().to_string())
        .collect();
    assert!(keys.len() >= 2, "the tests started workers");
    for failure in failures {
        let message = format!("{:#}", failure.expect_err("list() is broken"));
        assert!(
            message.contains("\"conformance-"),
            "the message names the worker: {message}"
        );
        for key in &keys {
            assert!(!message.contains(key.as_str()), "a key leaked: {message}");
        }
    }
    source.shutdown(Some(Duration::ZERO)).await;
    Ok(())
}
