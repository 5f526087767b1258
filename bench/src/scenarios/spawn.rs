//! spawn: start short workers (`/bin/true` through a profile), 32 requests in flight, until
//! every exit is seen on `/v1/events`; beside a raw fork/exec loop with the same concurrency,
//! supervisord, circus and pm2. Then the same with containers: a `docker` runtime starting
//! short containers of the test image, beside `docker run --rm` in a loop.

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{
    embedded_config, progress, spawn_many_on, watch_ends_on, workspace_root, Roster,
};
use crate::peers;
use crate::report::{Better, Row};
use crate::Opts;

const IN_FLIGHT: usize = 32;

/// A peer's samples so far, or why it could not be measured, and the exits it saw.
type PeerSamples = (&'static str, Result<Vec<f64>, String>, u64);

/// The workers per round for these options.
pub fn size(opts: &Opts) -> usize {
    opts.spawn_workers
        .unwrap_or(if opts.tiny { 10 } else { 1000 })
        .max(1)
}

/// How long one peer round may take before it is cut off.
pub fn peer_cap(opts: &Opts) -> Duration {
    Duration::from_secs_f64(opts.peer_cap_secs.unwrap_or(60.0).max(1.0))
}

/// Runs the scenario.
pub async fn run(opts: &Opts, dir: &Path) -> Result<Vec<Row>> {
    let n = size(opts);
    let rounds = opts.rounds as usize;
    let metric = format!("{n} × /bin/true, {IN_FLIGHT} in flight");
    let listen = "127.0.0.1:0".parse()?;
    let roster = Roster::start(
        dir,
        "roster",
        &embedded_config(&dir.join("state"), listen, n * rounds + 16),
    )
    .await?;

    let mut samples: Vec<(&str, Vec<f64>, u64)> = vec![("roster", vec![], 0), ("raw", vec![], 0)];
    let mut peer_samples: Vec<PeerSamples> = peers::PEERS
        .iter()
        .map(|p| (*p, peers::missing(p).map_or(Ok(Vec::new()), Err), 0))
        .collect();
    for round in 0..rounds {
        // Interleaved, so that noise from other load on the machine hits every subject.
        progress(&format!("spawn round {}/{rounds}: roster", round + 1));
        let (secs, exits) = roster_round(&roster, "local", n, Duration::from_secs(120)).await?;
        samples[0].1.push(n as f64 / secs);
        samples[0].2 += exits;
        progress(&format!(
            "spawn round {}/{rounds}: raw fork/exec",
            round + 1
        ));
        let (secs, exits) = loop_round(n, || std::process::Command::new("/bin/true")).await?;
        samples[1].1.push(n as f64 / secs);
        samples[1].2 += exits;
        for (peer, got, exits) in &mut peer_samples {
            let Ok(list) = got else { continue };
            progress(&format!("spawn round {}/{rounds}: {peer}", round + 1));
            let scratch = dir.join(format!("{peer}-{round}"));
            match peers::spawn_round(peer, n, &scratch, peer_cap(opts)).await {
                Ok(r) => {
                    // Cut off at the cap: the rate of what it did finish.
                    list.push(r.exits as f64 / r.secs);
                    *exits += r.exits;
                }
                Err(e) => *got = Err(format!("{e:#}")),
            }
        }
    }
    let mut rows = Vec::new();
    for (subject, s, exits) in samples {
        rows.push(
            Row::new("spawn", &metric, subject, "workers/s", Better::Higher, s)
                .count("exits_seen", exits)
                .count("exits_expected", (n * rounds) as u64),
        );
    }
    for (peer, got, exits) in peer_samples {
        rows.push(match got {
            Ok(s) => Row::new("spawn", &metric, peer, "workers/s", Better::Higher, s)
                .count("exits_seen", exits)
                .count("exits_expected", (n * rounds) as u64),
            Err(why) => Row::not_measured("spawn", &metric, peer, &why),
        });
    }
    // Roster's row once per baseline, each with its goal.
    let goals = [
        ("raw", 0.5),
        ("supervisord", 10.0),
        ("circus", 5.0),
        ("pm2", 5.0),
    ];
    let base = rows[0].clone();
    let mut out = vec![];
    for (name, factor) in goals {
        let baseline = rows
            .iter()
            .find(|r| r.subject == name)
            .context("a baseline row")?;
        let mut r = base.clone();
        r.against(baseline, Some(factor));
        out.push(r);
    }
    out.extend(rows.into_iter().skip(1));
    let mut roster = roster;
    roster.daemon.stop().await?;
    out.extend(docker_rows(opts, dir).await);
    Ok(out)
}

/// One round on Roster's runtime `runtime`: subscribe, spawn `n` of its profile `noop`,
/// wait for `n` ends (for `within` at most). Returns seconds from the first request to the
/// last end, and the ends seen.
async fn roster_round(
    roster: &Roster,
    runtime: &'static str,
    n: usize,
    within: Duration,
) -> Result<(f64, u64)> {
    let (tx, ready) = tokio::sync::oneshot::channel();
    let deadline = Instant::now() + within;
    let watcher = tokio::spawn(watch_ends_on(
        roster.addr,
        runtime,
        n as u64,
        deadline,
        false,
        tx,
    ));
    ready.await.context("the event stream gave no snapshot")?;
    let start = Instant::now();
    let made = spawn_many_on(
        roster.addr,
        runtime,
        n,
        IN_FLIGHT,
        json!({"profile": "noop"}),
    )
    .await?;
    let seen = watcher.await??;
    ensure!(made == n as u64, "created {made} of {n}");
    ensure!(
        seen.resets == 0,
        "the event stream was reset {} times",
        seen.resets
    );
    ensure!(seen.ended == n as u64, "saw {} of {n} exits", seen.ended);
    let last = seen.last_at.context("no end seen")?;
    Ok((last.duration_since(start).as_secs_f64(), seen.ended))
}

/// One round of a loop baseline: `IN_FLIGHT` threads, each running the command `make`
/// gives (stdio to /dev/null) and waiting for it, until `n` have run. Returns the seconds
/// and how many exited with status 0.
async fn loop_round(
    n: usize,
    make: impl Fn() -> std::process::Command + Send + Sync + 'static,
) -> Result<(f64, u64)> {
    tokio::task::spawn_blocking(move || {
        let next = Arc::new(AtomicUsize::new(0));
        let make = Arc::new(make);
        let start = Instant::now();
        let threads: Vec<_> = (0..IN_FLIGHT.min(n))
            .map(|_| {
                let (next, make) = (next.clone(), make.clone());
                std::thread::spawn(move || {
                    let mut exits = 0u64;
                    while next.fetch_add(1, Ordering::Relaxed) < n {
                        let status = make()
                            .stdin(Stdio::null())
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .status()?;
                        if status.success() {
                            exits += 1;
                        }
                    }
                    std::io::Result::Ok(exits)
                })
            })
            .collect();
        let mut exits = 0;
        for t in threads {
            exits += t
                .join()
                .map_err(|_| anyhow::anyhow!("a thread panicked"))??;
        }
        Ok((start.elapsed().as_secs_f64(), exits))
    })
    .await?
}

/// The image the docker rows run (made by `scripts/docker-test-image`, as for the tests of
/// `source-docker`).
const DOCKER_IMAGE: &str = "roster-test/busybox:1";

/// Containers per round of the docker rows for these options.
pub fn docker_size(opts: &Opts) -> usize {
    opts.docker_workers
        .unwrap_or(if opts.tiny { 10 } else { 200 })
        .max(1)
}

/// The engine the docker rows use: `ROSTER_DOCKER_SOCKET` (as the tests of
/// `source-docker`), else Docker's default socket.
fn docker_socket() -> String {
    let socket =
        std::env::var("ROSTER_DOCKER_SOCKET").unwrap_or_else(|_| "/var/run/docker.sock".into());
    socket.trim_start_matches("unix://").to_string()
}

/// The `docker` CLI aimed at `socket`.
fn docker_cli(socket: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new("docker");
    cmd.arg("-H").arg(format!("unix://{socket}"));
    cmd
}

/// Runs a `docker` CLI command to its end (60 s at most); its output.
async fn docker_output(socket: &str, args: &[&str]) -> Result<std::process::Output> {
    let mut cmd = tokio::process::Command::from(docker_cli(socket));
    cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .with_context(|| format!("`docker {}` did not end within 60 s", args.join(" ")))?
        .context("running the docker CLI (apt-get install docker.io)")
}

/// Why the docker rows cannot be measured, or `None` when an engine answers on `socket`
/// with the test image (imported by `scripts/docker-test-image` when it is missing).
async fn docker_missing(socket: &str) -> Option<String> {
    match docker_output(socket, &["version", "--format", "{{.Server.Version}}"]).await {
        Err(e) => return Some(format!("{e:#}")),
        Ok(out) if !out.status.success() => {
            return Some(format!(
                "no container engine answers on {socket} (scripts/start-dockerd starts one; \
                 ROSTER_DOCKER_SOCKET names another)"
            ))
        }
        Ok(_) => {}
    }
    match docker_output(socket, &["image", "inspect", DOCKER_IMAGE]).await {
        Ok(out) if out.status.success() => return None,
        Err(e) => return Some(format!("{e:#}")),
        Ok(_) => {}
    }
    progress(&format!(
        "importing {DOCKER_IMAGE} (scripts/docker-test-image)"
    ));
    let made = tokio::process::Command::new("bash")
        .arg(workspace_root().join("scripts/docker-test-image"))
        .env("DOCKER_HOST", format!("unix://{socket}"))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await;
    match made {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "scripts/docker-test-image failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("running scripts/docker-test-image: {e}")),
    }
}

/// A Roster with one runtime `docker` of kind `docker` on `socket`: profile `noop` runs
/// `/bin/true` in the test image (no network, the source's small init as PID 1, as every
/// worker of that kind).
fn docker_config(state_dir: &Path, socket: &str, max_finished: usize) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
state_dir = "{state}"
shutdown_grace = "2s"

[[runtimes]]
name = "docker"
source = "docker"
socket = "{socket}"
allow_images = ["{DOCKER_IMAGE}"]
max_workers = {max_workers}
max_finished = {max_finished}
grace = "1s"
[runtimes.profiles.noop]
image = "{DOCKER_IMAGE}"
command = ["/bin/true"]
"#,
        state = state_dir.display(),
        max_workers = 1024,
    )
}

/// The docker rows: Roster's `docker` runtime and `docker run --rm` in a loop, `N`
/// containers of `/bin/true` a round with the same concurrency, rounds interleaved. When
/// no engine answers, or a round fails, both rows say "not measured: <why>".
async fn docker_rows(opts: &Opts, dir: &Path) -> Vec<Row> {
    let n = docker_size(opts);
    let metric = format!("{n} × container /bin/true, {IN_FLIGHT} in flight");
    let socket = docker_socket();
    let measured = match docker_missing(&socket).await {
        Some(why) => Err(why),
        None => docker_rounds(opts, dir, &socket, n)
            .await
            .map_err(|e| format!("failed: {e:#}")),
    };
    match measured {
        Ok((roster, run)) => {
            let expected = (n * opts.rounds as usize) as u64;
            let run = Row::new(
                "spawn",
                &metric,
                "docker run",
                "containers/s",
                Better::Higher,
                run.0,
            )
            .count("exits_seen", run.1)
            .count("exits_expected", expected);
            let mut roster = Row::new(
                "spawn",
                &metric,
                "roster",
                "containers/s",
                Better::Higher,
                roster.0,
            )
            .count("exits_seen", roster.1)
            .count("exits_expected", expected);
            roster.against(&run, None);
            vec![roster, run]
        }
        Err(why) => vec![
            Row::not_measured("spawn", &metric, "roster", &why),
            Row::not_measured("spawn", &metric, "docker run", &why),
        ],
    }
}

/// Samples (containers/s) and exits with status 0 seen, per subject.
type Measured = (Vec<f64>, u64);

async fn docker_rounds(
    opts: &Opts,
    dir: &Path,
    socket: &str,
    n: usize,
) -> Result<(Measured, Measured)> {
    let rounds = opts.rounds as usize;
    let state = dir.join("docker-state");
    let mut roster = Roster::start(
        dir,
        "roster-docker",
        &docker_config(&state, socket, n * rounds + 16),
    )
    .await?;
    let result = async {
        let (mut ours, mut theirs): (Measured, Measured) = Default::default();
        // A container takes the engine far longer than a process takes the kernel.
        let within = Duration::from_secs(120) + Duration::from_millis(500) * n as u32;
        for round in 0..rounds {
            progress(&format!(
                "spawn round {}/{rounds}: roster docker",
                round + 1
            ));
            let (secs, _) = roster_round(&roster, "docker", n, within).await?;
            ours.0.push(n as f64 / secs);
            ours.1 += remove_finished(&roster, "docker").await?;
            progress(&format!("spawn round {}/{rounds}: docker run", round + 1));
            let socket = socket.to_string();
            let (secs, exits) = loop_round(n, move || {
                let mut cmd = docker_cli(&socket);
                cmd.args(["run", "--rm", "--init", "--network", "none", DOCKER_IMAGE])
                    .arg("/bin/true");
                cmd
            })
            .await?;
            theirs.0.push(n as f64 / secs);
            theirs.1 += exits;
        }
        anyhow::Ok((ours, theirs))
    }
    .await;
    roster.daemon.stop().await?;
    remove_leftovers(socket, &state).await;
    result
}

/// Removes every finished worker of `runtime` through the API (`DELETE`, which removes
/// its container); returns how many had exited with status 0. Not timed: a round ends
/// when every end is seen.
async fn remove_finished(roster: &Roster, runtime: &str) -> Result<u64> {
    let mut client = roster.client().await?;
    let mut ids = Vec::new();
    let mut clean = 0u64;
    let mut page: Option<String> = None;
    loop {
        let mut path = format!("/v1/workers?runtime={runtime}&limit=1000");
        if let Some(p) = &page {
            path.push_str(&format!("&page={p}"));
        }
        let (status, body) = client.json(Method::GET, &path, None).await?;
        ensure!(status == StatusCode::OK, "listing answered {status}");
        let v: Value = serde_json::from_slice(&body)?;
        for w in v["workers"].as_array().context("a page of workers")? {
            if w["state"] == "exited" && w["exit_code"] == 0 {
                clean += 1;
            }
            if crate::common::terminal(w["state"].as_str().unwrap_or("")) {
                ids.push(w["id"].as_str().context("a worker id")?.to_string());
            }
        }
        match v["next_page"].as_str() {
            Some(p) => page = Some(p.to_string()),
            None => break,
        }
    }
    for id in ids {
        let (status, body) = client
            .json(Method::DELETE, &format!("/v1/workers/{id}"), None)
            .await?;
        ensure!(
            status == StatusCode::NO_CONTENT,
            "removing a worker answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(clean)
}

/// Removes whatever containers the bench's `docker` runtime left on the engine (a failed
/// round), found by the runtime's instance label.
async fn remove_leftovers(socket: &str, state: &Path) {
    let Ok(instance) = std::fs::read_to_string(state.join("runtimes/docker/docker-instance"))
    else {
        return;
    };
    let filter = format!("label=roster.instance={}", instance.trim());
    let Ok(out) = docker_output(socket, &["ps", "-aq", "--filter", &filter]).await else {
        return;
    };
    let ids = String::from_utf8_lossy(&out.stdout).to_string();
    let ids: Vec<&str> = ids.split_whitespace().collect();
    if !ids.is_empty() {
        let mut args = vec!["rm", "-f"];
        args.extend(ids);
        let _ = docker_output(socket, &args).await;
    }
}
