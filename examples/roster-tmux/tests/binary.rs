//! The `roster-tmux` binary: `roster`'s command line with the `tmux` kind added. Checked as a
//! user runs it: `check-config` of a config with a tmux runtime, `serve` with a worker that is
//! a real tmux session, and SIGTERM, after which the session is gone (the tmux kind owns its
//! sessions and stops them on shutdown).
//!
//! Needs the `tmux` program (CI installs it).

#[path = "../../../server-bin/tests/common/mod.rs"]
mod common;
mod tmux_server;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::{json, Value};

use common::process::Roster;
use common::{request_to, unique};
use tmux_server::TmuxServer;

const BIN: &str = env!("CARGO_BIN_EXE_roster-tmux");
const DEADLINE: Duration = Duration::from_secs(20);

fn write_config(dir: &Path, socket: &str) -> Result<std::path::PathBuf> {
    let path = dir.join("roster.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[[runtimes]]\nname = \"sessions\"\n\
             source = \"tmux\"\nsocket_name = \"{socket}\"\n\
             [runtimes.profiles.shell]\ncommand = [\"/bin/sh\", \"-c\"]\n"
        ),
    )?;
    Ok(path)
}

#[test]
fn check_config_knows_the_tmux_kind_and_names_a_bad_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = write_config(dir.path(), &unique("roster-bin"))?;
    let config = config.to_str().context("a UTF-8 path")?;
    let (status, _, stderr) =
        Roster::spawn_program(Path::new(BIN), None, &["check-config", config], &[])?
            .finish(DEADLINE)?;
    ensure!(status.success(), "check-config failed: {stderr}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[runtimes]]\nname = \"sessions\"\nsource = \"tmux\"\nsocket_nmae = \"x\"\n",
    )?;
    let bad = bad.to_str().context("a UTF-8 path")?;
    let (status, stdout, stderr) =
        Roster::spawn_program(Path::new(BIN), None, &["check-config", bad], &[])?
            .finish(DEADLINE)?;
    ensure!(!status.success(), "a misspelt key must be refused");
    let said = format!("{stdout}{stderr}");
    ensure!(
        said.contains("socket_nmae"),
        "the error names the key: {said}"
    );

    // The plain `roster` does not know the kind; this binary's `--help` is roster's.
    let (status, stdout, _) =
        Roster::spawn_program(Path::new(BIN), None, &["--help"], &[])?.finish(DEADLINE)?;
    ensure!(status.success());
    ensure!(
        stdout.contains("check-config") && stdout.contains("serve"),
        "{stdout}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_is_a_tmux_session_and_sigterm_ends_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let socket = unique("roster-bin");
    let tmux = TmuxServer(socket.clone());
    let config = write_config(dir.path(), &socket)?;
    let config = config.to_str().context("a UTF-8 path")?;
    let state = dir.path().join("state");
    let state = state.to_str().context("a UTF-8 path")?;
    let mut roster = Roster::spawn_program(
        Path::new(BIN),
        None,
        &["serve", "--config", config, "--state-dir", state],
        &[],
    )?;
    let addr = tokio::task::block_in_place(|| roster.wait_serving())?;

    let body = json!({ "profile": "shell", "args": ["echo up; while :; do sleep 0.1; done"],
                       "name": "in-tmux" })
    .to_string();
    let spawned = request_to(
        addr,
        http::Method::POST,
        "/v1/runtimes/sessions/workers",
        &[],
        Some(&body),
    )
    .await?;
    ensure!(spawned.status == 201, "spawn: {}", spawned.text());
    let id = spawned.created_id()?;

    let deadline = Instant::now() + DEADLINE;
    loop {
        let worker: Value = request_to(
            addr,
            http::Method::GET,
            &format!("/v1/workers/{id}"),
            &[],
            None,
        )
        .await?
        .json()?;
        if worker["state"] == "running" && tmux.sessions().len() == 1 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "no running worker in one tmux session: {worker}, {:?}",
                tmux.sessions()
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    let status = tokio::task::block_in_place(|| roster.terminate())?;
    ensure!(status.success(), "roster-tmux exits 0 on SIGTERM: {status}");
    let deadline = Instant::now() + DEADLINE;
    while !tmux.sessions().is_empty() {
        ensure!(
            Instant::now() < deadline,
            "the session outlived roster-tmux: {:?}",
            tmux.sessions()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(())
}
