//! records: the daemon's RSS per finished worker record it retains, its idle RSS beside the
//! idle supervisord, circus and pm2 daemons, those peers' RSS per finished program, and the
//! time of a `GET /v1/workers?limit=1000` page at each record count (the `get` goal).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{embedded_config, progress, spawn_many, Roster};
use crate::peers;
use crate::report::{Better, Row};
use crate::scenarios::spawn;
use crate::Opts;

/// Runs the scenario.
pub async fn run(opts: &Opts, dir: &Path) -> Result<Vec<Row>> {
    let mut counts = opts.records.clone().unwrap_or_else(|| {
        if opts.tiny {
            vec![20, 50]
        } else {
            vec![10_000, 100_000]
        }
    });
    counts.retain(|n| *n > 0);
    counts.sort_unstable();
    counts.dedup();
    let most = counts.last().copied().unwrap_or(0);
    let rounds = opts.rounds as usize;
    let roster = Roster::start(
        dir,
        "roster",
        &embedded_config(&dir.join("state"), "127.0.0.1:0".parse()?, most + 16),
    )
    .await?;
    // Idle: ready, and a moment for allocations of the start to settle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle = roster.rss()?;
    let mut rows = Vec::new();
    let mut idle_rows = vec![Row::new(
        "records",
        "daemon idle RSS",
        "roster",
        "MiB",
        Better::Lower,
        vec![idle as f64 / (1 << 20) as f64],
    )];

    let mut c = roster.client().await?;
    let mut have = 0usize;
    for n in counts {
        progress(&format!("records: filling to {n} finished workers"));
        let made = spawn_many(roster.addr, n - have, 32, json!({"profile": "noop"})).await?;
        ensure!(made as usize == n - have, "created {made} of {}", n - have);
        have = n;
        let finished = crate::poll_until!(
            "every record finished",
            Duration::from_secs(600),
            async {
                let (status, body) = c.json(Method::GET, "/v1/runtimes/local", None).await?;
                ensure!(status == StatusCode::OK, "GET runtime answered {status}");
                let v: Value = serde_json::from_slice(&body)?;
                let done = v["workers"]["exited"].as_u64().unwrap_or(0);
                anyhow::Ok((done as usize >= n).then_some(done))
            }
            .await?
        );
        let rss = roster.rss()?;
        let per = rss.saturating_sub(idle) as f64 / n as f64;
        let mut row = Row::new(
            "records",
            &format!("RSS per record at {n} finished"),
            "roster",
            "bytes",
            Better::Lower,
            vec![per],
        )
        .count("records", finished);
        row.limit(1024.0, "≤ 1 KiB per record");
        rows.push(row);

        let mut times = Vec::new();
        let mut listed = 0u64;
        for _ in 0..rounds * 5 {
            let start = Instant::now();
            let (status, body) = c
                .json(Method::GET, "/v1/workers?runtime=local&limit=1000", None)
                .await?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
            ensure!(status == StatusCode::OK, "the list answered {status}");
            let v: Value = serde_json::from_slice(&body)?;
            listed = v["workers"].as_array().map_or(0, |a| a.len() as u64);
        }
        ensure!(
            listed as usize == n.min(1000),
            "a page held {listed} of {}",
            n.min(1000)
        );
        let mut page = Row::new(
            "records",
            &format!("GET /v1/workers?limit=1000 at {n} records"),
            "roster",
            "ms",
            Better::Lower,
            times,
        )
        .count("workers_in_page", listed);
        // The goal is at 100,000 records; a smaller count must meet it too.
        page.limit(5.0, "≤ 5 ms at 100,000 records");
        rows.push(page);
    }
    let mut roster = roster;
    roster.daemon.stop().await?;

    // The peers: idle, and holding the spawn scenario's number of finished programs.
    let k = opts
        .peer_records
        .unwrap_or(if opts.tiny { 10 } else { 200 })
        .max(1);
    for peer in peers::PEERS {
        if let Some(why) = peers::missing(peer) {
            idle_rows.push(Row::not_measured("records", "daemon idle RSS", peer, &why));
            continue;
        }
        progress(&format!(
            "records: {peer} idle and with {k} finished programs"
        ));
        let cap = spawn::peer_cap(opts);
        let idle = peers::spawn_round(peer, 0, &dir.join(format!("{peer}-idle")), cap).await;
        let held = peers::spawn_round(peer, k, &dir.join(format!("{peer}-held")), cap).await;
        match idle {
            Ok(r) => idle_rows.push(Row::new(
                "records",
                "daemon idle RSS",
                peer,
                "MiB",
                Better::Lower,
                vec![r.rss_idle as f64 / (1 << 20) as f64],
            )),
            Err(e) => idle_rows.push(Row::not_measured(
                "records",
                "daemon idle RSS",
                peer,
                &format!("{e:#}"),
            )),
        }
        let metric = format!("RSS per record at {k} finished");
        rows.push(match held {
            Ok(r) => Row::new(
                "records",
                &metric,
                peer,
                "bytes",
                Better::Lower,
                vec![r.rss_after.saturating_sub(r.rss_idle) as f64 / r.exits.max(1) as f64],
            )
            .count("records", r.exits),
            Err(e) => Row::not_measured("records", &metric, peer, &format!("{e:#}")),
        });
    }
    // Roster's idle row against each peer: "below every peer".
    let mine = idle_rows[0].clone();
    let mut out = Vec::new();
    for peer in &idle_rows[1..] {
        let mut r = mine.clone();
        r.against(peer, Some(1.0));
        out.push(r);
    }
    if out.is_empty() {
        out.push(mine);
    }
    out.extend(idle_rows.into_iter().skip(1));
    out.extend(rows);
    Ok(out)
}
