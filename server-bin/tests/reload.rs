//! Reloading the config while the server runs, through the real server and real processes:
//! runtimes added, removed and changed while a client streams an untouched runtime's
//! output without a gap; `runtime.removed` seen live and on resume; a broken file that
//! changes nothing; new tokens in force; and `SIGHUP` and `roster reload` on the real binary.

mod common;

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context as _, Result};
use common::process::Roster;
use common::{eventually, request_to, SseClient, SseEvent, TestServer, WAIT};
use http::Method;
use serde_json::{json, Value};
use server_bin::config::Config;
use server_bin::{ReloadConfig, ServeOptions};

const SHELL: &str = "[runtimes.profiles.shell]\ncommand = [\"/bin/sh\", \"-c\"]\n";

/// `[[runtimes]]` of kind embedded with a `shell` profile, and `extra` keys before it.
fn embedded(name: &str, extra: &str) -> String {
    format!("[[runtimes]]\nname = \"{name}\"\nsource = \"embedded\"\n{extra}{SHELL}\n")
}

/// A server serving the config file `text` (written into `dir`), reloadable from it.
async fn start(dir: tempfile::TempDir, text: &str) -> Result<(TestServer, PathBuf)> {
    let path = dir.path().join("roster.toml");
    std::fs::write(&path, text)?;
    let state = dir.path().join("state");
    let mut config = Config::load(&path)?;
    config.server.state_dir = state.clone().into();
    let factories = server_bin::default_factories();
    let registry = server_bin::build_registry(&config, &factories).await?;
    let tokens = config.load_tokens()?;
    let options = ServeOptions {
        reload: Some(ReloadConfig {
            path: Some(path.clone().into()),
            listen: None,
            state_dir: Some(state.into()),
            factories,
            running: config.clone(),
            on_sighup: false,
        }),
        ..ServeOptions::from_config(&config.server, tokens)
    };
    Ok((
        TestServer::start_registry(registry, dir, options).await?,
        path,
    ))
}

async fn spawn(server: &TestServer, runtime: &str, script: &str) -> Result<String> {
    let body = json!({ "profile": "shell", "args": [script] }).to_string();
    server
        .post(&format!("/v1/runtimes/{runtime}/workers"), &body)
        .await?
        .created_id()
}

async fn runtime_ids(server: &TestServer) -> Result<Vec<String>> {
    let body = server.get("/v1/runtimes").await?.json()?;
    Ok(body["runtimes"]
        .as_array()
        .context("runtimes")?
        .iter()
        .filter_map(|r| r["id"].as_str().map(str::to_string))
        .collect())
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

/// The highest number among the output lines `line-N` of a chunk.
fn line_number(ev: &SseEvent) -> Option<u64> {
    ev.data["data"]
        .as_str()?
        .lines()
        .filter_map(|l| l.strip_prefix("line-")?.parse().ok())
        .max()
}

/// Reads output events up to the first whose line number is at least `upto`.
async fn read_lines_to(stream: &mut SseClient, upto: u64) -> Result<Vec<SseEvent>> {
    stream
        .read_until(|e| e.event == "output" && line_number(e).is_some_and(|n| n >= upto))
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_adds_removes_and_changes_runtimes_while_untouched_output_streams_on() -> Result<()>
{
    let first = [
        embedded("steady", ""),
        embedded("shifting", ""),
        embedded("doomed", ""),
        embedded("rebuilt", "max_workers = 4\n"),
    ]
    .concat();
    let (server, path) = start(tempfile::tempdir()?, &first).await?;
    let mut events = server.sse("/v1/events", &[]).await?;
    let snapshot = events.next_event().await?;
    ensure!(snapshot.event == "snapshot", "{snapshot:?}");
    let cursor = snapshot.id.clone().context("the snapshot's cursor")?;
    let mut doomed_only = server.sse("/v1/events?runtime=doomed", &[]).await?;

    // One line every 20 ms, numbered: a gap or a repeat in the stream would show.
    let ticker = spawn(
        &server,
        "steady",
        "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); echo line-$i; sleep 0.02; done",
    )
    .await?;
    let mut output = server
        .sse(&format!("/v1/workers/{ticker}/output"), &[])
        .await?;
    let before = read_lines_to(&mut output, 5).await?;
    let keeps = spawn(&server, "shifting", "sleep 60").await?;
    let doomed = spawn(&server, "doomed", "sleep 60").await?;
    let rebuilt = spawn(&server, "rebuilt", "sleep 60").await?;
    for id in [&keeps, &doomed, &rebuilt] {
        server.wait_worker(id, |w| w["state"] == "running").await?;
    }

    // `steady` as it was; `shifting` gains a profile (in place); `doomed` goes; `rebuilt`
    // changes a key its kind can't take in place (replaced); `fresh` is new.
    let greet = "[runtimes.profiles.greet]\ncommand = [\"/bin/echo\", \"hello from greet\"]\n";
    let second = [
        embedded("steady", ""),
        embedded("shifting", greet),
        embedded("rebuilt", "max_workers = 5\n"),
        embedded("fresh", ""),
    ]
    .concat();
    std::fs::write(&path, second)?;
    let resp = server.post("/v1/admin/reload", "{}").await?;
    ensure!(resp.status == 200, "{} {}", resp.status, resp.text());
    let outcome = resp.json()?;
    assert_eq!(strings(&outcome["added"]), ["fresh"]);
    assert_eq!(strings(&outcome["removed"]), ["doomed"]);
    assert_eq!(strings(&outcome["changed"]), ["shifting", "rebuilt"]);
    assert_eq!(strings(&outcome["replaced"]), ["rebuilt"]);
    assert_eq!(strings(&outcome["unchanged"]), ["steady"]);
    assert!(strings(&outcome["needs_restart"]).is_empty(), "{outcome}");

    // The untouched worker's stream goes on: every seq and every line, none twice.
    let reload_line = before.iter().filter_map(line_number).max().unwrap_or(0);
    let after = read_lines_to(&mut output, reload_line + 25).await?;
    let chunks: Vec<&SseEvent> = before
        .iter()
        .chain(after.iter())
        .filter(|e| e.event == "output")
        .collect();
    ensure!(
        !before.iter().chain(after.iter()).any(|e| e.event == "gap"),
        "a gap in the stream"
    );
    for pair in chunks.windows(2) {
        let (a, b) = (&pair[0].data["seq"], &pair[1].data["seq"]);
        ensure!(
            a.as_u64().map(|s| s + 1) == b.as_u64(),
            "seqs not contiguous across the reload: {a} then {b}"
        );
    }
    let text: String = chunks
        .iter()
        .filter_map(|e| e.data["data"].as_str())
        .collect();
    let numbers: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("line-")?.parse().ok())
        .collect();
    ensure!(
        numbers.windows(2).all(|p| p[1] == p[0] + 1) && numbers.first() == Some(&1),
        "lines not contiguous: {numbers:?}"
    );
    let steady = server.get(&format!("/v1/workers/{ticker}")).await?.json()?;
    assert_eq!(steady["state"], "running");

    // Changed in place: the running worker goes on, new spawns use the new profile.
    let kept = server.get(&format!("/v1/workers/{keeps}")).await?.json()?;
    assert_eq!(kept["state"], "running", "{kept}");
    let body = json!({ "profile": "greet" }).to_string();
    let greeted = server
        .post("/v1/runtimes/shifting/workers", &body)
        .await?
        .created_id()?;
    server
        .wait_worker(&greeted, |w| w["state"] == "exited")
        .await?;
    let said = server
        .get(&format!("/v1/workers/{greeted}/output?follow=0"))
        .await?
        .text();
    ensure!(said.contains("hello from greet"), "{said}");

    // Removed and replaced: their workers are gone; the added and the replaced runtimes run.
    let srv = &server;
    for gone in [&doomed, &rebuilt] {
        eventually("the worker's record removed", WAIT, || async move {
            let server = srv;
            let resp = server.get(&format!("/v1/workers/{gone}")).await?;
            Ok((resp.status == 404).then_some(()))
        })
        .await?;
    }
    assert_eq!(
        server.get("/v1/runtimes/doomed").await?.code(),
        "runtime_not_found"
    );
    let mut ids = runtime_ids(&server).await?;
    ids.sort();
    assert_eq!(ids, ["fresh", "rebuilt", "shifting", "steady"]);
    for runtime in ["fresh", "rebuilt"] {
        let id = spawn(&server, runtime, "echo ok").await?;
        server.wait_worker(&id, |w| w["state"] == "exited").await?;
    }

    // The subscriber saw the doomed worker stopped, removed, then its runtime removed.
    let seen = events
        .read_until(|e| e.event == "runtime.removed" && e.data["runtime_id"] == "doomed")
        .await?;
    check_removal(&seen, &doomed)?;
    let filtered = doomed_only
        .read_until(|e| e.event == "runtime.removed")
        .await?;
    check_removal(&filtered, &doomed)?;
    // A client resuming from before the reload gets all of it, without a reset.
    let mut resumed = server
        .sse("/v1/events", &[("last-event-id", &cursor)])
        .await?;
    let replay = resumed
        .read_until(|e| e.event == "runtime.removed" && e.data["runtime_id"] == "doomed")
        .await?;
    ensure!(
        !replay
            .iter()
            .any(|e| e.event == "reset" || e.event == "snapshot"),
        "{replay:?}"
    );
    check_removal(&replay, &doomed)?;
    ensure!(
        replay
            .iter()
            .any(|e| e.event == "runtime.updated" && e.data["runtime"]["id"] == "fresh"),
        "no runtime.updated for the added runtime: {replay:?}"
    );

    server
        .post(&format!("/v1/workers/{ticker}/stop"), "{}")
        .await?;
    drop((events, doomed_only, resumed, output));
    server.stop().await?;
    Ok(())
}

/// `worker` ended `stopped`, then `worker.removed`, then `runtime.removed` of `doomed`.
fn check_removal(events: &[SseEvent], worker: &str) -> Result<()> {
    let position = |f: &dyn Fn(&SseEvent) -> bool| events.iter().position(f);
    let stopped = position(&|e| {
        e.event == "worker.upserted"
            && e.data["worker"]["id"] == worker
            && e.data["worker"]["state"] == "stopped"
    });
    let removed = position(&|e| e.event == "worker.removed" && e.data["worker_id"] == worker);
    let gone = position(&|e| e.event == "runtime.removed" && e.data["runtime_id"] == "doomed");
    ensure!(
        matches!((stopped, removed, gone), (Some(a), Some(b), Some(c)) if a < b && b < c),
        "expected stopped, worker.removed, runtime.removed in order: {events:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_config_that_does_not_validate_changes_nothing() -> Result<()> {
    let first = [embedded("steady", ""), embedded("other", "")].concat();
    let (server, path) = start(tempfile::tempdir()?, &first).await?;
    let worker = spawn(&server, "steady", "sleep 60").await?;
    server
        .wait_worker(&worker, |w| w["state"] == "running")
        .await?;

    // `other` goes and `added` comes, but `added` has a key its kind does not know (line 6).
    let broken = format!(
        "{}[[runtimes]]\nname = \"added\"\nsource = \"embedded\"\nmax_wrokers = 3\n",
        embedded("steady", "")
    );
    let line = broken
        .lines()
        .position(|l| l.starts_with("max_wrokers"))
        .context("the bad line")?
        + 1;
    std::fs::write(&path, &broken)?;
    let resp = server.post("/v1/admin/reload", "{}").await?;
    assert_eq!(resp.status, 400, "{}", resp.text());
    assert_eq!(resp.code(), "invalid_request");
    let message = resp.json()?["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ensure!(
        message.contains(&format!("line {line}")) && message.contains("max_wrokers"),
        "the message names neither the line nor the key: {message}"
    );

    // A syntax error and an unknown [server] key: refused the same way.
    std::fs::write(&path, format!("{first}[server\n"))?;
    let resp = server.post("/v1/admin/reload", "").await?;
    assert_eq!(resp.status, 400, "{}", resp.text());
    std::fs::write(&path, format!("[server]\nlisten_on = \"x\"\n{first}"))?;
    let resp = server.post("/v1/admin/reload", "{}").await?;
    assert_eq!(resp.status, 400, "{}", resp.text());
    ensure!(resp.text().contains("line 2"), "{}", resp.text());
    // A body with an unknown field is the request's fault, not the file's.
    let resp = server
        .post("/v1/admin/reload", r#"{"force": true}"#)
        .await?;
    assert_eq!(resp.code(), "invalid_request");

    let mut ids = runtime_ids(&server).await?;
    ids.sort();
    assert_eq!(ids, ["other", "steady"]);
    let w = server.get(&format!("/v1/workers/{worker}")).await?.json()?;
    assert_eq!(w["state"], "running", "{w}");

    // The file fixed: the reload that follows does it.
    std::fs::write(&path, embedded("steady", ""))?;
    let resp = server.post("/v1/admin/reload", "").await?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(strings(&resp.json()?["removed"]), ["other"]);
    assert_eq!(runtime_ids(&server).await?, ["steady"]);
    let w = server.get(&format!("/v1/workers/{worker}")).await?.json()?;
    assert_eq!(w["state"], "running", "{w}");
    server
        .post(&format!("/v1/workers/{worker}/stop"), "{}")
        .await?;
    server.stop().await?;
    Ok(())
}

fn token_config(dir: &Path, extra_server: &str) -> String {
    format!(
        "[server]\n{extra_server}[[server.tokens]]\nname = \"ops\"\nscope = \"operate\"\n\
         token_file = \"{}\"\n{}",
        dir.join("ops.token").display(),
        embedded("steady", "")
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_puts_new_tokens_in_force_and_reports_what_needs_a_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let old = "old-secret-0123456789";
    let new = "new-secret-9876543210";
    std::fs::write(dir.path().join("ops.token"), old)?;
    let text = token_config(dir.path(), "");
    let changed = token_config(dir.path(), "max_body = \"2MiB\"\nmax_streams = 10\n");
    let (server, path) = start(dir, &text).await?;
    let call = |method: Method, path: &'static str, token: &str| {
        let (server, bearer) = (&server, format!("Bearer {token}"));
        let body = (method == Method::POST).then_some("{}");
        async move {
            server
                .request(method, path, &[("authorization", &bearer)], body)
                .await
        }
    };
    let reload = |token| call(Method::POST, "/v1/admin/reload", token);
    let get = |token| call(Method::GET, "/v1/runtimes", token);
    assert_eq!(server.post("/v1/admin/reload", "{}").await?.status, 401);

    // The secret rotated in its file and a key that takes a restart changed.
    let token_file = path.with_file_name("ops.token");
    std::fs::write(&token_file, new)?;
    std::fs::write(&path, &changed)?;
    let resp = reload(old).await?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let outcome = resp.json()?;
    assert_eq!(strings(&outcome["applied"]), ["server.tokens"]);
    assert_eq!(
        strings(&outcome["needs_restart"]),
        ["server.max_body", "server.max_streams"]
    );
    assert_eq!(strings(&outcome["unchanged"]), ["steady"]);

    assert_eq!(get(old).await?.status, 401);
    assert_eq!(get(new).await?.status, 200);
    // Still not restarted: reported again.
    let again = reload(new).await?.json()?;
    assert_eq!(
        strings(&again["needs_restart"]),
        ["server.max_body", "server.max_streams"]
    );
    assert!(strings(&again["applied"]).is_empty(), "{again}");
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_without_a_config_file_has_nothing_to_reload() -> Result<()> {
    let server = TestServer::start().await?;
    let resp = server.post("/v1/admin/reload", "{}").await?;
    assert_eq!(resp.status, 409, "{}", resp.text());
    assert_eq!(resp.code(), "conflict");
    server.stop().await?;
    Ok(())
}

/// `[server] listen` on an ephemeral loopback port, then the runtimes.
fn process_config(runtimes: &[String]) -> String {
    format!("[server]\nlisten = \"127.0.0.1:0\"\n{}", runtimes.concat())
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_and_roster_reload_reload_the_real_binary() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("roster.toml");
    let state = dir.path().join("state");
    std::fs::write(&path, process_config(&[embedded("a", "")]))?;
    let (mut roster, addr) = Roster::serve_config(&path, &state, &[])?;
    let call = |method: Method, path: String, body: Option<&'static str>| async move {
        request_to(addr, method, &path, &[], body).await
    };
    let resp = call(
        Method::POST,
        "/v1/runtimes/a/workers".into(),
        Some(r#"{"profile": "shell", "args": ["sleep 60"]}"#),
    )
    .await?;
    let worker = resp.created_id()?;

    // SIGHUP with a runtime added.
    std::fs::write(
        &path,
        process_config(&[embedded("a", ""), embedded("b", "")]),
    )?;
    roster.signal(libc::SIGHUP)?;
    eventually("runtime b added by SIGHUP", WAIT, || async {
        Ok((call(Method::GET, "/v1/runtimes/b".into(), None)
            .await?
            .status
            == 200)
            .then_some(()))
    })
    .await?;
    eventually("the reload logged", WAIT, || async {
        Ok(roster
            .stderr
            .text()
            .contains("config reloaded")
            .then_some(()))
    })
    .await?;

    // SIGHUP with a broken file: logged, nothing changes.
    let broken = process_config(&[embedded("a", "colour = \"red\"\n")]);
    let line = broken
        .lines()
        .position(|l| l.starts_with("colour"))
        .context("the bad line")?
        + 1;
    let at_line = format!("line {line}");
    std::fs::write(&path, &broken)?;
    roster.signal(libc::SIGHUP)?;
    eventually("the refusal logged", WAIT, || async {
        Ok(roster
            .stderr
            .text()
            .contains("config reload refused")
            .then_some(()))
    })
    .await?;
    let log = roster.stderr.text();
    ensure!(log.contains(&at_line) && log.contains("colour"), "{log}");
    let body = call(Method::GET, "/v1/runtimes".into(), None)
        .await?
        .json()?;
    let mut ids: Vec<&str> = body["runtimes"]
        .as_array()
        .context("runtimes")?
        .iter()
        .filter_map(|r| r["id"].as_str())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["a", "b"]);
    let w = call(Method::GET, format!("/v1/workers/{worker}"), None)
        .await?
        .json()?;
    assert_eq!(w["state"], "running", "{w}");

    // `roster reload`: the client calls the endpoint and says what changed.
    std::fs::write(
        &path,
        process_config(&[embedded("a", ""), embedded("c", "")]),
    )?;
    let server = format!("http://{addr}");
    let client = Roster::spawn(&["reload", "--server", &server], &[])?;
    let (status, stdout, stderr) = client.finish(WAIT)?;
    ensure!(status.success(), "{status}: {stdout}{stderr}");
    ensure!(
        stdout.contains("added: c") && stdout.contains("removed: b"),
        "{stdout}"
    );
    std::fs::write(&path, &broken)?;
    let client = Roster::spawn(&["reload", "--server", &server], &[])?;
    let (status, stdout, stderr) = client.finish(WAIT)?;
    assert_eq!(status.code(), Some(1), "{stdout}{stderr}");
    ensure!(stderr.contains(&at_line), "{stderr}");
    let w = call(Method::GET, format!("/v1/workers/{worker}"), None)
        .await?
        .json()?;
    assert_eq!(w["state"], "running", "{w}");

    let status = roster.terminate()?;
    ensure!(status.success(), "{status}");
    Ok(())
}
