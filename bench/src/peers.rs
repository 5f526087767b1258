//! The peers: supervisord and circus (PyPI, in a venv) and pm2 (npm), installed by
//! `bench/peers/install.sh` under `target/bench-peers/`. Each runs as a child daemon on
//! loopback with its state in the scenario's scratch folder.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use http::{Method, StatusCode};
use serde_json::Value;
use tokio::process::Command;

use crate::common::{self, free_port, peers_dir, poll, rss_bytes, Client, Daemon, WAIT};

/// The peers, in table order.
pub const PEERS: [&str; 3] = ["supervisord", "circus", "pm2"];

/// Why `peer` cannot be measured, or `None` when it is installed.
pub fn missing(peer: &str) -> Option<String> {
    let dir = peers_dir();
    if let Ok(why) = std::fs::read_to_string(dir.join(format!("{peer}.failed"))) {
        return Some(why.trim().to_string());
    }
    let exe = match peer {
        "supervisord" => dir.join("venv/bin/supervisord"),
        "circus" => dir.join("venv/bin/circusd"),
        _ => dir.join("npm/node_modules/.bin/pm2"),
    };
    (!exe.exists()).then(|| {
        "not installed (bench/peers/install.sh puts it under target/bench-peers)".to_string()
    })
}

/// One spawn round of a peer, and the daemon's RSS before and after it.
#[derive(Debug)]
pub struct Round {
    /// From the first start request to the last exit seen.
    pub secs: f64,
    /// Exits seen.
    pub exits: u64,
    /// The daemon's RSS once up, with its programs configured and none run.
    pub rss_idle: u64,
    /// The daemon's RSS after the round, holding every finished program.
    pub rss_after: u64,
}

/// Runs `n` short programs (`/bin/true`) on a fresh daemon of `peer`, 32 start requests in
/// flight where the peer's API lets the client choose (supervisord, pm2; circus starts a
/// watcher's processes itself). A peer that has not seen every exit after `cap` is cut
/// off there: the round reports the exits it saw and the time it took for them.
///
/// A round that asked for programs and saw none of them end is an error (the row becomes
/// "not measured: why"), never a rate of 0 that would make every ratio against it `inf`.
pub async fn spawn_round(peer: &str, n: usize, dir: &Path, cap: Duration) -> Result<Round> {
    std::fs::create_dir_all(dir)?;
    let round = match peer {
        "supervisord" => supervisord(n, dir, cap).await,
        "circus" => circus(n, dir, cap).await,
        _ => pm2(n, dir, cap).await,
    }?;
    ensure!(
        n == 0 || round.exits > 0,
        "{peer} saw none of its {n} programs end within the cap of {:.0} s{}",
        cap.as_secs_f64(),
        if peer == "circus" {
            " (circus forks every process of a watcher before it reaps any; raise --peer-cap-secs)"
        } else {
            ""
        }
    );
    Ok(round)
}

fn quiet(mut cmd: Command) -> Result<Daemon> {
    cmd.stderr(Stdio::null());
    let (daemon, stdout) = Daemon::spawn(cmd)?;
    // Drain stdout so that a chatty daemon never blocks on a full pipe.
    tokio::spawn(async move {
        let mut stdout = stdout;
        let _ = tokio::io::copy(&mut stdout, &mut tokio::io::sink()).await;
    });
    Ok(daemon)
}

fn xml_call(method: &str, params: &[&str]) -> String {
    let mut body =
        format!("<?xml version=\"1.0\"?><methodCall><methodName>{method}</methodName><params>");
    for p in params {
        body.push_str("<param><value>");
        body.push_str(p);
        body.push_str("</value></param>");
    }
    body.push_str("</params></methodCall>");
    body
}

async fn rpc(client: &mut Client, method: &str, params: &[&str]) -> Result<String> {
    let body = xml_call(method, params);
    let (status, answer) = client
        .request(Method::POST, "/RPC2", Some(("text/xml", &body)), &[])
        .await?;
    ensure!(status == StatusCode::OK, "supervisord {method}: {status}");
    let text = String::from_utf8_lossy(&answer).into_owned();
    ensure!(
        !text.contains("<fault>"),
        "supervisord {method} answered a fault: {text}"
    );
    Ok(text)
}

/// supervisord: one `[program:t]` with `numprocs = n`; `supervisor.startProcess` over
/// XML-RPC for each, 32 in flight; polls `getAllProcessInfo` until `n` are `EXITED`.
async fn supervisord(n: usize, dir: &Path, cap: Duration) -> Result<Round> {
    let port = free_port()?;
    let d = dir.display();
    let mut conf = format!(
        "[inet_http_server]\nport=127.0.0.1:{port}\n\
         [supervisord]\nnodaemon=true\nlogfile={d}/supervisord.log\npidfile={d}/supervisord.pid\n\
         childlogdir={d}\nloglevel=error\n\
         [rpcinterface:supervisor]\n\
         supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n"
    );
    if n > 0 {
        conf += &format!(
            "[program:t]\ncommand=/bin/true\nprocess_name=%(program_name)s_%(process_num)d\n\
             numprocs={n}\nautostart=false\nautorestart=false\nstartsecs=0\nstartretries=0\n\
             stdout_logfile=NONE\nstderr_logfile=NONE\n"
        );
    }
    let file = dir.join("supervisord.conf");
    std::fs::write(&file, conf)?;
    let mut cmd = Command::new(peers_dir().join("venv/bin/supervisord"));
    cmd.arg("-c").arg(&file);
    let mut daemon = quiet(cmd)?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    poll("supervisord answers", WAIT, || async move {
        let Ok(mut c) = Client::connect(addr).await else {
            return Ok(None);
        };
        Ok(rpc(&mut c, "supervisor.getState", &[])
            .await
            .ok()
            .map(|_| ()))
    })
    .await?;
    let rss_idle = rss_bytes(daemon.pid)?;
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..32.min(n.max(1)) {
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(());
                }
                let name = format!("<string>t:t_{i}</string>");
                rpc(
                    &mut c,
                    "supervisor.startProcess",
                    &[&name, "<boolean>0</boolean>"],
                )
                .await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let mut c = Client::connect(addr).await?;
    let cut = started + cap;
    let exits = loop {
        let info = rpc(&mut c, "supervisor.getAllProcessInfo", &[]).await?;
        let exited = info.matches("<string>EXITED</string>").count();
        if exited >= n || Instant::now() >= cut {
            break exited;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let secs = started.elapsed().as_secs_f64();
    let rss_after = rss_bytes(daemon.pid)?;
    daemon.stop().await?;
    Ok(Round {
        secs,
        exits: exits as u64,
        rss_idle,
        rss_after,
    })
}

/// circus: one watcher of `n` processes (respawn off), started by one `start` command;
/// counts the arbiter's `reap` events (the driver script `bench/peers/circus_drive.py`).
async fn circus(n: usize, dir: &Path, cap: Duration) -> Result<Round> {
    let (p1, p2, p3) = (free_port()?, free_port()?, free_port()?);
    let mut conf = format!(
        "[circus]\nendpoint = tcp://127.0.0.1:{p1}\npubsub_endpoint = tcp://127.0.0.1:{p2}\n\
         stats_endpoint = tcp://127.0.0.1:{p3}\nstatsd = false\nloglevel = error\n"
    );
    if n > 0 {
        conf += &format!(
            "[watcher:t]\ncmd = /bin/true\nnumprocesses = {n}\nautostart = false\n\
             respawn = false\nwarmup_delay = 0\ncopy_env = true\n"
        );
    }
    let file = dir.join("circus.ini");
    std::fs::write(&file, conf)?;
    let mut cmd = Command::new(peers_dir().join("venv/bin/circusd"));
    cmd.arg(&file);
    let mut daemon = quiet(cmd)?;
    let driver = common::workspace_root().join("bench/peers/circus_drive.py");
    let python = peers_dir().join("venv/bin/python");
    let endpoint = format!("tcp://127.0.0.1:{p1}");
    let pubsub = format!("tcp://127.0.0.1:{p2}");
    // Idle RSS is read once the arbiter answers.
    let probe = Command::new(&python)
        .arg("-c")
        .arg(format!(
            "import time\nfrom circus.client import CircusClient\nc=CircusClient(endpoint='{endpoint}',timeout=5)\n\
             d=time.monotonic()+60\nwhile True:\n  try:\n    c.call({{'command':'status','properties':{{}}}}); break\n  \
             except Exception:\n    assert time.monotonic()<d; time.sleep(0.05)\n"
        ))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT, probe)
        .await
        .context("circusd did not answer")??;
    ensure!(out.status.success(), "circusd did not answer");
    let rss_idle = rss_bytes(daemon.pid)?;
    if n == 0 {
        daemon.stop().await?;
        return Ok(Round {
            secs: 0.0,
            exits: 0,
            rss_idle,
            rss_after: rss_idle,
        });
    }
    let out = tokio::time::timeout(
        cap + WAIT,
        Command::new(&python)
            .arg(&driver)
            .arg(&endpoint)
            .arg(&pubsub)
            .arg("t")
            .arg(n.to_string())
            .arg(cap.as_secs_f64().to_string())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("the circus driver did not finish")??;
    ensure!(
        out.status.success(),
        "the circus driver failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).context("the circus driver's JSON")?;
    let rss_after = rss_bytes(daemon.pid)?;
    daemon.stop().await?;
    Ok(Round {
        secs: v["secs"].as_f64().context("secs")?,
        exits: v["reaped"].as_u64().context("reaped")?,
        rss_idle,
        rss_after,
    })
}

/// pm2: `n` apps of `/bin/true` (interpreter none, autorestart off), 32 `start` calls in
/// flight, counting `exit` events on pm2's bus (the driver `bench/peers/pm2_drive.js`).
async fn pm2(n: usize, dir: &Path, cap: Duration) -> Result<Round> {
    let home: PathBuf = dir.join("pm2-home");
    std::fs::create_dir_all(&home)?;
    let modules = peers_dir().join("npm/node_modules");
    let driver = common::workspace_root().join("bench/peers/pm2_drive.js");
    let drive = |count: usize| {
        let mut cmd = Command::new("node");
        cmd.arg(&driver)
            .arg(&modules)
            .arg(count.to_string())
            .arg(cap.as_secs_f64().to_string())
            .env("PM2_HOME", &home)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    };
    let out = tokio::time::timeout(WAIT, drive(0).output())
        .await
        .context("pm2 did not start")??;
    ensure!(
        out.status.success(),
        "pm2 did not start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).context("the pm2 driver's JSON")?;
    let pid = u32::try_from(v["pid"].as_u64().context("pid")?)?;
    let result = async {
        let rss_idle = rss_bytes(pid)?;
        if n == 0 {
            return Ok(Round {
                secs: 0.0,
                exits: 0,
                rss_idle,
                rss_after: rss_idle,
            });
        }
        let out = tokio::time::timeout(cap + WAIT, drive(n).output())
            .await
            .context("the pm2 driver did not finish")??;
        ensure!(
            out.status.success(),
            "the pm2 driver failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).context("the pm2 driver's JSON")?;
        Ok(Round {
            secs: v["secs"].as_f64().context("secs")?,
            exits: v["exits"].as_u64().context("exits")?,
            rss_idle,
            rss_after: rss_bytes(pid)?,
        })
    }
    .await;
    // The daemon runs detached from us: end it by its pid, and wait until it is gone.
    common::signal(pid, libc::SIGKILL);
    poll("the pm2 daemon ends", WAIT, || async move {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting for whoever adopted it.
        Ok((state.is_empty() || state.contains(") Z ")).then_some(()))
    })
    .await
    .or_else(|e| if result.is_err() { Ok(()) } else { Err(e) })?;
    result
}
