//! Health probes of the runtime itself, with real processes: the bound on probes at once,
//! an `exec` probe killed at its timeout with everything it started, health starting over
//! at each run, and profiles whose probe does not check refused when the runtime is built.

mod common;

use std::collections::BTreeMap;

use anyhow::{ensure, Result};
use common::*;
use worker_runtime::{HealthState, Probe, ProbeKind, Profile, Runtime, RuntimeConfig};

fn probed(probe: &str, extra: &str) -> Result<Profile> {
    Ok(toml::from_str(&format!(
        "command = [\"/bin/sh\", \"-c\"]\n{extra}\nprobe = {{ {probe} }}"
    ))?)
}

fn runtime_with(profile: Profile, max_probes: usize) -> Runtime {
    Runtime::new(RuntimeConfig {
        max_probes,
        profiles: BTreeMap::from([("sh".to_string(), profile)]),
        ..Default::default()
    })
    .expect("runtime")
}

/// Whether process `pid` is gone (or only a zombie that is about to be reaped).
fn gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 2..].chars().next())
            .is_some_and(|state| state == 'Z'),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn no_more_probes_run_at_once_than_max_probes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path().display();
    // Each probe holds a directory while it runs; one that finds it taken leaves a mark.
    let script = format!(
        "mkdir {d}/held 2>/dev/null || {{ touch {d}/overlap; exit 1; }}; \
         echo x >> {d}/count; sleep 0.02; rmdir {d}/held"
    );
    let probe =
        format!("exec = [\"/bin/sh\", \"-c\", {script:?}], interval = \"10ms\", timeout = \"5s\"");
    let rt = runtime_with(probed(&probe, "")?, 1);
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(rt.spawn(sh("exec sleep 60")).await?.id);
    }
    let count = dir.path().join("count");
    eventually("30 probes", || {
        let n = std::fs::read_to_string(&count).ok()?.lines().count();
        (n >= 30).then_some(())
    })
    .await?;
    ensure!(
        !dir.path().join("overlap").exists(),
        "two probes ran at once with max_probes = 1"
    );
    for id in &ids {
        let w = rt.get(*id)?;
        ensure!(
            w.health.is_some_and(|h| h.probe == ProbeKind::Exec),
            "{w:?}"
        );
    }
    rt.shutdown(Some(std::time::Duration::ZERO)).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exec_probe_past_its_timeout_is_killed_with_what_it_started() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pids = dir.path().join("pids");
    // The probe starts a child and both wait far longer than the timeout.
    let script = format!(
        "sleep 300 & echo $! >> {p}; echo $$ >> {p}; wait",
        p = pids.display()
    );
    let probe = format!(
        "exec = [\"/bin/sh\", \"-c\", {script:?}], interval = \"100ms\", timeout = \"200ms\", \
         failure_threshold = 1"
    );
    let rt = runtime_with(probed(&probe, "")?, 4);
    let id = rt.spawn(sh("exec sleep 60")).await?.id;
    eventually("unhealthy", || {
        rt.get(id)
            .ok()
            .filter(|w| w.health.is_some_and(|h| h.status == HealthState::Unhealthy))
    })
    .await?;
    let first: Vec<String> = std::fs::read_to_string(&pids)?
        .lines()
        .take(2)
        .map(str::to_string)
        .collect();
    ensure!(first.len() == 2, "{first:?}");
    for pid in &first {
        eventually(&format!("probe process {pid} to be gone"), || {
            gone(pid).then_some(())
        })
        .await?;
    }
    rt.shutdown(Some(std::time::Duration::ZERO)).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn health_starts_over_unknown_at_each_run() -> Result<()> {
    let profile = probed(
        "exec = [\"true\"], interval = \"20ms\"",
        "restart = \"always\"\nrestart_backoff = { base = \"60s\", cap = \"60s\" }",
    )?;
    let rt = runtime_with(profile, 4);
    let id = rt.spawn(sh("read line; exit 0")).await?.id;
    let healthy = eventually("healthy", || {
        rt.get(id)
            .ok()
            .filter(|w| w.health.is_some_and(|h| h.status == HealthState::Healthy))
    })
    .await?;
    ensure!(healthy.restarts == 0);
    rt.input(id, "go\n".into())?;
    let waiting = eventually("a restart scheduled", || {
        rt.get(id).ok().filter(|w| w.retry_at.is_some())
    })
    .await?;
    let health = waiting.health.expect("a probed worker has health");
    ensure!(health.status == HealthState::Unknown, "{waiting:?}");
    ensure!(
        Some(health.since) == waiting.last_exit.map(|e| e.at),
        "{waiting:?}"
    );
    rt.stop(id, None)?;
    terminal(&rt, id).await?;
    rt.shutdown(None).await;
    Ok(())
}

#[test]
fn profiles_whose_probe_does_not_check_are_refused_naming_the_key() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    for (probe, extra, key) in [
        ("tcp = \"host-9z\"", "", "probe.tcp"),
        ("http = \"https://127.0.0.9/\"", "", "probe.http"),
        (
            "tcp = \"127.0.0.9:1\", interval = \"1ms\"",
            "",
            "probe.interval",
        ),
        (
            "tcp = \"127.0.0.9:1\"",
            "on_unhealthy = \"restart\"",
            "on-failure",
        ),
    ] {
        let profile = probed(probe, extra).unwrap();
        let err = Runtime::new(RuntimeConfig {
            profiles: BTreeMap::from([("p".to_string(), profile)]),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains(key), "{probe}: {err}");
        assert!(
            !err.contains("127.0.0.9") && !err.contains("host-9z"),
            "the target stays out: {err}"
        );
    }
    let no_probe: Profile =
        toml::from_str("command = [\"true\"]\nrestart = \"always\"\non_unhealthy = \"restart\"")
            .unwrap();
    let err = Runtime::new(RuntimeConfig {
        profiles: BTreeMap::from([("p".to_string(), no_probe)]),
        ..Default::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("needs a `probe`"), "{err}");
    let max = Runtime::new(RuntimeConfig {
        max_probes: 0,
        ..Default::default()
    })
    .unwrap_err();
    assert!(max.to_string().contains("max_probes"), "{max}");
    // A probe reads from TOML like the rest of the profile.
    let p: Probe = toml::from_str("tcp = \"127.0.0.1:9\"").unwrap();
    assert!(p.tcp.is_some() && p.exec.is_none());
}
