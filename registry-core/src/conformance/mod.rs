//! The conformance suite: the [`RuntimeSource`] contract as tests that every source crate
//! runs against itself (behind the `conformance` feature).
//!
//! Each test is a public async function named after the rule it checks, generic over the
//! source so that one crate can run it once on its concrete type and once on
//! `dyn RuntimeSource`:
//!
//! ```text
//! pub async fn rule_name<S: RuntimeSource + ?Sized>(source: &S, harness: &dyn Harness) -> anyhow::Result<()>
//! ```
//!
//! [`run_all`] runs every test the source's [`capabilities`](RuntimeSource::capabilities)
//! allow, each under a time limit, and returns a [`Report`] of what passed and what was
//! skipped; it fails with the name and error of every test that failed.
//!
//! # The harness
//!
//! The suite needs workers to test with. A [`Harness`] puts one on the source: a worker that
//! runs a `/bin/sh -c` script and is named as asked. For a source that can spawn, the
//! ready-made [`SpawnHarness`] builds the [`SpawnRequest`] (through a profile, a command, or a
//! closure of yours) and calls [`spawn`](RuntimeSource::spawn). A source that cannot spawn —
//! it observes workers an outside launcher starts — implements [`Harness::start_shell`]
//! itself: start the script the way that launcher would, then wait until the source reports
//! the worker (for instance by polling [`SourceUnderTest::list`] for its name).
//!
//! The harness also tells the suite what it cannot find out by itself:
//! [`output_retention`](Harness::output_retention) (for the test of output gaps) and
//! [`events_to_overflow`](Harness::events_to_overflow) (for the test of the `Resync` after a
//! lifecycle stream overflows). Where the harness does not know, those tests are reported as
//! skipped, never as passed.
//!
//! # Using it from a source crate
//!
//! In `Cargo.toml`:
//!
//! ```toml
//! [dev-dependencies]
//! anyhow = "1"
//! registry-core = { workspace = true, features = ["conformance"] }
//! tokio = { version = "1", features = ["full"] }
//! ```
//!
//! and a test that runs the suite on both the concrete type and `Arc<dyn RuntimeSource>`,
//! in one call, and checks that every test ran and passed but those the source's
//! capabilities rule out:
//!
//! ```no_run
//! use registry_core::conformance::{run_concrete_and_dyn, Expected, SpawnHarness};
//! use registry_core::RuntimeSource;
//!
//! async fn conformance<S: RuntimeSource>(source: S) -> anyhow::Result<()> {
//!     // Scripts run through the source's profile `shell` = ["/bin/sh", "-c"]; the source
//!     // keeps 4 KiB of output per worker and resyncs after 200 unread lifecycle events.
//!     let harness = SpawnHarness::with_profile("shell")
//!         .with_output_retention(4096)
//!         .with_events_to_overflow(200);
//!     // A source with every capability: only the test of missing ones does not apply.
//!     let expected = Expected::not_applicable(&["unsupported_operations_return_unsupported"]);
//!     run_concrete_and_dyn(source, &harness, &expected).await?;
//!     Ok(())
//! }
//! ```
//!
//! [`run_all`] runs the suite once, on any `S: RuntimeSource + ?Sized`, and returns the
//! [`Report`] for a test to judge itself.
//!
//! The tests start real workers (`/bin/sh`, `sleep`, `yes`, `head`), wait on conditions with
//! deadlines (never a bare sleep), and leave nothing running: after each test, [`run_all`]
//! stops and removes the workers the test started. Tests run one after another. A worker a
//! test needs live runs for about 300 s at most; on a source that cannot stop workers, the
//! suite ends it by creating a file in the temporary directory that its script watches for,
//! so such a source must run its workers on this machine.
//!
//! Failure messages and the suite's log name workers by their name, never by their source
//! key.

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use async_trait::async_trait;

use crate::{
    Capabilities, RegistryError, RuntimeSource, SourceKey, SourceWorker, SpawnRequest, WorkerState,
};

mod both;
mod checks;
mod util;

pub use both::{run_concrete_and_dyn, run_concrete_and_dyn_with, Expected};
pub use checks::*;

/// How long one test may take unless the harness says otherwise.
pub const DEFAULT_TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How the suite puts workers on a source, and what it should know about the source.
#[async_trait]
pub trait Harness: Send + Sync {
    /// Puts a worker on `source` that runs `script` with `/bin/sh -c` and is named `name`,
    /// and returns it as the source reports it (not yet terminal, unless the script ended
    /// already). The worker's stdin, stdout and stderr must be the ones the source serves.
    async fn start_shell(
        &self,
        source: &dyn SourceUnderTest,
        script: &str,
        name: &str,
    ) -> Result<SourceWorker>;

    /// A spawn request that runs `script` with `/bin/sh -c` on this source, for the tests of
    /// `spawn` itself (`request_id`, labels). `None` (a source that cannot spawn): those
    /// tests are skipped.
    fn shell_request(&self, script: &str) -> Option<SpawnRequest> {
        let _ = script;
        None
    }

    /// The bytes of output the source retains per worker. `None`: the test of output gaps
    /// is skipped.
    fn output_retention(&self) -> Option<u64> {
        None
    }

    /// How many unread lifecycle events make the source lose track of a stream (and owe it
    /// a fresh `Resync`). `None`: the test of that `Resync` is skipped.
    fn events_to_overflow(&self) -> Option<usize> {
        None
    }

    /// How long one test may take.
    fn test_timeout(&self) -> Duration {
        DEFAULT_TEST_TIMEOUT
    }

    /// Whether the source's workers write stdout and stderr into one stream (a log file, a
    /// terminal), which the source reports as `stdout`. The test of stream order then
    /// checks that each stream's lines keep their order within the merged output.
    fn streams_merged(&self) -> bool {
        false
    }
}

/// The part of the source under test a [`Harness`] may use to start a worker and find it.
///
/// The suite lends the source to the harness through this trait, because a source under
/// test may be unsized (`dyn RuntimeSource`). Every sized [`RuntimeSource`] is one.
#[async_trait]
pub trait SourceUnderTest: Send + Sync {
    /// As [`RuntimeSource::capabilities`].
    fn capabilities(&self) -> Capabilities;
    /// As [`RuntimeSource::list`].
    async fn list(&self) -> Result<Vec<SourceWorker>, RegistryError>;
    /// As [`RuntimeSource::get`].
    async fn get(&self, key: &SourceKey) -> Result<SourceWorker, RegistryError>;
    /// As [`RuntimeSource::spawn`].
    async fn spawn(&self, request: SpawnRequest) -> Result<SourceWorker, RegistryError>;
}

#[async_trait]
impl<T: RuntimeSource> SourceUnderTest for T {
    fn capabilities(&self) -> Capabilities {
        RuntimeSource::capabilities(self)
    }
    async fn list(&self) -> Result<Vec<SourceWorker>, RegistryError> {
        RuntimeSource::list(self).await
    }
    async fn get(&self, key: &SourceKey) -> Result<SourceWorker, RegistryError> {
        RuntimeSource::get(self, key).await
    }
    async fn spawn(&self, request: SpawnRequest) -> Result<SourceWorker, RegistryError> {
        RuntimeSource::spawn(self, request).await
    }
}

/// A borrowed source, sized, so that it can be lent as `&dyn SourceUnderTest`.
struct Lend<'a, S: ?Sized>(&'a S);

#[async_trait]
impl<S: RuntimeSource + ?Sized> SourceUnderTest for Lend<'_, S> {
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
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
}

type MakeRequest = dyn Fn(&str) -> SpawnRequest + Send + Sync;

/// A [`Harness`] for sources that can spawn: it builds a [`SpawnRequest`] for each script
/// and calls `spawn`.
#[derive(Clone)]
pub struct SpawnHarness {
    make: Arc<MakeRequest>,
    output_retention: Option<u64>,
    events_to_overflow: Option<usize>,
    test_timeout: Duration,
    streams_merged: bool,
}

impl SpawnHarness {
    /// Runs each script as the one argument of `profile`, whose command must end in
    /// `/bin/sh -c` (e.g. `command = ["/bin/sh", "-c"]`).
    pub fn with_profile(profile: impl Into<String>) -> Self {
        let profile = profile.into();
        Self::with_request(move |script| SpawnRequest {
            profile: Some(profile.clone()),
            args: vec![script.to_string()],
            ..Default::default()
        })
    }

    /// Runs each script as the command `["/bin/sh", "-c", script]`; the source must allow
    /// commands.
    pub fn with_command() -> Self {
        Self::with_request(|script| SpawnRequest {
            command: Some(vec!["/bin/sh".into(), "-c".into(), script.to_string()]),
            ..Default::default()
        })
    }

    /// Builds each request with `make(script)`; the request must run `script` with
    /// `/bin/sh -c`. The harness sets its `name`.
    pub fn with_request(make: impl Fn(&str) -> SpawnRequest + Send + Sync + 'static) -> Self {
        SpawnHarness {
            make: Arc::new(make),
            output_retention: None,
            events_to_overflow: None,
            test_timeout: DEFAULT_TEST_TIMEOUT,
            streams_merged: false,
        }
    }

    /// Tells the suite the source retains `bytes` of output per worker.
    pub fn with_output_retention(mut self, bytes: u64) -> Self {
        self.output_retention = Some(bytes);
        self
    }

    /// Tells the suite the source owes a fresh `Resync` after `events` unread lifecycle
    /// events.
    pub fn with_events_to_overflow(mut self, events: usize) -> Self {
        self.events_to_overflow = Some(events);
        self
    }

    /// Sets how long one test may take.
    pub fn with_test_timeout(mut self, timeout: Duration) -> Self {
        self.test_timeout = timeout;
        self
    }

    /// Tells the suite the source's workers write stdout and stderr into one stream
    /// (see [`Harness::streams_merged`]).
    pub fn with_streams_merged(mut self) -> Self {
        self.streams_merged = true;
        self
    }
}

impl fmt::Debug for SpawnHarness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpawnHarness")
            .field("output_retention", &self.output_retention)
            .field("events_to_overflow", &self.events_to_overflow)
            .field("test_timeout", &self.test_timeout)
            .field("streams_merged", &self.streams_merged)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Harness for SpawnHarness {
    async fn start_shell(
        &self,
        source: &dyn SourceUnderTest,
        script: &str,
        name: &str,
    ) -> Result<SourceWorker> {
        ensure!(
            source.capabilities().spawn,
            "SpawnHarness needs a source that can spawn; a source that cannot needs a Harness \
             of its own"
        );
        let mut request = (self.make)(script);
        request.name = Some(name.to_string());
        let worker = source
            .spawn(request)
            .await
            .context("spawn of a shell worker")?;
        if worker.state == WorkerState::Failed {
            bail!(
                "the source could not start the shell (state failed, reason {:?})",
                worker.reason
            );
        }
        Ok(worker)
    }

    fn shell_request(&self, script: &str) -> Option<SpawnRequest> {
        Some((self.make)(script))
    }

    fn output_retention(&self) -> Option<u64> {
        self.output_retention
    }

    fn events_to_overflow(&self) -> Option<usize> {
        self.events_to_overflow
    }

    fn test_timeout(&self) -> Duration {
        self.test_timeout
    }

    fn streams_merged(&self) -> bool {
        self.streams_merged
    }
}

/// A test that did not run, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The test's name.
    pub name: &'static str,
    /// Why it did not run.
    pub reason: String,
}

/// What [`run_all`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// Tests that ran and passed.
    pub passed: Vec<&'static str>,
    /// Tests that apply to the source but could not run: the harness did not give what
    /// they need.
    pub skipped: Vec<Skipped>,
    /// Tests the source's capabilities rule out (there is nothing for them to check).
    pub not_applicable: Vec<Skipped>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} passed, {} skipped, {} not applicable",
            self.passed.len(),
            self.skipped.len(),
            self.not_applicable.len()
        )?;
        for name in &self.passed {
            write!(f, "\n  passed          {name}")?;
        }
        for s in &self.skipped {
            write!(f, "\n  skipped         {}: {}", s.name, s.reason)?;
        }
        for s in &self.not_applicable {
            write!(f, "\n  not applicable  {}: {}", s.name, s.reason)?;
        }
        Ok(())
    }
}

/// What a test needs to run.
#[derive(Clone, Copy)]
enum Need {
    Spawn,
    Input,
    Stop,
    Output,
    Remove,
    SomeCapabilityMissing,
    ShellRequest,
    OutputRetention,
    EventsToOverflow,
}

impl Need {
    /// Whether a test with this need runs on this source with this harness.
    fn check(self, caps: Capabilities, harness: &dyn Harness) -> Gate {
        let lacks = |has: bool, what: &str| {
            if has {
                Gate::Run
            } else {
                Gate::NotApplicable(format!("the source cannot {what}"))
            }
        };
        let knob = |has: bool, what: &str| {
            if has {
                Gate::Run
            } else {
                Gate::Skip(format!("the harness gives no {what}"))
            }
        };
        match self {
            Need::Spawn => lacks(caps.spawn, "spawn"),
            Need::Input => lacks(caps.input, "take input"),
            Need::Stop => lacks(caps.stop, "stop workers"),
            Need::Output => lacks(caps.output, "stream output"),
            Need::Remove => lacks(caps.remove, "remove records"),
            Need::SomeCapabilityMissing => {
                if caps == Capabilities::ALL {
                    Gate::NotApplicable("the source has every capability".into())
                } else {
                    Gate::Run
                }
            }
            Need::ShellRequest => knob(harness.shell_request("exit 0").is_some(), "shell_request"),
            Need::OutputRetention => knob(harness.output_retention().is_some(), "output_retention"),
            Need::EventsToOverflow => {
                knob(harness.events_to_overflow().is_some(), "events_to_overflow")
            }
        }
    }
}

enum Gate {
    Run,
    Skip(String),
    NotApplicable(String),
}

/// Runs tests one after another and keeps the score.
struct Runner<'a, S: ?Sized> {
    source: &'a S,
    harness: &'a dyn Harness,
    report: Report,
    failed: Vec<(&'static str, String)>,
}

impl<'a, S: RuntimeSource + ?Sized> Runner<'a, S> {
    async fn run<F>(&mut self, name: &'static str, needs: &[Need], test: F)
    where
        F: Future<Output = Result<()>>,
    {
        let caps = self.source.capabilities();
        for need in needs {
            match need.check(caps, self.harness) {
                Gate::Run => {}
                Gate::Skip(reason) => {
                    self.report.skipped.push(Skipped { name, reason });
                    return;
                }
                Gate::NotApplicable(reason) => {
                    self.report.not_applicable.push(Skipped { name, reason });
                    return;
                }
            }
        }
        let before: BTreeSet<SourceKey> = match self.source.list().await {
            Ok(list) => list.into_iter().map(|w| w.key).collect(),
            Err(e) => {
                self.failed
                    .push((name, format!("list() before the test failed: {e}")));
                return;
            }
        };
        let limit = self.harness.test_timeout();
        let outcome = match tokio::time::timeout(limit, test).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(_) => Err(format!("did not finish within {limit:?}")),
        };
        match outcome {
            Ok(()) => self.report.passed.push(name),
            Err(e) => {
                tracing::warn!(test = name, error = %e, "conformance test failed");
                self.failed.push((name, e));
            }
        }
        tidy(self.source, &before).await;
    }
}

/// Stops and removes what a test left behind (after a failure, mostly).
async fn tidy<S: RuntimeSource + ?Sized>(source: &S, before: &BTreeSet<SourceKey>) {
    let Ok(list) = source.list().await else {
        return;
    };
    let caps = source.capabilities();
    let left: Vec<SourceWorker> = list
        .into_iter()
        .filter(|w| !before.contains(&w.key))
        .collect();
    for w in &left {
        if w.state.is_terminal() {
            continue;
        }
        if caps.stop {
            let _ = source.stop(&w.key, Some(Duration::from_millis(200))).await;
        } else {
            util::release(w);
        }
    }
    for w in &left {
        let _ = util::wait_terminal(source, &w.key).await;
        util::forget_release(w);
        if caps.remove {
            let _ = source.remove(&w.key).await;
        }
    }
}

macro_rules! suite {
    ($($test:ident needs [$($need:ident),*];)*) => {
        /// The name of every test, in the order [`run_all`] runs them.
        pub const TESTS: &[&str] = &[$(stringify!($test)),*];

        /// Runs every test the source's capabilities allow, one after another, each within
        /// the harness's [`test_timeout`](Harness::test_timeout).
        ///
        /// Returns the [`Report`] when no test failed; otherwise an error that names every
        /// failed test with what it expected and what it saw.
        pub async fn run_all<S: RuntimeSource + ?Sized>(
            source: &S,
            harness: &dyn Harness,
        ) -> Result<Report> {
            let mut runner = Runner {
                source,
                harness,
                report: Report::default(),
                failed: Vec::new(),
            };
            $(
                runner
                    .run(stringify!($test), &[$(Need::$need),*], $test(source, harness))
                    .await;
            )*
            if runner.failed.is_empty() {
                return Ok(runner.report);
            }
            let mut message = format!(
                "{} of {} conformance tests failed ({} passed, {} skipped, {} not applicable):",
                runner.failed.len(),
                TESTS.len(),
                runner.report.passed.len(),
                runner.report.skipped.len(),
                runner.report.not_applicable.len(),
            );
            for (name, error) in &runner.failed {
                message.push_str(&format!("\n- {name}: {error}"));
            }
            bail!(message)
        }
    };
}

suite! {
    spawn_list_and_get_agree needs [];
    spawn_is_idempotent_by_request_id needs [Spawn, ShellRequest];
    output_seq_starts_at_one_without_holes needs [Output];
    output_after_seq_sends_only_later_chunks needs [Output];
    output_after_beyond_last_seq_is_invalid_request needs [Output];
    output_beyond_retention_starts_with_gap needs [Output, OutputRetention];
    output_end_follows_last_chunk_and_no_follow_closes needs [Output];
    input_reaches_the_worker needs [Input, Output];
    input_to_ended_worker_is_conflict needs [Input];
    stop_with_grace_ends_stopped needs [Stop];
    stop_escalates_to_kill_after_grace needs [Stop, Output];
    stop_twice_succeeds_and_stop_on_terminal_is_noop needs [Stop];
    unknown_key_is_worker_not_found needs [];
    terminal_state_never_changes needs [];
    lifecycle_events_of_a_worker_come_in_order needs [];
    events_start_with_resync_equal_to_list needs [];
    remove_live_is_conflict_and_remove_terminal_removes needs [Remove];
    unsupported_operations_return_unsupported needs [SomeCapabilityMissing];
    events_overflow_is_followed_by_resync needs [EventsToOverflow];
}
