//! spawn: start short workers (`/bin/true` through a profile), 32 requests in flight, until
//! every exit is seen on `/v1/events`; beside a raw fork/exec loop with the same concurrency,
//! supervisord, circus and pm2.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use serde_json::json;

use crate::common::{embedded_config, progress, spawn_many, watch_ends, Roster};
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
        let (secs, exits) = roster_round(&roster, n).await?;
        samples[0].1.push(n as f64 / secs);
        samples[0].2 += exits;
        progress(&format!(
            "spawn round {}/{rounds}: raw fork/exec",
            round + 1
        ));
        let (secs, exits) = raw_round(n).await?;
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
    Ok(out)
}

/// One round on Roster: subscribe, spawn `n`, wait for `n` ends. Returns seconds from the
/// first request to the last end, and the ends seen.
async fn roster_round(roster: &Roster, n: usize) -> Result<(f64, u64)> {
    let (tx, ready) = tokio::sync::oneshot::channel();
    let deadline = Instant::now() + Duration::from_secs(120);
    let watcher = tokio::spawn(watch_ends(roster.addr, n as u64, deadline, false, tx));
    ready.await.context("the event stream gave no snapshot")?;
    let start = Instant::now();
    let made = spawn_many(roster.addr, n, IN_FLIGHT, json!({"profile": "noop"})).await?;
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

/// One round of the raw baseline: `IN_FLIGHT` threads, each forking and execing
/// `/bin/true` and waiting for it, until `n` have exited.
async fn raw_round(n: usize) -> Result<(f64, u64)> {
    tokio::task::spawn_blocking(move || {
        let next = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let threads: Vec<_> = (0..IN_FLIGHT.min(n))
            .map(|_| {
                let next = next.clone();
                std::thread::spawn(move || {
                    let mut exits = 0u64;
                    while next.fetch_add(1, Ordering::Relaxed) < n {
                        let status = std::process::Command::new("/bin/true").status()?;
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
