//! The README's curl walk-through, run as written (bash, curl) against the real `roster`
//! binary with the default config: the block marked `<!-- walkthrough: … -->`.

mod common;

use std::io::Read as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};

use common::process::Roster;

/// The shell block that follows the walk-through marker in the README.
fn walkthrough() -> Result<String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))?;
    let after = readme
        .split_once("<!-- walkthrough:")
        .context("the README has no walk-through marker")?
        .1;
    let block = after
        .split_once("```sh\n")
        .context("no shell block after the marker")?
        .1;
    let (block, _) = block.split_once("\n```").context("an unclosed block")?;
    Ok(block.to_string())
}

#[test]
fn the_readme_curl_walkthrough_runs_as_written() -> Result<()> {
    if Command::new("curl").arg("--version").output().is_err() {
        ensure!(
            std::env::var_os("CI").is_none(),
            "curl is not installed (.ci/run installs it)"
        );
        eprintln!("curl is not installed: the walk-through was not run");
        return Ok(());
    }
    let script = walkthrough()?;
    ensure!(
        script.contains("W=$("),
        "the walk-through sets W:\n{script}"
    );
    let dir = tempfile::tempdir()?;
    let (roster, addr) = Roster::serve(&dir.path().join("state"), &[], &[])?;
    let mut child = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .env("R", format!("http://{addr}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the walk-through did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reader.join().unwrap_or_default();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    ensure!(
        status.success(),
        "the walk-through failed ({status}):\n{out}\n{err}\nserver:\n{}",
        roster.output()
    );
    for needle in [
        "\"name\":\"demo\"",
        "got line",
        "event: end",
        "event: snapshot",
        "{\"status\":\"ready\"}",
        "roster_http_requests_total",
        "\"openapi\"",
    ] {
        ensure!(
            out.contains(needle),
            "the walk-through's output lacks {needle:?}:\n{out}"
        );
    }
    Ok(())
}
