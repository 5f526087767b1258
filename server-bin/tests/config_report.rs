//! `roster check-config` and a failed start report every error of the file, in file
//! order, each with its line, the key, what was expected in plain words and the fix where
//! one is known: the real binary on a real file.

mod common;

use std::time::Duration;

use anyhow::{ensure, Result};

use common::process::Roster;

/// Errors in `[server]`, in a token, in two runtimes' tables and in a profile, written so
/// that an alphabetical reading would give them in another order.
const MANY_ERRORS: &str = r#"[server]
listen = "127.0.0.1:0"
subscriber_queue = "lots"
lisen = "127.0.0.1:1"

[[runtimes]]
name = "local"
source = "embedded"
max_workers = "many"
allow_commands = "yes"
[runtimes.profiles.shell]
command = ["/bin/sh", "-c"]
grace = "soon"

[[runtimes]]
name = "legacy"
source = "local"
spool_dir = "/nonexistent-spool"
max_workerz = 3
"#;

fn run(args: &[&str]) -> Result<(bool, String)> {
    let roster = Roster::spawn(args, &[])?;
    let (status, out, err) = roster.finish(Duration::from_secs(60))?;
    Ok((status.success(), format!("{out}{err}")))
}

/// The `line N:` of each error line of `output`, in order.
fn lines_of(output: &str) -> Vec<usize> {
    output
        .lines()
        .filter_map(|l| l.split("line ").nth(1)?.split(':').next()?.parse().ok())
        .collect()
}

fn assert_every_error(output: &str) -> Result<()> {
    let expected: [(usize, &[&str]); 6] = [
        (
            3,
            &[
                "`server.subscriber_queue`",
                "expected a whole number (0 or more), found the string \"lots\"",
            ],
        ),
        (4, &["`lisen`", "did you mean `listen`?"]),
        (9, &["runtime \"local\"", "`max_workers`", "a whole number"]),
        (
            10,
            &[
                "runtime \"local\"",
                "`allow_commands`",
                "expected true or false",
            ],
        ),
        (
            13,
            &[
                "runtime \"local\"",
                "profiles.shell",
                "not a duration",
                "\"10s\"",
            ],
        ),
        (
            19,
            &[
                "runtime \"legacy\"",
                "`max_workerz`",
                "did you mean `max_workers`?",
            ],
        ),
    ];
    let lines = lines_of(output);
    ensure!(
        lines == expected.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
        "every error once, in file order; got lines {lines:?}:\n{output}"
    );
    for (line, needles) in expected {
        let text = output
            .lines()
            .find(|l| l.contains(&format!("line {line}:")))
            .unwrap_or_default();
        for needle in needles {
            ensure!(
                text.contains(needle),
                "line {line} lacks {needle:?}: {text}"
            );
        }
        for rust in ["usize", "u64", "a sequence", "expected a boolean"] {
            ensure!(
                !text.contains(rust),
                "line {line} speaks Rust ({rust}): {text}"
            );
        }
    }
    ensure!(output.contains("6 errors in"), "{output}");
    Ok(())
}

#[test]
fn check_config_reports_every_error_in_file_order_in_plain_words() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("roster.toml");
    std::fs::write(&file, MANY_ERRORS)?;
    let (ok, output) = run(&["check-config", file.to_str().unwrap()])?;
    ensure!(!ok, "check-config accepted a wrong file:\n{output}");
    assert_every_error(&output)
}

#[test]
fn a_start_on_a_wrong_file_reports_every_error_too() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("roster.toml");
    std::fs::write(&file, MANY_ERRORS)?;
    let state = dir.path().join("state");
    let (ok, output) = run(&[
        "serve",
        "--config",
        file.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ])?;
    ensure!(!ok, "roster started on a wrong file:\n{output}");
    assert_every_error(&output)
}

#[test]
fn a_start_whose_sources_fail_reports_each_of_them() -> Result<()> {
    // The file itself reads; only building the sources finds the errors.
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("roster.toml");
    std::fs::write(
        &file,
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[runtimes]]\nname = \"a\"\nsource = \"embedded\"\n\
         max_finished = -1\n\n[[runtimes]]\nname = \"b\"\nsource = \"remote\"\n\
         url = \"http://127.0.0.1:9\"\nremote_runtime = \"local\"\nbackoff_cap = \"1ms\"\n",
    )?;
    let state = dir.path().join("state");
    let (ok, output) = run(&[
        "serve",
        "--config",
        file.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ])?;
    ensure!(!ok, "roster started:\n{output}");
    ensure!(lines_of(&output) == [7, 14], "{output}");
    ensure!(
        output.contains("`backoff_cap` must be at least `backoff_base`"),
        "{output}"
    );
    Ok(())
}
