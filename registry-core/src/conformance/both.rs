//! One call that runs the suite on a source twice — as its concrete type and as
//! `Arc<dyn RuntimeSource>` — and checks that each report is complete.

use std::sync::Arc;

use anyhow::{ensure, Context, Result};

use super::{run_all, Harness, Report, TESTS};
use crate::RuntimeSource;

/// What a source's run of the suite must come to: every test runs (none is skipped) and
/// passes, but exactly the ones the source's capabilities rule out.
#[derive(Debug, Clone, Copy, Default)]
pub struct Expected<'a> {
    /// The tests the source's capabilities rule out, in the suite's order ([`TESTS`]).
    pub not_applicable: &'a [&'a str],
    /// Tests that must be among those passed, named so that losing one reads as what it is.
    pub passed: &'a [&'a str],
}

impl<'a> Expected<'a> {
    /// Exactly `tests` are not applicable; every other test passes.
    pub fn not_applicable(tests: &'a [&'a str]) -> Self {
        Expected {
            not_applicable: tests,
            passed: &[],
        }
    }

    /// And `tests` are named among those passed.
    pub fn and_passed(self, tests: &'a [&'a str]) -> Self {
        Expected {
            passed: tests,
            ..self
        }
    }
}

impl Report {
    /// Whether this report is what `expected` says: nothing skipped, exactly
    /// `expected.not_applicable` ruled out, every other test passed. The error shows the
    /// whole report.
    pub fn check(&self, expected: &Expected<'_>) -> Result<()> {
        ensure!(self.skipped.is_empty(), "tests were skipped: {self}");
        let not_applicable: Vec<&str> = self.not_applicable.iter().map(|s| s.name).collect();
        ensure!(
            not_applicable == expected.not_applicable,
            "not applicable were {not_applicable:?}, expected {:?}: {self}",
            expected.not_applicable
        );
        ensure!(
            self.passed.len() == TESTS.len() - expected.not_applicable.len(),
            "not every other test passed: {self}"
        );
        for name in expected.passed {
            ensure!(self.passed.contains(name), "{name} did not pass: {self}");
        }
        Ok(())
    }
}

/// Runs the suite on `source` as its concrete type, then on the same source as
/// `Arc<dyn RuntimeSource>`, both with `harness`; checks each report against `expected`
/// (see [`Report::check`]), and shuts the source down. Returns the two reports.
pub async fn run_concrete_and_dyn<S: RuntimeSource>(
    source: S,
    harness: &dyn Harness,
    expected: &Expected<'_>,
) -> Result<[Report; 2]> {
    run_concrete_and_dyn_with(source, [harness, harness], expected).await
}

/// As [`run_concrete_and_dyn`], with a harness of each run's own: `harnesses[0]` for the
/// concrete type, `harnesses[1]` for `Arc<dyn RuntimeSource>` (to put workers on the
/// source in two ways, say by profile and by command).
pub async fn run_concrete_and_dyn_with<S: RuntimeSource>(
    source: S,
    harnesses: [&dyn Harness; 2],
    expected: &Expected<'_>,
) -> Result<[Report; 2]> {
    let concrete = run_all(&source, harnesses[0]).await;
    let source: Arc<dyn RuntimeSource> = Arc::new(source);
    let as_dyn = match concrete {
        Ok(_) => Some(run_all(&*source, harnesses[1]).await),
        Err(_) => None,
    };
    // Shut down before judging, so that a failure leaves nothing running.
    source.shutdown(None).await;
    let concrete = concrete.context("the suite on the concrete type")?;
    println!("the suite on the concrete type: {concrete}");
    concrete
        .check(expected)
        .context("the suite on the concrete type")?;
    let as_dyn = as_dyn
        .expect("run once the concrete type passed")
        .context("the suite on Arc<dyn RuntimeSource>")?;
    println!("the suite on Arc<dyn RuntimeSource>: {as_dyn}");
    as_dyn
        .check(expected)
        .context("the suite on Arc<dyn RuntimeSource>")?;
    Ok([concrete, as_dyn])
}
