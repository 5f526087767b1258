//! Swapping a runtime's `source` in the config changes nothing a client sees but the
//! runtime's `kind` (SPEC §8): one client scenario — spawn, read output, send input, stop,
//! list — against a runtime `r` configured as `embedded`, then as `remote` (following an
//! embedded runtime of another registry), then as `tmux` (this package's kind, added to the
//! default kinds as `roster-tmux` adds it), then as `docker` (a default kind, against the real
//! engine). With worker ids and times normalized, every
//! answer and every event must be equal, except `kind`.
//!
//! Needs the `tmux` program and a Docker Engine with the test image (CI has both).

#[path = "../../../server-bin/tests/common/mod.rs"]
mod common;
mod tmux_server;

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Result;
use http::StatusCode;
use serde_json::{json, Value};
use server_bin::config::Config;
use server_bin::ServeOptions;

use common::{unique, SseClient, SseEvent, TestServer};
use tmux_server::TmuxServer;

/// How long a test waits for a condition before it fails.
const DEADLINE: Duration = Duration::from_secs(20);

/// A test server for a config written in TOML, with the default kinds and `tmux`.
async fn server_for(toml: &str) -> Result<TestServer> {
    let config = Config::parse(toml).map_err(|e| anyhow::anyhow!("{e}"))?;
    let options = ServeOptions::from_config(&config.server, Vec::new());
    let mut factories = server_bin::default_factories();
    factories.add::<source_tmux::TmuxSource>()?;
    TestServer::start_in_with(tempfile::tempdir()?, config, &factories, options).await
}

/// Waits until runtime `rt` of `server` is `ready`.
async fn wait_ready(server: &TestServer, rt: &str) -> Result<()> {
    let path = format!("/v1/runtimes/{rt}");
    let path = &path;
    common::eventually_seen(
        &format!("runtime {rt} to be ready"),
        DEADLINE,
        || async move {
            let v = server.get(path).await?.json()?;
            Ok(if v["health"]["status"] == "ready" {
                Ok(())
            } else {
                Err(v.to_string())
            })
        },
    )
    .await
}

/// Reads a stream until it closes.
async fn read_all(stream: &mut SseClient) -> Result<Vec<SseEvent>> {
    stream.rest(DEADLINE).await
}

/// Replaces worker ids by `w#<n>` in the order they first appear, and timestamps by
/// `<time>`.
fn normalize(value: &Value, ids: &mut HashMap<String, String>) -> Value {
    match value {
        Value::String(s) => {
            let is_id = s.len() == 28
                && s.starts_with("w_")
                && s[2..]
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase());
            if is_id {
                let n = ids.len() + 1;
                return Value::String(ids.entry(s.clone()).or_insert(format!("w#{n}")).clone());
            }
            let is_time =
                time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                    .is_ok();
            if is_time {
                return Value::String("<time>".into());
            }
            Value::String(s.clone())
        }
        Value::Array(items) => Value::Array(items.iter().map(|v| normalize(v, ids)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), normalize(v, ids)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Takes every runtime's `kind` out of `value` (in place) and returns them, and its `restart`
/// capability too: whether a kind restarts workers by a request's policy is the kind's own
/// (tmux does not); everything else must match.
fn take_kinds(value: &mut Value) -> Vec<String> {
    let mut kinds = Vec::new();
    match value {
        Value::Object(map) => {
            if let Some(Value::Object(caps)) = map.get_mut("capabilities") {
                caps.remove("restart");
                if let Some(Value::String(kind)) = map.remove("kind") {
                    kinds.push(kind);
                }
            }
            for v in map.values_mut() {
                kinds.extend(take_kinds(v));
            }
        }
        Value::Array(items) => {
            for v in items {
                kinds.extend(take_kinds(v));
            }
        }
        _ => {}
    }
    kinds
}

/// One step of a client's scenario: what it did, and what it got.
#[derive(Debug, PartialEq)]
struct Step {
    what: &'static str,
    status: u16,
    body: Value,
}

fn events_json(events: &[SseEvent], with_ids: bool) -> Value {
    Value::Array(
        events
            .iter()
            .map(|e| {
                let id = if with_ids { json!(e.id) } else { Value::Null };
                json!({ "id": id, "event": e.event, "data": e.data })
            })
            .collect(),
    )
}

/// The answer to a spawn shows the worker as the registry knows it when the answer is
/// made: `starting`, or already `running` (without or with `started_at`) — a race any kind
/// of runtime may win either way. Those two fields are replaced by what they may be.
fn spawn_answer(mut answer: Value) -> Value {
    assert!(
        ["starting", "running"].contains(&answer["state"].as_str().unwrap_or_default()),
        "{answer}"
    );
    answer["state"] = json!("starting or running");
    answer["started_at"] = json!("null or a time");
    answer
}

/// The scenario, in runtime `r`, with the `/v1/events` stream read all along:
/// 1. spawn `echo hi; read l; echo $l`, get it, read its output, send it a line, wait for
///    its end, read the output again;
/// 2. spawn a loop, stop it, wait for `stopped`, read its output;
/// 3. list the workers, get the runtime and the runtimes.
///
/// Returns the steps, ids and timestamps normalized, and the runtime kinds it saw.
async fn client_scenario(server: &TestServer) -> Result<(Vec<Step>, Vec<String>)> {
    let mut steps = Vec::new();
    let mut step = |what: &'static str, status: StatusCode, body: Value| {
        steps.push((what, status.as_u16(), body));
    };
    wait_ready(server, "r").await?;
    let mut events = server.sse("/v1/events", &[]).await?;
    let snapshot = events.next_event().await?;
    step("snapshot", StatusCode::OK, events_json(&[snapshot], false));

    // 1. Output and input.
    let spawned = server
        .post(
            "/v1/runtimes/r/workers",
            &json!({ "profile": "shell", "args": ["echo hi; read l; echo $l"],
                     "name": "same", "labels": {"k": "v"} })
            .to_string(),
        )
        .await?;
    let id = spawned.created_id()?;
    step("spawn", spawned.status, spawn_answer(spawned.json()?));
    let location = spawned
        .headers
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    step(
        "location",
        StatusCode::OK,
        json!(location.replace(&id, "<id>")),
    );
    let running = server.wait_worker(&id, |w| w["state"] == "running").await?;
    step("get running", StatusCode::OK, running);

    let mut out = server.sse(&format!("/v1/workers/{id}/output"), &[]).await?;
    let mut live = out.read_until(|e| e.event == "output").await?;
    let input = server
        .post(&format!("/v1/workers/{id}/input"), r#"{"data": "there\n"}"#)
        .await?;
    step("input", input.status, input.json()?);
    live.extend(read_all(&mut out).await?);
    // `state` events come from the registry's event log, output from the source: their
    // relative order is only approximate (docs/DESIGN.md), so each kind is compared in its
    // own order.
    let (states, rest): (Vec<SseEvent>, Vec<SseEvent>) =
        live.into_iter().partition(|e| e.event == "state");
    step("output states", StatusCode::OK, events_json(&states, false));
    step("output chunks", StatusCode::OK, events_json(&rest, true));

    let exited = server.wait_worker(&id, |w| w["state"] == "exited").await?;
    step("get exited", StatusCode::OK, exited);
    let mut again = server
        .sse(&format!("/v1/workers/{id}/output?follow=0"), &[])
        .await?;
    let again = read_all(&mut again).await?;
    step("output again", StatusCode::OK, events_json(&again, true));

    // 2. Stop.
    let spawned = server
        .post(
            "/v1/runtimes/r/workers",
            &json!({ "profile": "shell", "args": ["echo ready; while :; do sleep 0.1; done"],
                     "name": "looper" })
            .to_string(),
        )
        .await?;
    let looper = spawned.created_id()?;
    step(
        "spawn looper",
        spawned.status,
        spawn_answer(spawned.json()?),
    );
    // An output stream opens with the worker's state at that moment: wait for `running`,
    // as for the first worker, so that it does not depend on how fast the start was.
    let running = server
        .wait_worker(&looper, |w| w["state"] == "running")
        .await?;
    step("get looper running", StatusCode::OK, running);
    let mut out = server
        .sse(&format!("/v1/workers/{looper}/output"), &[])
        .await?;
    let mut live = out.read_until(|e| e.event == "output").await?;
    let stop = server
        .post(
            &format!("/v1/workers/{looper}/stop"),
            r#"{"grace_ms": 5000}"#,
        )
        .await?;
    // The answer is the worker in the state the stop moved it to: `stopping`, or already
    // `stopped` (a shell ends on SIGTERM at once) — never the `running` it was before.
    let mut stopping = stop.json()?;
    let state = stopping["state"].as_str().unwrap_or_default();
    assert!(["stopping", "stopped"].contains(&state), "{stopping}");
    stopping["state"] = json!("stopping or stopped");
    stopping["ended_at"] = json!("null or a time");
    step("stop", stop.status, stopping);
    live.extend(read_all(&mut out).await?);
    let (states, rest): (Vec<SseEvent>, Vec<SseEvent>) =
        live.into_iter().partition(|e| e.event == "state");
    step("looper states", StatusCode::OK, events_json(&states, false));
    step("looper chunks", StatusCode::OK, events_json(&rest, true));
    let stopped = server
        .wait_worker(&looper, |w| w["state"] == "stopped")
        .await?;
    step("get stopped", StatusCode::OK, stopped);
    let stop_again = server
        .post(&format!("/v1/workers/{looper}/stop"), "{}")
        .await?;
    step("stop again", stop_again.status, stop_again.json()?);

    // 3. Listings.
    let list = server.get("/v1/workers").await?;
    step("list", list.status, list.json()?);
    let runtime = server.get("/v1/runtimes/r").await?;
    step("runtime", runtime.status, runtime.json()?);
    let runtimes = server.get("/v1/runtimes").await?;
    step("runtimes", runtimes.status, runtimes.json()?);

    let seen_events = events
        .read_until(|ev| {
            ev.event == "worker.upserted"
                && ev.data["worker"]["id"] == looper.as_str()
                && ev.data["worker"]["state"] == "stopped"
        })
        .await?;
    step("events", StatusCode::OK, events_json(&seen_events, false));

    let mut ids = HashMap::new();
    let mut kinds = Vec::new();
    let steps = steps
        .into_iter()
        .map(|(what, status, body)| {
            let mut body = normalize(&body, &mut ids);
            kinds.extend(take_kinds(&mut body));
            Step { what, status, body }
        })
        .collect();
    Ok((steps, kinds))
}

/// Whether a Docker Engine answers on its default socket (with the test image, made by
/// `scripts/docker-test-image`). Under CI it must: a missing engine fails the test.
fn docker_answers() -> bool {
    let ok = std::process::Command::new("docker")
        .args(["image", "inspect", "roster-test/busybox:1"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "no Docker Engine with the test image answers; .ci/run starts one \
             (scripts/start-dockerd, scripts/docker-test-image)"
        );
        eprintln!("skipped the docker kind: no engine with the test image answers");
    }
    ok
}

/// The instance label of runtime `r` of `server` (kept in its state directory).
fn docker_instance(server: &TestServer) -> Result<String> {
    let path = server.dir.path().join("state/runtimes/r/docker-instance");
    Ok(std::fs::read_to_string(path)?.trim().to_string())
}

/// The ids of the containers with that instance label.
fn docker_containers(instance: &str) -> Vec<String> {
    let out = std::process::Command::new("docker")
        .args(["ps", "-aq", "--no-trunc", "--filter"])
        .arg(format!("label=roster.instance={instance}"))
        .output()
        .expect("docker runs");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn remove_containers(ids: &[String]) {
    if !ids.is_empty() {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f"])
            .args(ids)
            .output();
    }
}

const PROFILE: &str = "[runtimes.profiles.shell]\ncommand = [\"/bin/sh\", \"-c\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_tell_embedded_remote_tmux_and_docker_runtimes_apart_but_by_kind(
) -> Result<()> {
    let mut runs: Vec<(&str, Vec<Step>, Vec<String>)> = Vec::new();

    let embedded = server_for(&format!(
        "[[runtimes]]\nname = \"r\"\nsource = \"embedded\"\n{PROFILE}"
    ))
    .await?;
    let (steps, kinds) = client_scenario(&embedded).await?;
    embedded.stop().await?;
    runs.push(("embedded", steps, kinds));

    let upstream = server_for(&format!(
        "[[runtimes]]\nname = \"inner\"\nsource = \"embedded\"\n{PROFILE}"
    ))
    .await?;
    let remote = server_for(&format!(
        "[[runtimes]]\nname = \"r\"\nsource = \"remote\"\nurl = \"http://{}\"\n\
         remote_runtime = \"inner\"\n",
        upstream.addr
    ))
    .await?;
    let (steps, kinds) = client_scenario(&remote).await?;
    remote.stop().await?;
    upstream.stop().await?;
    runs.push(("remote", steps, kinds));

    let socket = unique("roster-swap");
    let _tmux = TmuxServer(socket.clone());
    let tmux = server_for(&format!(
        "[[runtimes]]\nname = \"r\"\nsource = \"tmux\"\nsocket_name = \"{socket}\"\n{PROFILE}"
    ))
    .await?;
    let (steps, kinds) = client_scenario(&tmux).await?;
    // Nothing a client got names the tmux server (`stop` searches for the state directory,
    // where the FIFOs live, too).
    tmux.seen().assert_free_of(std::slice::from_ref(&socket))?;
    tmux.stop().await?;
    runs.push(("tmux", steps, kinds));

    // `docker` (a default kind): each worker a container of the test image. Under CI the
    // engine must answer (`.ci/run` starts it); elsewhere the kind is left out with a notice.
    if docker_answers() {
        let docker = server_for(
            "[[runtimes]]\nname = \"r\"\nsource = \"docker\"\n\
             [runtimes.profiles.shell]\nimage = \"roster-test/busybox:1\"\n\
             command = [\"/bin/sh\", \"-c\"]\n",
        )
        .await?;
        let (steps, kinds) = client_scenario(&docker).await?;
        let instance = docker_instance(&docker)?;
        let containers = docker_containers(&instance);
        assert!(!containers.is_empty(), "the docker runtime made containers");
        // Nothing a client got names a container or the engine's socket.
        let mut needles = containers.clone();
        needles.extend(containers.iter().map(|c| c[..12].to_string()));
        needles.push("docker.sock".into());
        docker.seen().assert_free_of(&needles)?;
        docker.stop().await?;
        remove_containers(&containers);
        runs.push(("docker", steps, kinds));
    }

    let (_, base, base_kinds) = &runs[0];
    assert!(!base_kinds.is_empty());
    for (kind, steps, kinds) in &runs {
        assert_eq!(kinds.len(), base_kinds.len(), "{kind}: {kinds:?}");
        assert!(kinds.iter().all(|k| k == kind), "{kind}: {kinds:?}");
        assert_eq!(steps.len(), base.len(), "{kind}");
        for (e, other) in base.iter().zip(steps) {
            assert_eq!(
                e, other,
                "{}: embedded\n{:#}\n{kind}\n{:#}",
                e.what, e.body, other.body
            );
        }
    }
    Ok(())
}
