//! heal: a `remote` runtime whose upstream Roster is SIGKILLed and started again on the same
//! port and state: the time from the upstream answering again to the runtime's health
//! being `ready`, and the events a client resuming with `Last-Event-ID` across the outage
//! misses, against a client that stayed connected throughout.

use std::collections::HashSet;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{
    embedded_config, ended_state, free_port, progress, spawn_worker, Client, Roster, SseStream,
    WAIT,
};
use crate::report::{Better, Row};
use crate::Opts;

/// The downstream's reconnect backoff cap; the goal is ready within it plus 1 s.
const BACKOFF_CAP_MS: u64 = 1000;

/// The most events the staying client keeps (each round makes a few dozen).
const MAX_KEPT: usize = 100_000;

/// Runs the scenario.
pub async fn run(opts: &Opts, dir: &Path) -> Result<Vec<Row>> {
    let rounds = opts.rounds as usize;
    let up_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let up_config = embedded_config(&dir.join("up-state"), up_addr, 1024);
    let mut upstream = Some(Roster::start(dir, "upstream", &up_config).await?);
    let down_config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nstate_dir = \"{}\"\nshutdown_grace = \"2s\"\n\
         [[runtimes]]\nname = \"far\"\nsource = \"remote\"\nurl = \"http://{up_addr}\"\n\
         remote_runtime = \"local\"\nbackoff_base = \"50ms\"\nbackoff_cap = \"{BACKOFF_CAP_MS}ms\"\n",
        dir.join("down-state").display(),
    );
    let mut downstream = Roster::start(dir, "downstream", &down_config).await?;
    let mut c = downstream.client().await?;

    // The client that stays: keeps every event's cursor, in a task of its own.
    let mut staying = SseStream::open(downstream.addr, "/v1/events?runtime=far", &[]).await?;
    let (kept_tx, mut kept_rx) = tokio::sync::mpsc::channel::<(String, String, String)>(MAX_KEPT);
    let stay = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(3600);
        while let Some((ev, _)) = staying.next(deadline).await? {
            if let Some(id) = ev.id {
                if kept_tx.try_send((id, ev.event, ev.data)).is_err() {
                    bail!("the staying client kept {MAX_KEPT} events");
                }
            }
        }
        anyhow::Ok(())
    });
    let mut kept: Vec<(String, String, String)> = Vec::new();

    let (mut heal_secs, mut lost_counts) = (Vec::new(), Vec::new());
    let (mut resumed_total, mut resets) = (0u64, 0u64);
    for round in 0..rounds {
        progress(&format!("heal round {}/{rounds}", round + 1));
        // Some history, then the resuming client reads it and goes away.
        let tag = format!("before-{round}");
        let ids = spawn_ends(&mut c, 3, &tag).await?;
        wait_ended(&mut c, &ids).await?;
        let cursor = {
            let mut s = SseStream::open(downstream.addr, "/v1/events?runtime=far", &[]).await?;
            let deadline = Instant::now() + WAIT;
            let mut last = None;
            // The snapshot, then nothing else is due: the snapshot's id is the cursor.
            while let Some((ev, _)) = s.next(deadline).await? {
                last = ev.id.clone();
                if ev.event == "snapshot" {
                    break;
                }
            }
            last.context("the snapshot had no cursor")?
        };

        // The outage.
        if let Some(mut up) = upstream.take() {
            up.daemon.kill().await?;
        }
        crate::poll_until!(
            "the runtime is unavailable",
            WAIT,
            (health(&mut c).await? == "unavailable").then_some(())
        );
        let up = Roster::start(dir, "upstream", &up_config).await?;
        let answered = Instant::now();
        crate::poll_until!(
            "the runtime is ready again",
            WAIT,
            (health(&mut c).await? == "ready").then_some(())
        );
        heal_secs.push(answered.elapsed().as_secs_f64() * 1e3);
        upstream = Some(up);

        // New events after the outage, then the resuming client comes back.
        let ids = spawn_ends(&mut c, 3, &format!("after-{round}")).await?;
        wait_ended(&mut c, &ids).await?;
        // The staying client has them once it has their ends.
        let deadline = Instant::now() + WAIT;
        loop {
            while let Ok(got) = kept_rx.try_recv() {
                kept.push(got);
            }
            let all_in = ids.iter().all(|id| {
                kept.iter().any(|(_, ev, data)| {
                    ev == "worker.upserted" && data.contains(id.as_str()) && ended_state(data)
                })
            });
            if all_in {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let got = tokio::time::timeout(left, kept_rx.recv())
                .await
                .context("the staying client did not see the new workers end")?
                .context("the staying client stopped")?;
            kept.push(got);
        }
        let after: Vec<&(String, String, String)> =
            match kept.iter().position(|(id, _, _)| *id == cursor) {
                Some(i) => kept[i + 1..].iter().collect(),
                None => bail!("the staying client never saw the resuming client's cursor"),
            };
        let mut s = SseStream::open(
            downstream.addr,
            "/v1/events?runtime=far",
            &[("last-event-id", cursor.as_str())],
        )
        .await?;
        let want: HashSet<&str> = after.iter().map(|(id, _, _)| id.as_str()).collect();
        let mut got: HashSet<String> = HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while want.iter().any(|id| !got.contains(*id)) {
            let next = match s.next(deadline).await {
                Ok(Some((ev, _))) => ev,
                Ok(None) | Err(_) => break,
            };
            if next.event == "reset" {
                resets += 1;
                break;
            }
            if let Some(id) = next.id {
                got.insert(id);
            }
        }
        let lost = want.iter().filter(|id| !got.contains(**id)).count();
        resumed_total += (want.len() - lost) as u64;
        lost_counts.push(lost as f64);
    }
    stay.abort();
    let metric = "upstream SIGKILLed and restarted";
    let mut heal = Row::new(
        "heal",
        metric,
        "roster ready",
        "ms",
        Better::Lower,
        heal_secs,
    );
    heal.limit(
        (BACKOFF_CAP_MS + 1000) as f64,
        &format!("ready ≤ backoff cap ({BACKOFF_CAP_MS} ms) + 1 s"),
    );
    let mut lost = Row::new(
        "heal",
        metric,
        "resume lost",
        "events",
        Better::Lower,
        lost_counts,
    )
    .count("events_resumed", resumed_total)
    .count("resets", resets);
    lost.limit(0.0, "zero lost");
    downstream.daemon.stop().await?;
    if let Some(mut up) = upstream {
        up.daemon.stop().await?;
    }
    Ok(vec![heal, lost])
}

/// The health status of the runtime `far` as the downstream sees it.
pub async fn health(c: &mut Client) -> Result<String> {
    let (status, body) = c.json(Method::GET, "/v1/runtimes/far", None).await?;
    ensure!(status == StatusCode::OK, "GET runtime answered {status}");
    let v: Value = serde_json::from_slice(&body)?;
    Ok(v["health"]["status"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

async fn spawn_ends(c: &mut Client, n: usize, name: &str) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(spawn_worker(c, "far", &json!({"profile": "noop", "name": name})).await?);
    }
    Ok(ids)
}

async fn ended(c: &mut Client, id: &str) -> Result<bool> {
    let (status, body) = c
        .json(Method::GET, &format!("/v1/workers/{id}"), None)
        .await?;
    ensure!(status == StatusCode::OK, "GET worker answered {status}");
    let v: Value = serde_json::from_slice(&body)?;
    Ok(v["state"].as_str().is_some_and(crate::common::terminal))
}

async fn wait_ended(c: &mut Client, ids: &[String]) -> Result<()> {
    for id in ids {
        crate::poll_until!("a worker ends", WAIT, ended(c, id).await?.then_some(()));
    }
    Ok(())
}
