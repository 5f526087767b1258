//! fanout: many SSE subscribers on `/v1/events` while workers start and end at a steady
//! rate: every subscriber must see every end (counted), the delivery latency of ends
//! (`ended_at` → arrival, on one subscriber in ten), and the daemon's RSS per idle
//! subscriber.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde_json::json;

use crate::common::{embedded_config, progress, spawn_worker, watch_ends, Client, Roster};
use crate::report::{Better, Row};
use crate::scenarios::output::pct;
use crate::Opts;

/// Runs the scenario.
pub async fn run(opts: &Opts, dir: &Path) -> Result<Vec<Row>> {
    let subs = opts
        .subscribers
        .unwrap_or(if opts.tiny { 10 } else { 1000 })
        .max(1);
    let secs = opts
        .fanout_secs
        .unwrap_or(if opts.tiny { 0.5 } else { 30.0 });
    let rate = opts
        .fanout_rate
        .unwrap_or(if opts.tiny { 20 } else { 200 })
        .max(1);
    let workers = ((secs * f64::from(rate)).round() as usize).max(1);
    let rounds = opts.rounds as usize;
    let metric = format!("{subs} subscribers, {rate} workers/s for {secs} s");
    let (mut lat50, mut lat99, mut per_sub, mut lost) = (vec![], vec![], vec![], vec![]);
    let (mut delivered, mut expected, mut resets) = (0u64, 0u64, 0u64);
    for round in 0..rounds {
        progress(&format!(
            "fanout round {}/{rounds}: {subs} subscribers",
            round + 1
        ));
        let roster = Roster::start(
            &dir.join(format!("r{round}")),
            "roster",
            &embedded_config(
                &dir.join(format!("r{round}/state")),
                "127.0.0.1:0".parse()?,
                workers + 16,
            ),
        )
        .await?;
        let before = roster.rss()?;
        // Subscribers that lost events stop waiting 10 s after the churn is due to end.
        let deadline =
            Instant::now() + Duration::from_secs_f64(secs * 1.2) + Duration::from_secs(10);
        let mut watchers = Vec::with_capacity(subs);
        for i in 0..subs {
            let (tx, ready) = tokio::sync::oneshot::channel();
            let task = tokio::spawn(watch_ends(
                roster.addr,
                workers as u64,
                deadline,
                i % 10 == 0,
                tx,
            ));
            ready.await.context("a subscriber got no snapshot")?;
            watchers.push(task);
        }
        // Idle: every subscriber has its snapshot and nothing is happening.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let after = roster.rss()?;
        per_sub.push(after.saturating_sub(before) as f64 / subs as f64 / 1024.0);

        progress(&format!(
            "fanout round {}/{rounds}: {workers} workers at {rate}/s",
            round + 1
        ));
        churn(&roster, workers, rate).await?;
        let mut all = Vec::new();
        let mut round_delivered = 0;
        for w in watchers {
            let seen = w.await??;
            round_delivered += seen.ended;
            resets += seen.resets;
            all.extend(seen.latencies_ms);
        }
        delivered += round_delivered;
        expected += (workers * subs) as u64;
        lost.push(((workers * subs) as u64 - round_delivered.min((workers * subs) as u64)) as f64);
        all.sort_by(f64::total_cmp);
        if !all.is_empty() {
            lat50.push(pct(&all, 50.0));
            lat99.push(pct(&all, 99.0));
        }
        let mut roster = roster;
        roster.daemon.stop().await?;
    }
    let mut loss = Row::new(
        "fanout",
        &metric,
        "roster lost",
        "events",
        Better::Lower,
        lost,
    )
    .count("ends_delivered", delivered)
    .count("ends_expected", expected)
    .count("resets", resets);
    loss.limit(0.0, "zero loss");
    let mut p99 = Row::new("fanout", &metric, "roster p99", "ms", Better::Lower, lat99);
    p99.limit(10.0, "p99 ≤ 10 ms");
    let mut rss = Row::new(
        "fanout",
        &metric,
        "roster RSS",
        "KiB/sub",
        Better::Lower,
        per_sub,
    );
    rss.limit(64.0, "≤ 64 KiB per idle connection");
    Ok(vec![
        loss,
        Row::new("fanout", &metric, "roster p50", "ms", Better::Lower, lat50),
        p99,
        rss,
    ])
}

/// Starts `workers` short workers, the i-th due at `i / rate` seconds, from 8 connections.
async fn churn(roster: &Roster, workers: usize, rate: u32) -> Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8.min(workers) {
        let (next, addr) = (next.clone(), roster.addr);
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= workers {
                    return anyhow::Ok(());
                }
                let due = start + Duration::from_secs_f64(i as f64 / f64::from(rate));
                tokio::time::sleep_until(due).await;
                spawn_worker(&mut c, "local", &json!({"profile": "noop"})).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}
