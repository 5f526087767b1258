//! load: many clients at once for a fixed time against a Roster that serves an embedded
//! runtime `local` and a `remote` runtime `far` chained to a second Roster, which is
//! SIGKILLed and started again twice during the run.
//!
//! Each client loops until the time is up: spawn a `cat` worker, get it, list its runtime,
//! follow its output, post a line of input and read it back from the stream, stop it, read
//! the stream's `end`, and confirm the worker's terminal state. A few more clients hold
//! `/v1/events` for the whole run. Every fourth client works on `far`.
//!
//! The scenario fails — it is a test, not only figures — on any error other than the
//! documented ones: `429 capacity_exceeded`, and on `far`, an error of a cycle that
//! overlapped an upstream outage or the seconds after it healed (`503`, a stream cut, a
//! worker that ended `lost` before its echo). It also fails when a spawned worker is not
//! seen to end, when a worker is still live after the run, and when any worker process is
//! left on the machine at the end (processes are found by a marker in their environment,
//! counted with their process groups).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{json, Value};

use super::heal::health;
use crate::common::{free_port, progress, terminal, Client, Roster, SseStream, WAIT};
use crate::report::{Better, Row};
use crate::Opts;

/// The environment variable that marks this run's worker processes.
const MARK_VAR: &str = "ROSTER_LOAD_RUN";

/// Errors kept word for word for the report (the rest are counted).
const KEPT_ERRORS: usize = 20;

/// After the upstream is ready again, how long errors of `far` cycles still count as the
/// fault's (a stream that was cut needs its reconnect and the upstream its resync).
const SETTLE: Duration = Duration::from_secs(5);

/// How long a client waits for one of its workers to end before it counts it unaccounted.
const END_WITHIN: Duration = Duration::from_secs(120);

/// A Roster's config for this scenario: limits sized for the run's clients (an operator
/// serving a fleet of this size raises them the same way), `cat` as the profile.
fn config(state: &Path, listen: &str, clients: usize, extra: &str) -> String {
    let connections = (clients * 4).max(1024);
    let streams = (clients * 2).max(768);
    format!(
        r#"[server]
listen = "{listen}"
state_dir = "{state}"
shutdown_grace = "2s"
max_connections = {connections}
max_connections_per_peer = {connections}
max_streams = {streams}

[[runtimes]]
name = "local"
source = "embedded"
max_workers = {workers}
max_finished = 1024
grace = "1s"
[runtimes.profiles.cat]
command = ["/bin/cat"]
{extra}"#,
        state = state.display(),
        workers = (clients * 2).max(64),
    )
}

/// What every client adds to.
#[derive(Debug)]
struct Shared {
    start: Instant,
    deadline: Instant,
    /// Upstream kills so far (a cycle that saw this change overlapped an outage).
    kills: AtomicU64,
    /// Milliseconds since `start` until which `far` errors are the fault's; `u64::MAX`
    /// while the upstream is down.
    fault_until_ms: AtomicU64,
    requests: AtomicU64,
    spawned: AtomicU64,
    ended: AtomicU64,
    echoed: AtomicU64,
    cycles: AtomicU64,
    throttled: AtomicU64,
    fault_errors: AtomicU64,
    unexpected: AtomicU64,
    unaccounted: AtomicU64,
    events: AtomicU64,
    resets: AtomicU64,
    kept: Mutex<Vec<String>>,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Counts an error: the fault's when `far` and the cycle begun at kill count `epoch`
    /// overlapped an outage or its settling time; unexpected otherwise.
    fn error(&self, far: Option<u64>, what: String) {
        let fault = far.is_some_and(|epoch| {
            self.kills.load(Ordering::SeqCst) != epoch
                || self.now_ms() < self.fault_until_ms.load(Ordering::SeqCst)
        });
        if fault {
            self.fault_errors.fetch_add(1, Ordering::Relaxed);
        } else {
            self.unexpected.fetch_add(1, Ordering::Relaxed);
            self.keep(what);
        }
    }

    fn keep(&self, what: String) {
        if let Ok(mut kept) = self.kept.lock() {
            if kept.len() < KEPT_ERRORS {
                kept.push(what);
            }
        }
    }
}

/// The answer to one request, as the loop needs it.
enum Answer {
    Ok(Bytes),
    /// `429`: documented, retried.
    Throttled,
    /// Counted as an error already.
    Failed,
}

/// One request; a status outside `want` (other than 429) is an error.
async fn call(
    c: &mut Client,
    sh: &Shared,
    far: Option<u64>,
    method: Method,
    path: &str,
    body: Option<&str>,
    want: &[StatusCode],
) -> Answer {
    sh.requests.fetch_add(1, Ordering::Relaxed);
    match c.json(method.clone(), path, body).await {
        Ok((s, b)) if want.contains(&s) => Answer::Ok(b),
        Ok((StatusCode::TOO_MANY_REQUESTS, _)) => {
            sh.throttled.fetch_add(1, Ordering::Relaxed);
            Answer::Throttled
        }
        Ok((s, b)) => {
            sh.error(
                far,
                format!("{method} {path}: {s} {}", String::from_utf8_lossy(&b)),
            );
            Answer::Failed
        }
        Err(e) => {
            sh.error(far, format!("{method} {path}: {e:#}"));
            Answer::Failed
        }
    }
}

fn ok(a: Answer) -> Option<Bytes> {
    match a {
        Answer::Ok(b) => Some(b),
        Answer::Throttled | Answer::Failed => None,
    }
}

/// Runs the scenario.
pub async fn run(opts: &Opts, dir: &Path) -> Result<Vec<Row>> {
    let clients = opts
        .load_clients
        .unwrap_or(if opts.tiny { 16 } else { 1000 })
        .max(4);
    let secs = opts.load_secs.unwrap_or(if opts.tiny { 6.0 } else { 60.0 });
    let mark = format!("{}-{}", std::process::id(), free_port()?);

    let up_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let up_config = config(&dir.join("up-state"), &up_addr.to_string(), clients, "");
    let mut upstream = Some(Roster::start(dir, "upstream", &up_config).await?);
    let far = format!(
        "[[runtimes]]\nname = \"far\"\nsource = \"remote\"\nurl = \"http://{up_addr}\"\n\
         remote_runtime = \"local\"\nbackoff_base = \"50ms\"\nbackoff_cap = \"1s\"\n"
    );
    let down_config = config(&dir.join("down-state"), "127.0.0.1:0", clients, &far);
    let mut downstream = Roster::start(dir, "downstream", &down_config).await?;
    let addr = downstream.addr;
    let idle_rss = downstream.rss()?;

    let start = Instant::now();
    let sh = Arc::new(Shared {
        start,
        deadline: start + Duration::from_secs_f64(secs),
        kills: AtomicU64::new(0),
        fault_until_ms: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        spawned: AtomicU64::new(0),
        ended: AtomicU64::new(0),
        echoed: AtomicU64::new(0),
        cycles: AtomicU64::new(0),
        throttled: AtomicU64::new(0),
        fault_errors: AtomicU64::new(0),
        unexpected: AtomicU64::new(0),
        unaccounted: AtomicU64::new(0),
        events: AtomicU64::new(0),
        resets: AtomicU64::new(0),
        kept: Mutex::new(Vec::new()),
    });
    progress(&format!(
        "load: {clients} clients for {secs} s, the upstream SIGKILLed twice"
    ));

    // The sampler: downstream RSS and live marked processes, once a second.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sampler = {
        let (pid, mark, mut stop) = (downstream.daemon.pid, mark.clone(), stop_rx.clone());
        tokio::spawn(async move {
            let (mut rss, mut groups) = (Vec::new(), 0usize);
            loop {
                if let Ok(b) = crate::common::rss_bytes(pid) {
                    rss.push((start.elapsed().as_secs_f64(), b));
                }
                groups = groups.max(marked(&mark).1);
                if tokio::time::timeout(Duration::from_secs(1), stop.changed())
                    .await
                    .is_ok()
                {
                    return (rss, groups);
                }
            }
        })
    };

    let mut tasks = Vec::new();
    for i in 0..clients {
        let (sh, mark) = (sh.clone(), mark.clone());
        tasks.push(tokio::spawn(client(sh, addr, i, mark)));
    }
    let watchers: Vec<_> = (0..(clients / 50).max(2))
        .map(|_| tokio::spawn(watch(sh.clone(), addr, stop_rx.clone())))
        .collect();

    // The faults: at a third and two thirds of the run.
    let mut c = downstream.client().await?;
    let mut heal_ms = Vec::new();
    for k in 1..=2u32 {
        tokio::time::sleep_until(
            (start + Duration::from_secs_f64(secs * f64::from(k) / 3.0)).into(),
        )
        .await;
        progress(&format!("load: SIGKILL the upstream ({k}/2)"));
        sh.fault_until_ms.store(u64::MAX, Ordering::SeqCst);
        sh.kills.fetch_add(1, Ordering::SeqCst);
        if let Some(mut up) = upstream.take() {
            up.daemon.kill().await?;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let up = Roster::start(dir, "upstream", &up_config).await?;
        let answered = Instant::now();
        crate::poll_until!(
            "the far runtime is ready again",
            WAIT,
            (health(&mut c).await? == "ready").then_some(())
        );
        heal_ms.push(answered.elapsed().as_secs_f64() * 1e3);
        upstream = Some(up);
        let settled = sh.now_ms() + u64::try_from(SETTLE.as_millis())?;
        sh.fault_until_ms.store(settled, Ordering::SeqCst);
    }

    for t in tasks {
        t.await?;
    }
    let load_end = start.elapsed().as_secs_f64();
    progress("load: every client is done");

    // Nothing live is left in the registry, and no marked process on the machine.
    let (status, body) = c
        .json(
            Method::GET,
            "/v1/workers?state=starting,running,stopping,unknown&limit=100",
            None,
        )
        .await?;
    ensure!(status == StatusCode::OK, "listing live workers: {status}");
    let live = serde_json::from_slice::<Value>(&body)?["workers"]
        .as_array()
        .map_or(0, Vec::len);
    let after_rss = downstream.rss()?;
    let left_running = poll_marked(&mark, Duration::from_secs(10)).await;
    let _ = stop_tx.send(true);
    for w in watchers {
        w.await?;
    }
    let (rss, groups_peak) = sampler.await?;
    downstream.daemon.stop().await?;
    if let Some(mut up) = upstream.take() {
        up.daemon.stop().await?;
    }
    let left_after_exit = poll_marked(&mark, Duration::from_secs(10)).await;

    let n = |a: &AtomicU64| a.load(Ordering::SeqCst);
    let kept = sh.kept.lock().map(|k| k.clone()).unwrap_or_default();
    let (spawned, ended) = (n(&sh.spawned), n(&sh.ended));
    progress(&format!(
        "load: {} requests, {spawned} spawned, {ended} ended, {} echoed, {} throttled, \
         {} fault errors, {} unexpected, {} unaccounted, {live} live, \
         {left_running}+{left_after_exit} processes left",
        n(&sh.requests),
        n(&sh.echoed),
        n(&sh.throttled),
        n(&sh.fault_errors),
        n(&sh.unexpected),
        n(&sh.unaccounted),
    ));
    for e in &kept {
        progress(&format!("load: error: {e}"));
    }
    ensure!(
        n(&sh.unexpected) == 0,
        "{} errors other than 429 or the upstream's outage, first: {kept:?}",
        n(&sh.unexpected)
    );
    ensure!(spawned > 0 && n(&sh.echoed) > 0, "the load did no work");
    ensure!(
        n(&sh.unaccounted) == 0 && ended == spawned,
        "{spawned} workers spawned, {ended} seen to end"
    );
    ensure!(live == 0, "{live} workers still live after the run");
    ensure!(
        left_running == 0 && left_after_exit == 0,
        "worker processes left: {left_running} after the run, {left_after_exit} after exit"
    );

    // RSS: idle, a tenth into the load (every client busy), halfway (the finished records
    // at their cap, every connection's buffers grown: the end of the warm-up), the end.
    let at = |t: f64| {
        rss.iter()
            .find(|(s, _)| *s >= t)
            .or(rss.last())
            .map_or(0, |(_, b)| *b)
    };
    let kib = |b: u64| b as f64 / 1024.0;
    let (rss_start, rss_mid, rss_end) = (at(secs / 10.0), at(secs / 2.0), at(load_end));
    let by_tenth: Vec<String> = (1..=10)
        .map(|t| format!("{:.0}", kib(at(secs * f64::from(t) / 10.0)) / 1024.0))
        .collect();
    progress(&format!(
        "load: RSS at each tenth of the run, MiB: {}",
        by_tenth.join(" ")
    ));
    let rss_peak = rss.iter().map(|(_, b)| *b).max().unwrap_or(0);
    let metric = format!("{clients} clients × {secs} s, upstream SIGKILLed twice");
    let elapsed = load_end.max(1e-3);
    let mut errors = Row::new(
        "load",
        &metric,
        "roster errors",
        "errors",
        Better::Lower,
        vec![n(&sh.unexpected) as f64],
    )
    .count("requests", n(&sh.requests))
    .count("spawned", spawned)
    .count("ended", ended)
    .count("echoed", n(&sh.echoed))
    .count("cycles", n(&sh.cycles))
    .count("throttled_429", n(&sh.throttled))
    .count("fault_errors", n(&sh.fault_errors))
    .count("live_after", live as u64)
    .count("processes_left", (left_running + left_after_exit) as u64)
    .count("process_groups_peak", groups_peak as u64)
    .count("events", n(&sh.events))
    .count("resets", n(&sh.resets));
    errors.limit(0.0, "0 besides 429 and the outage");
    let mut flat = Row::new(
        "load",
        &metric,
        "roster RSS end/half",
        "ratio",
        Better::Lower,
        vec![rss_end as f64 / (rss_mid.max(1)) as f64],
    )
    .count("rss_idle_kib", kib(idle_rss) as u64)
    .count("rss_start_kib", kib(rss_start) as u64)
    .count("rss_half_kib", kib(rss_mid) as u64)
    .count("rss_peak_kib", kib(rss_peak) as u64)
    .count("rss_end_kib", kib(rss_end) as u64)
    .count("rss_after_kib", kib(after_rss) as u64);
    flat.limit(1.1, "flat: end ≤ 1.1 × halfway");
    Ok(vec![
        errors,
        Row::new(
            "load",
            &metric,
            "roster requests",
            "req/s",
            Better::Higher,
            vec![n(&sh.requests) as f64 / elapsed],
        ),
        Row::new(
            "load",
            &metric,
            "roster cycles",
            "cycles/s",
            Better::Higher,
            vec![n(&sh.cycles) as f64 / elapsed],
        ),
        flat,
        Row::new("load", &metric, "roster heal", "ms", Better::Lower, heal_ms),
    ])
}

/// One client's loop.
async fn client(sh: Arc<Shared>, addr: SocketAddr, i: usize, mark: String) {
    let on_far = i % 4 == 3;
    let runtime = if on_far { "far" } else { "local" };
    let mut c = loop {
        match Client::connect(addr).await {
            Ok(c) => break c,
            Err(e) => {
                sh.error(None, format!("connect: {e:#}"));
                if Instant::now() >= sh.deadline {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let body =
        json!({"profile": "cat", "env": {MARK_VAR: mark}, "labels": {"load": "1"}}).to_string();
    let spawn = format!("/v1/runtimes/{runtime}/workers");
    let mut k = 0u64;
    while Instant::now() < sh.deadline {
        k += 1;
        let epoch = sh.kills.load(Ordering::SeqCst);
        let far = on_far.then_some(epoch);
        let created = call(
            &mut c,
            &sh,
            far,
            Method::POST,
            &spawn,
            Some(&body),
            &[StatusCode::CREATED],
        )
        .await;
        let Some(created) = ok(created) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let id = match serde_json::from_slice::<Value>(&created)
            .ok()
            .and_then(|v| v["id"].as_str().map(str::to_owned))
        {
            Some(id) => id,
            None => {
                sh.error(None, "a 201 without an id".into());
                continue;
            }
        };
        sh.spawned.fetch_add(1, Ordering::Relaxed);
        let done = cycle(&mut c, &sh, addr, far, runtime, &id, k)
            .await
            .is_some();
        if done {
            sh.cycles.fetch_add(1, Ordering::Relaxed);
        }
        confirm_end(&mut c, &sh, far, &id, done).await;
    }
}

/// Get, list, follow, input and its echo, stop and the stream's end. `None` when a step
/// failed (counted already).
async fn cycle(
    c: &mut Client,
    sh: &Shared,
    addr: SocketAddr,
    far: Option<u64>,
    runtime: &str,
    id: &str,
    k: u64,
) -> Option<()> {
    let worker = format!("/v1/workers/{id}");
    let want_ok = [StatusCode::OK];
    ok(call(c, sh, far, Method::GET, &worker, None, &want_ok).await)?;
    let list = format!("/v1/workers?runtime={runtime}&label=load=1&limit=20");
    ok(call(c, sh, far, Method::GET, &list, None, &want_ok).await)?;
    sh.requests.fetch_add(1, Ordering::Relaxed);
    let mut out = match SseStream::open(addr, &format!("{worker}/output?follow=1"), &[]).await {
        Ok(s) => s,
        Err(e) if format!("{e:#}").contains("429") => {
            sh.throttled.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Err(e) => {
            sh.error(far, format!("opening the output of {id}: {e:#}"));
            return None;
        }
    };
    let line = format!("ping-{k}");
    let input = json!({"data": format!("{line}\n")}).to_string();
    let input_path = format!("{worker}/input");
    let accepted = [StatusCode::ACCEPTED];
    ok(call(
        c,
        sh,
        far,
        Method::POST,
        &input_path,
        Some(&input),
        &accepted,
    )
    .await)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    read_until(sh, far, &mut out, deadline, id, "its echo", |ev| {
        ev.event == "output" && ev.data.contains(&line)
    })
    .await?;
    sh.echoed.fetch_add(1, Ordering::Relaxed);
    let stop = format!("{worker}/stop");
    ok(call(c, sh, far, Method::POST, &stop, Some("{}"), &accepted).await)?;
    read_until(sh, far, &mut out, deadline, id, "`end`", |ev| {
        ev.event == "end"
    })
    .await
}

/// Reads `out` until an event `hit` accepts; an `end` first, a closed stream or the
/// deadline are errors.
async fn read_until(
    sh: &Shared,
    far: Option<u64>,
    out: &mut SseStream,
    deadline: Instant,
    id: &str,
    what: &str,
    hit: impl Fn(&crate::common::SseEvent) -> bool,
) -> Option<()> {
    loop {
        match out.next(deadline).await {
            Ok(Some((ev, _))) if hit(&ev) => return Some(()),
            Ok(Some((ev, _))) if ev.event == "end" => {
                sh.error(far, format!("the output of {id} ended before {what}"));
                return None;
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                sh.error(far, format!("the output of {id} closed before {what}"));
                return None;
            }
            Err(e) => {
                sh.error(
                    far,
                    format!("the output of {id}, waiting for {what}: {e:#}"),
                );
                return None;
            }
        }
    }
}

/// Stops the worker if the cycle did not, and polls it until it is terminal.
async fn confirm_end(c: &mut Client, sh: &Shared, far: Option<u64>, id: &str, stopped: bool) {
    let worker = format!("/v1/workers/{id}");
    let stop = format!("{worker}/stop");
    let give_up = Instant::now() + END_WITHIN;
    let mut stopped = stopped;
    loop {
        if !stopped {
            let answer = call(
                c,
                sh,
                far,
                Method::POST,
                &stop,
                Some("{}"),
                &[StatusCode::ACCEPTED],
            )
            .await;
            stopped = matches!(answer, Answer::Ok(_));
        }
        if let Answer::Ok(b) = call(c, sh, far, Method::GET, &worker, None, &[StatusCode::OK]).await
        {
            let state = serde_json::from_slice::<Value>(&b)
                .ok()
                .and_then(|v| v["state"].as_str().map(str::to_owned))
                .unwrap_or_default();
            if terminal(&state) {
                sh.ended.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        if Instant::now() >= give_up {
            sh.unaccounted.fetch_add(1, Ordering::Relaxed);
            sh.keep(format!("{id} did not end within {END_WITHIN:?}"));
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `/v1/events` subscriber for the whole run: counts events and resets.
async fn watch(sh: Arc<Shared>, addr: SocketAddr, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut cursor: Option<String> = None;
    while !*stop.borrow() {
        let headers: Vec<(&str, &str)> = cursor
            .as_deref()
            .map(|c| vec![("last-event-id", c)])
            .unwrap_or_default();
        let mut s = match SseStream::open(addr, "/v1/events", &headers).await {
            Ok(s) => s,
            Err(e) => {
                if format!("{e:#}").contains("429") {
                    sh.throttled.fetch_add(1, Ordering::Relaxed);
                } else {
                    sh.error(None, format!("opening /v1/events: {e:#}"));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        loop {
            let deadline = Instant::now() + Duration::from_secs(3600);
            let next = tokio::select! {
                next = s.next(deadline) => next,
                _ = stop.changed() => return,
            };
            match next {
                Ok(Some((ev, _))) => {
                    sh.events.fetch_add(1, Ordering::Relaxed);
                    if ev.event == "reset" {
                        sh.resets.fetch_add(1, Ordering::Relaxed);
                    }
                    if ev.id.is_some() {
                        cursor = ev.id;
                    }
                }
                Ok(None) => {
                    sh.error(None, "/v1/events closed during the run".into());
                    break;
                }
                Err(e) => {
                    sh.error(None, format!("/v1/events: {e:#}"));
                    break;
                }
            }
        }
    }
}

/// Processes with this run's marker in their environment, and their process groups.
fn marked(mark: &str) -> (usize, usize) {
    let needle = format!("{MARK_VAR}={mark}");
    let mut groups = std::collections::HashSet::new();
    let mut count = 0;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return (0, 0);
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if !env.split(|b| *b == 0).any(|v| v == needle.as_bytes()) {
            continue;
        }
        // A zombie still has its environment until reaped: only live processes count.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let mut fields = stat
            .rsplit_once(')')
            .map_or("", |(_, r)| r)
            .split_whitespace();
        let state = fields.next().unwrap_or("");
        if state == "Z" {
            continue;
        }
        count += 1;
        if let Some(pgid) = fields.nth(1) {
            groups.insert(pgid.to_owned());
        }
    }
    (count, groups.len())
}

/// Waits up to `within` for no marked process to be left; returns how many are.
async fn poll_marked(mark: &str, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let (n, _) = marked(mark);
        if n == 0 || Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
