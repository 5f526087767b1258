//! get: `GET /v1/workers/{id}` at 64 connections for a fixed time, beside a bare hyper
//! server answering the same bytes. The load comes from `wrk` (Debian's package, installed
//! by `bench/peers/install.sh`) when it is on PATH, else from the bench's own loop of 64
//! kept-alive connections. The page-of-1,000 rows are in `records`, on the daemon that holds
//! the records.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use http::{Method, StatusCode};
use serde_json::json;

use crate::common::{embedded_config, progress, spawn_worker, start_self, Client, Roster};
use crate::report::{Better, Row};
use crate::Opts;

const CONNECTIONS: usize = 64;

/// Runs the scenario.
pub async fn run(opts: &Opts, dir: &Path) -> Result<Vec<Row>> {
    let secs = opts.get_secs.unwrap_or(if opts.tiny { 0.3 } else { 10.0 });
    let roster = Roster::start(
        dir,
        "roster",
        &embedded_config(&dir.join("state"), "127.0.0.1:0".parse()?, 64),
    )
    .await?;
    let mut c = roster.client().await?;
    let id = spawn_worker(&mut c, "local", &json!({"profile": "noop", "name": "get"})).await?;
    let path = format!("/v1/workers/{id}");
    // Once it has ended its view no longer changes: both servers answer the same bytes.
    let body = crate::poll_until!(
        "the worker ends",
        Duration::from_secs(30),
        async {
            let (status, body) = c.json(Method::GET, &path, None).await?;
            ensure!(status == StatusCode::OK, "GET answered {status}");
            let v: serde_json::Value = serde_json::from_slice(&body)?;
            let done = v["state"].as_str().is_some_and(crate::common::terminal);
            anyhow::Ok(done.then_some(body))
        }
        .await?
    );
    let file = dir.join("body.json");
    std::fs::write(&file, &body)?;
    let (mut bare, bare_addr) =
        start_self(&["bare-hyper".as_ref(), "--body".as_ref(), file.as_os_str()]).await?;

    let wrk = which_wrk();
    // wrk takes whole seconds.
    let secs = if wrk { secs.ceil().max(1.0) } else { secs };
    let tool = if wrk { "wrk" } else { "built-in loop" };
    let metric = format!("GET /v1/workers/{{id}}, {CONNECTIONS} conns, {secs} s ({tool})");
    let (mut r_samples, mut b_samples) = (Vec::new(), Vec::new());
    let (mut r_count, mut b_count) = (0u64, 0u64);
    let rounds = opts.rounds as usize;
    for round in 0..rounds {
        progress(&format!("get round {}/{rounds}: roster", round + 1));
        let (rps, n) = load(roster.addr, &path, secs, wrk).await?;
        r_samples.push(rps);
        r_count += n;
        progress(&format!("get round {}/{rounds}: bare hyper", round + 1));
        let (rps, n) = load(bare_addr, &path, secs, wrk).await?;
        b_samples.push(rps);
        b_count += n;
    }
    let baseline = Row::new(
        "get",
        &metric,
        "bare-hyper",
        "req/s",
        Better::Higher,
        b_samples,
    )
    .count("ok_responses", b_count)
    .count("body_bytes", body.len() as u64);
    let mut row = Row::new("get", &metric, "roster", "req/s", Better::Higher, r_samples)
        .count("ok_responses", r_count)
        .count("body_bytes", body.len() as u64);
    row.against(&baseline, Some(0.8));
    bare.stop().await?;
    let mut roster = roster;
    roster.daemon.stop().await?;
    Ok(vec![row, baseline])
}

fn which_wrk() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|p| p.join("wrk").is_file()))
}

/// Load for `secs` on `path`; returns requests per second and the `200` answers counted.
async fn load(addr: SocketAddr, path: &str, secs: f64, wrk: bool) -> Result<(f64, u64)> {
    if wrk {
        return wrk_load(addr, path, secs).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let (stop, path) = (stop.clone(), path.to_string());
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await?;
            let mut ok = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (status, _) = c.json(Method::GET, &path, None).await?;
                ensure!(status == StatusCode::OK, "GET answered {status}");
                ok += 1;
            }
            anyhow::Ok(ok)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut ok = 0;
    for t in tasks {
        ok += t.await??;
    }
    Ok((ok as f64 / start.elapsed().as_secs_f64(), ok))
}

/// `wrk -t2 -c64 -d<secs>s`: parses its request count and duration; any non-2xx answer or
/// socket error fails the round.
async fn wrk_load(addr: SocketAddr, path: &str, secs: f64) -> Result<(f64, u64)> {
    let duration = format!("{}s", secs.ceil().max(1.0) as u64);
    let url = format!("http://127.0.0.1:{}{path}", addr.port());
    let out = tokio::time::timeout(
        Duration::from_secs_f64(secs + 60.0),
        tokio::process::Command::new("wrk")
            .args(["-t2", &format!("-c{CONNECTIONS}"), "-d", &duration, &url])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("wrk did not finish")??;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "wrk failed: {text}");
    ensure!(!text.contains("Non-2xx"), "wrk saw non-2xx answers: {text}");
    ensure!(
        !text.contains("Socket errors"),
        "wrk saw socket errors: {text}"
    );
    // "12345 requests in 10.00s, 4.56MB read"
    let line = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .with_context(|| format!("no request count in wrk's output: {text}"))?;
    let mut words = line.split_whitespace();
    let n: u64 = words.next().context("a count")?.parse()?;
    let took = words
        .nth(2)
        .context("a duration")?
        .trim_end_matches(',')
        .to_string();
    let took = parse_wrk_duration(&took).with_context(|| format!("wrk's duration {took:?}"))?;
    Ok((n as f64 / took, n))
}

fn parse_wrk_duration(s: &str) -> Option<f64> {
    if let Some(v) = s.strip_suffix("ms") {
        return v.parse::<f64>().ok().map(|v| v / 1e3);
    }
    if let Some(v) = s.strip_suffix("us") {
        return v.parse::<f64>().ok().map(|v| v / 1e6);
    }
    if let Some(v) = s.strip_suffix('m') {
        return v.parse::<f64>().ok().map(|v| v * 60.0);
    }
    s.strip_suffix('s')?.parse().ok()
}
