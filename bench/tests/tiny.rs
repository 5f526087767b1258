//! Runs every scenario at a tiny size, so that the suite cannot rot: each must complete and
//! count what it should (exits seen, responses, bytes, events). Never a time.
//!
//! Peers missing from `target/bench-peers` are allowed to be reported as "not measured:
//! <why>", unless `ROSTER_BENCH_REQUIRE_PEERS=1` (what `.ci/run` sets after installing them);
//! so are the docker rows when no container engine answers, unless `CI` is set or
//! `ROSTER_BENCH_REQUIRE_DOCKER=1`.

use std::process::Command;

use serde_json::Value;

fn count(row: &Value, key: &str) -> u64 {
    row["counts"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("row has no count {key}: {row}"))
}

fn rows_of<'a>(rows: &'a [Value], scenario: &str) -> Vec<&'a Value> {
    rows.iter().filter(|r| r["scenario"] == scenario).collect()
}

#[test]
fn every_scenario_completes_at_tiny_size_and_counts_its_work() {
    let out = Command::new(env!("CARGO_BIN_EXE_roster-bench"))
        .args(["all", "--tiny", "--rounds", "1", "--json", "--no-install"])
        .output()
        .expect("roster-bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "roster-bench all failed:\n{stderr}");
    // A progress line per scenario on stderr.
    for s in ["spawn", "get", "output", "fanout", "records", "heal"] {
        assert!(
            stderr.contains(&format!("scenario {s}")),
            "no progress for {s}:\n{stderr}"
        );
    }
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON rows on stdout");
    let require_peers = std::env::var("ROSTER_BENCH_REQUIRE_PEERS").is_ok_and(|v| v == "1");

    // spawn: every subject saw 10 of 10 exits, or is a peer reported as not measured.
    let spawn = rows_of(&rows, "spawn");
    for subject in ["roster", "raw", "supervisord", "circus", "pm2"] {
        let row = spawn
            .iter()
            .find(|r| r["subject"] == subject)
            .unwrap_or_else(|| panic!("no spawn row for {subject}"));
        if let Some(note) = row["note"].as_str() {
            assert!(!["roster", "raw"].contains(&subject), "{subject}: {note}");
            assert!(note.starts_with("not measured: "), "{note}");
            assert!(!require_peers, "{subject} must be measured here: {note}");
            continue;
        }
        assert_eq!(count(row, "exits_expected"), 10, "{row}");
        assert_eq!(count(row, "exits_seen"), 10, "{subject}: {row}");
        assert_eq!(row["samples"].as_array().map(Vec::len), Some(1), "{row}");
    }
    // Roster's row carries a ratio and a goal against each baseline.
    let ratios = spawn
        .iter()
        .filter(|r| r["subject"] == "roster" && r["goal"].is_object())
        .count();
    assert_eq!(ratios, 4, "roster against raw, supervisord, circus, pm2");

    // spawn's docker rows: Roster's `docker` runtime and `docker run --rm` in a loop, 10
    // containers each, or both "not measured: <why>" when no engine answers. Under CI (or
    // with ROSTER_BENCH_REQUIRE_DOCKER=1) they must be measured: `.ci/run` starts dockerd.
    let require_docker = std::env::var_os("CI").is_some()
        || std::env::var("ROSTER_BENCH_REQUIRE_DOCKER").is_ok_and(|v| v == "1");
    let containers: Vec<&&Value> = spawn
        .iter()
        .filter(|r| {
            r["metric"]
                .as_str()
                .is_some_and(|m| m.contains("container"))
        })
        .collect();
    assert_eq!(containers.len(), 2, "two docker rows: {containers:?}");
    for subject in ["roster", "docker run"] {
        let row = containers
            .iter()
            .find(|r| r["subject"] == subject)
            .unwrap_or_else(|| panic!("no docker spawn row for {subject}"));
        if let Some(note) = row["note"].as_str() {
            assert!(note.starts_with("not measured: "), "{note}");
            assert!(!require_docker, "{subject} must be measured here: {note}");
            continue;
        }
        assert_eq!(row["unit"], "containers/s", "{row}");
        assert_eq!(count(row, "exits_expected"), 10, "{row}");
        assert_eq!(count(row, "exits_seen"), 10, "{subject}: {row}");
        assert_eq!(row["samples"].as_array().map(Vec::len), Some(1), "{row}");
        if subject == "roster" {
            assert_eq!(row["ratio"][0], "docker run", "{row}");
        }
    }

    // get: both servers answered, with the same body.
    let get = rows_of(&rows, "get");
    for subject in ["roster", "bare-hyper"] {
        let row = get
            .iter()
            .find(|r| r["subject"] == subject)
            .expect("a get row");
        assert!(count(row, "ok_responses") > 0, "{row}");
        assert!(count(row, "body_bytes") > 0, "{row}");
    }

    // output: every byte arrived (or a gap said which did not), every line came back.
    let output = rows_of(&rows, "output");
    let thr = output
        .iter()
        .find(|r| r["subject"] == "roster")
        .expect("throughput row");
    assert_eq!(count(thr, "bytes_written"), 1_000_000);
    if count(thr, "gaps") == 0 {
        assert_eq!(count(thr, "bytes_delivered"), 1_000_000, "{thr}");
    }
    let p99 = output
        .iter()
        .find(|r| r["subject"] == "roster p99")
        .expect("p99 row");
    assert_eq!(count(p99, "lines_echoed"), 20, "10 lines on each path");

    // fanout: 10 subscribers each saw all 10 ends.
    let fanout = rows_of(&rows, "fanout");
    let loss = fanout
        .iter()
        .find(|r| r["subject"] == "roster lost")
        .expect("loss row");
    assert_eq!(count(loss, "ends_expected"), 100);
    assert_eq!(count(loss, "ends_delivered"), 100, "{loss}");
    assert_eq!(count(loss, "resets"), 0, "{loss}");

    // records: the daemon held 20, then 50 finished workers, and listed them.
    let records = rows_of(&rows, "records");
    for n in [20u64, 50] {
        let rss = records
            .iter()
            .find(|r| {
                r["subject"] == "roster" && r["metric"] == format!("RSS per record at {n} finished")
            })
            .unwrap_or_else(|| panic!("no RSS row at {n}"));
        assert_eq!(count(rss, "records"), n);
        let page = records
            .iter()
            .find(|r| {
                r["metric"]
                    .as_str()
                    .is_some_and(|m| m.ends_with(&format!("at {n} records")))
            })
            .unwrap_or_else(|| panic!("no page row at {n}"));
        assert_eq!(count(page, "workers_in_page"), n);
    }
    for peer in ["supervisord", "circus", "pm2"] {
        let row = records
            .iter()
            .find(|r| r["subject"] == peer && r["metric"] == "daemon idle RSS")
            .unwrap_or_else(|| panic!("no idle row for {peer}"));
        match row["note"].as_str() {
            Some(note) => assert!(!require_peers, "{peer} must be measured here: {note}"),
            None => assert!(row["median"].as_f64().is_some_and(|m| m > 0.0), "{row}"),
        }
    }

    // heal: the runtime came back and the resuming client lost nothing.
    let heal = rows_of(&rows, "heal");
    let lost = heal
        .iter()
        .find(|r| r["subject"] == "resume lost")
        .expect("lost row");
    assert_eq!(lost["median"].as_f64(), Some(0.0), "{lost}");
    assert_eq!(count(lost, "resets"), 0, "{lost}");
    assert!(count(lost, "events_resumed") > 0, "{lost}");
    let ready = heal
        .iter()
        .find(|r| r["subject"] == "roster ready")
        .expect("ready row");
    assert_eq!(
        ready["samples"].as_array().map(Vec::len),
        Some(1),
        "{ready}"
    );
}

#[test]
fn the_load_run_completes_at_tiny_size_with_every_worker_accounted_for() {
    let out = Command::new(env!("CARGO_BIN_EXE_roster-bench"))
        .args(["load", "--tiny", "--json", "--no-install"])
        .output()
        .expect("roster-bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The scenario itself fails on an unexpected error, an unaccounted worker or a
    // process left behind; the counts say it did the work and both faults happened.
    assert!(out.status.success(), "roster-bench load failed:\n{stderr}");
    assert_eq!(
        stderr.matches("SIGKILL the upstream").count(),
        2,
        "{stderr}"
    );
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON rows on stdout");
    let errors = rows
        .iter()
        .find(|r| r["scenario"] == "load" && r["subject"] == "roster errors")
        .unwrap_or_else(|| panic!("no load errors row: {rows:?}"));
    assert_eq!(errors["median"].as_f64(), Some(0.0), "{errors}");
    let spawned = count(errors, "spawned");
    assert!(spawned >= 16, "{errors}");
    assert_eq!(count(errors, "ended"), spawned, "{errors}");
    assert!(count(errors, "echoed") > 0, "{errors}");
    assert_eq!(count(errors, "processes_left"), 0, "{errors}");
    assert_eq!(count(errors, "live_after"), 0, "{errors}");
    let heal = rows
        .iter()
        .find(|r| r["scenario"] == "load" && r["subject"] == "roster heal")
        .unwrap_or_else(|| panic!("no load heal row: {rows:?}"));
    assert_eq!(heal["samples"].as_array().map(Vec::len), Some(2), "{heal}");
}
