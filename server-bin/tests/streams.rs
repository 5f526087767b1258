//! The Server-Sent-Events streams of SPEC §5, over a real server and real processes:
//! a worker's output stream (`/v1/workers/{id}/output`) and the registry's event stream
//! (`/v1/events`): frames, order, resume, gaps, resets, filters, slow clients, pings and
//! shutdown.
mod common;

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use common::{SseClient, SseEvent, TestServer, WAIT};
use http::{Method, StatusCode};
use registry_core::RuntimeId;
use serde_json::{json, Value};
use server_bin::ServeOptions;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

const TERMINAL: [&str; 3] = ["exited", "stopped", "failed"];

fn is_terminal(state: &str) -> bool {
    TERMINAL.contains(&state)
}

/// Reads events until one satisfies `stop` (included), failing after [`WAIT`] per event.
async fn read_until(
    stream: &mut SseClient,
    stop: impl Fn(&SseEvent) -> bool,
) -> Result<Vec<SseEvent>> {
    let mut out = Vec::new();
    loop {
        let ev = stream.next_event().await.with_context(|| {
            let seen: Vec<&str> = out.iter().map(|e: &SseEvent| e.event.as_str()).collect();
            format!("waiting for an event; saw {seen:?}")
        })?;
        let done = stop(&ev);
        out.push(ev);
        if done {
            return Ok(out);
        }
    }
}

/// The state of worker `id` in an event, if the event speaks of it.
fn state_of(ev: &SseEvent, id: &str) -> Option<String> {
    let worker = match ev.event.as_str() {
        "worker.upserted" | "state" => &ev.data["worker"],
        _ => return None,
    };
    (worker["id"] == id).then(|| worker["state"].as_str().unwrap_or_default().to_string())
}

/// Whether the event says worker `id` is terminal.
fn terminal_upsert(ev: &SseEvent, id: &str) -> bool {
    ev.event == "worker.upserted" && state_of(ev, id).is_some_and(|s| is_terminal(&s))
}

/// The concatenated `data` of the `output` events of one stream kind (`None`: both).
fn output_text(events: &[SseEvent], kind: Option<&str>) -> String {
    events
        .iter()
        .filter(|e| e.event == "output")
        .filter(|e| kind.is_none_or(|k| e.data["stream"] == k))
        .map(|e| e.data["data"].as_str().unwrap_or_default())
        .collect()
}

/// The `seq`s of the `output` events.
fn output_seqs(events: &[SseEvent]) -> Vec<u64> {
    events
        .iter()
        .filter(|e| e.event == "output")
        .map(|e| e.data["seq"].as_u64().unwrap_or(0))
        .collect()
}

fn event_names(events: &[SseEvent]) -> Vec<&str> {
    events.iter().map(|e| e.event.as_str()).collect()
}

/// An event cursor `<epoch hex16>-<seq>`, split.
fn cursor(ev: &SseEvent) -> Result<(String, u64)> {
    let id = ev.id.as_deref().context("an event without id")?;
    let (epoch, seq) = id.split_once('-').context("a cursor has a dash")?;
    ensure!(
        epoch.len() == 16 && epoch.bytes().all(|b| b.is_ascii_hexdigit()),
        "the cursor's epoch is 16 hex digits: {id}"
    );
    Ok((epoch.to_string(), seq.parse().context("the cursor's seq")?))
}

/// Asserts that the events' cursors share one epoch and strictly increase.
fn assert_increasing_cursors(events: &[SseEvent]) -> Result<()> {
    let mut last: Option<(String, u64)> = None;
    for ev in events {
        let c = cursor(ev)?;
        if let Some((epoch, seq)) = &last {
            ensure!(
                *epoch == c.0,
                "one epoch in a stream: {:?} then {:?}",
                last,
                c
            );
            ensure!(
                c.1 > *seq,
                "cursors increase: {seq} then {} ({})",
                c.1,
                ev.event
            );
        }
        last = Some(c);
    }
    Ok(())
}

/// `(id, event, data)` of each event, for comparing two streams.
fn triples(events: &[SseEvent]) -> Vec<(Option<String>, String, Value)> {
    events
        .iter()
        .map(|e| (e.id.clone(), e.event.clone(), e.data.clone()))
        .collect()
}

/// Spawns `sh -c script` in `runtime` and returns the worker's id.
async fn spawn_in(server: &TestServer, runtime: &str, script: &str) -> Result<String> {
    let body = json!({ "profile": "shell", "args": [script] }).to_string();
    let resp = server
        .post(&format!("/v1/runtimes/{runtime}/workers"), &body)
        .await?;
    ensure!(
        resp.status == StatusCode::CREATED,
        "spawn answered {}: {}",
        resp.status,
        resp.text()
    );
    Ok(resp.json()?["id"].as_str().context("an id")?.to_string())
}

async fn wait_terminal(server: &TestServer, id: &str) -> Result<Value> {
    server
        .wait_worker(id, |w| is_terminal(w["state"].as_str().unwrap_or_default()))
        .await
}

async fn stop_worker(server: &TestServer, id: &str) -> Result<()> {
    let resp = server
        .post(&format!("/v1/workers/{id}/stop"), r#"{"grace_ms": 1000}"#)
        .await?;
    ensure!(resp.status == StatusCode::ACCEPTED, "stop: {}", resp.text());
    wait_terminal(server, id).await?;
    Ok(())
}

/// Opens `path` and reads it to its end, retrying until `ready` holds for what it sent.
async fn read_whole_until(
    server: &TestServer,
    path: &str,
    ready: impl Fn(&[SseEvent]) -> bool,
) -> Result<(Vec<SseEvent>, String)> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut stream = server.sse(path, &[]).await?;
        let events = stream.rest(WAIT).await?;
        if ready(&events) {
            return Ok((events, stream.raw_text()));
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "{path} never held what was awaited: {:?}",
                event_names(&events)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A marker no other process on the host has in its command line.
fn unique_marker() -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("randomness");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("marker-{hex}")
}

/// `(pid, process group)` of every process whose command line holds `marker`.
fn processes_with(marker: &str) -> Vec<(u32, u32)> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if !String::from_utf8_lossy(&cmdline).contains(marker) {
            continue;
        }
        if let Some(group) = process_group(pid) {
            found.push((pid, group));
        }
    }
    found
}

/// The process group of `pid` (the fifth field of `/proc/<pid>/stat`).
fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(2)?.parse().ok()
}

/// Whether any live (not zombie) process is in process group `group`.
fn group_alive(group: u32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|entry| {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            return false;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        let Some(close) = stat.rfind(')') else {
            return false;
        };
        let mut fields = stat[close + 1..].split_whitespace();
        let state = fields.next();
        let pgrp = fields.nth(1).and_then(|g| g.parse::<u32>().ok());
        pgrp == Some(group) && state != Some("Z")
    })
}

/// Polls `check` until it holds, failing with `what` after [`WAIT`].
async fn eventually(what: &str, check: impl Fn() -> bool) -> Result<()> {
    common::eventually_sync(&format!("never happened: {what}"), WAIT, check).await
}

// ---------------------------------------------------------------------------------------
// The output stream
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn output_stream_sends_retry_state_ordered_chunks_terminal_state_end_then_closes(
) -> Result<()> {
    let server = TestServer::start().await?;
    let id = server
        .spawn_shell("echo out-1; echo err-1 >&2; echo out-2")
        .await?;
    let mut stream = server.sse(&format!("/v1/workers/{id}/output"), &[]).await?;
    assert_eq!(
        stream.headers["content-type"], "text/event-stream",
        "an SSE content type"
    );
    assert_eq!(stream.headers["cache-control"], "no-cache");
    let events = stream.rest(WAIT).await?;
    let raw = stream.raw_text();
    assert!(
        raw.starts_with("retry: 1000\n"),
        "the first line is `retry: 1000`: {raw:?}"
    );
    let names = event_names(&events);
    assert_eq!(
        names.first(),
        Some(&"state"),
        "state comes first: {names:?}"
    );
    assert_eq!(events[0].data["worker"]["id"], id.as_str());
    assert_eq!(names.last(), Some(&"end"), "end comes last: {names:?}");
    for ev in &events {
        assert!(ev.id.is_some(), "every event has an id: {ev:?}");
    }
    // The last state before `end` is the terminal one.
    let last_state = events
        .iter()
        .rev()
        .find(|e| e.event == "state")
        .context("a state")?;
    assert_eq!(
        last_state.data["worker"]["state"], "exited",
        "{last_state:?}"
    );
    assert_eq!(last_state.data["worker"]["exit_code"], 0);
    let end_at = events.len() - 1;
    let last_state_at = events.iter().rposition(|e| e.event == "state").unwrap_or(0);
    let last_output_at = events
        .iter()
        .rposition(|e| e.event == "output")
        .unwrap_or(0);
    assert!(
        last_output_at < end_at && last_state_at < end_at,
        "end follows every chunk and the terminal state: {names:?}"
    );
    // Output: seq from 1, strictly increasing, id = seq, the right stream kinds.
    let seqs = output_seqs(&events);
    assert_eq!(seqs.first(), Some(&1), "seq starts at 1: {seqs:?}");
    assert!(
        seqs.windows(2).all(|w| w[1] > w[0]),
        "seqs strictly increase: {seqs:?}"
    );
    for ev in events.iter().filter(|e| e.event == "output") {
        assert_eq!(ev.id.as_deref(), Some(ev.data["seq"].to_string().as_str()));
        assert!(ev.data["data"].is_string(), "{ev:?}");
    }
    assert_eq!(output_text(&events, Some("stdout")), "out-1\nout-2\n");
    assert_eq!(output_text(&events, Some("stderr")), "err-1\n");
    // The server closed the stream: `rest` returned because the body ended.
    assert!(stream.next_event_within(WAIT).await?.is_none());
    server.stop().await?;
    Ok(())
}

const FIFTY_LINES: &str = "for i in $(seq 1 50); do echo line-$i; sleep 0.02; done";

fn fifty_lines() -> String {
    (1..=50).map(|i| format!("line-{i}\n")).collect()
}

/// Reads output events until `n` more chunks arrived (or the stream ended).
async fn read_chunks(stream: &mut SseClient, n: usize) -> Result<Vec<SseEvent>> {
    let mut out = Vec::new();
    let mut chunks = 0;
    while chunks < n {
        let ev = stream.next_event().await?;
        let last = ev.event == "end";
        chunks += usize::from(ev.event == "output");
        out.push(ev);
        if last {
            break;
        }
    }
    Ok(out)
}

#[tokio::test]
async fn output_resumes_with_last_event_id_or_after_without_loss_or_repeat() -> Result<()> {
    let server = TestServer::start().await?;
    let id = server.spawn_shell(FIFTY_LINES).await?;
    let path = format!("/v1/workers/{id}/output");

    let mut first = server.sse(&path, &[]).await?;
    let part1 = read_chunks(&mut first, 5).await?;
    drop(first);
    let last1 = part1.last().and_then(|e| e.id.clone()).context("an id")?;

    let mut second = server.sse(&path, &[("last-event-id", &last1)]).await?;
    let part2 = read_chunks(&mut second, 5).await?;
    drop(second);
    assert_eq!(
        part2[0].event, "state",
        "a resumed stream starts with the worker's state"
    );
    assert_eq!(part2[0].id.as_deref(), Some(last1.as_str()));
    let last2 = part2.last().and_then(|e| e.id.clone()).context("an id")?;

    let mut third = server.sse(&format!("{path}?after={last2}"), &[]).await?;
    let part3 = third.rest(WAIT).await?;
    assert_eq!(part3.last().map(|e| e.event.as_str()), Some("end"));

    let all: Vec<SseEvent> = part1.iter().chain(&part2).chain(&part3).cloned().collect();
    assert!(
        all.iter().all(|e| e.event != "gap"),
        "nothing is lost: {:?}",
        event_names(&all)
    );
    let seqs = output_seqs(&all);
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "every chunk once, in order");
    assert_eq!(output_text(&all, None), fifty_lines());
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn output_last_event_id_header_wins_over_after_query() -> Result<()> {
    let server = TestServer::start().await?;
    let id = server
        // Two pipes: at least two chunks.
        .spawn_shell("for i in 1 2 3; do echo out-$i; echo err-$i >&2; sleep 0.01; done")
        .await?;
    wait_terminal(&server, &id).await?;
    let path = format!("/v1/workers/{id}/output");
    let all = server.sse(&path, &[]).await?.rest(WAIT).await?;
    let seqs = output_seqs(&all);
    ensure!(seqs.len() >= 2, "several chunks: {seqs:?}");
    let resume = seqs[0];
    let resumed = server
        .sse(
            &format!("{path}?after=0"),
            &[("last-event-id", &resume.to_string())],
        )
        .await?
        .rest(WAIT)
        .await?;
    assert_eq!(output_seqs(&resumed), seqs[1..].to_vec());
    assert_eq!(
        output_text(&all, None),
        format!(
            "{}{}",
            all.iter()
                .find(|e| e.event == "output")
                .and_then(|e| e.data["data"].as_str())
                .unwrap_or_default(),
            output_text(&resumed, None)
        )
    );
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn output_follow_0_on_finished_worker_returns_everything_and_end() -> Result<()> {
    let server = TestServer::start().await?;
    let id = server.spawn_shell("echo one; echo two >&2").await?;
    wait_terminal(&server, &id).await?;
    let mut stream = server
        .sse(&format!("/v1/workers/{id}/output?follow=0"), &[])
        .await?;
    let events = stream.rest(WAIT).await?;
    let names = event_names(&events);
    assert_eq!(names.first(), Some(&"state"), "{names:?}");
    assert_eq!(events[0].data["worker"]["state"], "exited");
    assert_eq!(names.last(), Some(&"end"), "{names:?}");
    assert_eq!(output_text(&events, Some("stdout")), "one\n");
    assert_eq!(output_text(&events, Some("stderr")), "two\n");
    assert_eq!(output_seqs(&events).first(), Some(&1));
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn output_follow_0_on_running_worker_returns_retained_and_closes_without_end() -> Result<()> {
    let server = TestServer::start().await?;
    let id = server.spawn_shell("echo first; exec sleep 30").await?;
    let path = format!("/v1/workers/{id}/output?follow=0");
    let (events, _) = read_whole_until(&server, &path, |evs| {
        output_text(evs, None).contains("first\n")
    })
    .await?;
    let names = event_names(&events);
    assert_eq!(names.first(), Some(&"state"), "{names:?}");
    assert_eq!(events[0].data["worker"]["state"], "running");
    assert!(!names.contains(&"end"), "no end while it runs: {names:?}");
    assert_eq!(output_text(&events, None), "first\n");
    // The worker still runs: the stream closed because of follow=0, not because it ended.
    let w = server.get(&format!("/v1/workers/{id}")).await?.json()?;
    assert_eq!(w["state"], "running");
    stop_worker(&server, &id).await?;
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn output_beyond_retention_starts_with_gap_then_continues_after_it() -> Result<()> {
    let server = TestServer::start_with(
        common::config("output_retention = 64"),
        ServeOptions::default(),
    )
    .await?;
    // Lines longer than the retention, with pauses so that they are separate chunks.
    let pad = "p".repeat(90);
    let id = server
        .spawn_shell(&format!(
            "for i in $(seq 1 30); do echo line-$i-{pad}; sleep 0.02; done"
        ))
        .await?;
    wait_terminal(&server, &id).await?;
    let path = format!("/v1/workers/{id}/output");
    let events = server.sse(&path, &[]).await?.rest(WAIT).await?;
    let names = event_names(&events);
    let at = names
        .iter()
        .position(|n| *n == "gap")
        .context("a gap event")?;
    let gap = &events[at];
    assert_eq!(gap.data["from"], 1, "{gap:?}");
    let to = gap.data["to"].as_u64().context("gap.to")?;
    assert!(to >= 1);
    assert_eq!(gap.id.as_deref(), Some(to.to_string().as_str()));
    assert!(
        !names[..at].contains(&"output"),
        "the gap comes before every chunk: {names:?}"
    );
    let seqs = output_seqs(&events);
    let expected: Vec<u64> = (to + 1..to + 1 + seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "chunks continue from to + 1");
    assert_eq!(names.last(), Some(&"end"));
    let full: String = (1..=30).map(|i| format!("line-{i}-{pad}\n")).collect();
    let kept = output_text(&events, None);
    assert!(
        kept.len() >= 64,
        "at least output_retention bytes are kept: {kept:?}"
    );
    assert!(
        full.ends_with(&kept),
        "the kept output is the newest: {kept:?}"
    );

    // A cursor inside the lost range gets the rest of the gap.
    let resumed = server
        .sse(&path, &[("last-event-id", "1")])
        .await?
        .rest(WAIT)
        .await?;
    let gap = resumed
        .iter()
        .find(|e| e.event == "gap")
        .context("a gap on resume")?;
    assert_eq!(gap.data, json!({ "from": 2, "to": to }));
    assert_eq!(output_seqs(&resumed), seqs);
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn output_invalid_utf8_is_replaced() -> Result<()> {
    let server = TestServer::start().await?;
    let id = server.spawn_shell(r"printf '\377abc'").await?;
    let events = server
        .sse(&format!("/v1/workers/{id}/output"), &[])
        .await?
        .rest(WAIT)
        .await?;
    assert_eq!(output_text(&events, None), "\u{FFFD}abc");
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn output_bad_cursor_is_400_and_unknown_worker_is_404_before_streaming() -> Result<()> {
    let server = TestServer::start().await?;
    let id = server.spawn_shell("echo hi").await?;
    let path = format!("/v1/workers/{id}/output");
    for (query, headers) in [
        ("?after=abc", vec![]),
        ("?after=-1", vec![]),
        ("?follow=maybe", vec![]),
    ] {
        let resp = server
            .request(Method::GET, &format!("{path}{query}"), &headers, None)
            .await?;
        assert_eq!(resp.status, StatusCode::BAD_REQUEST, "{query} {headers:?}");
        assert_eq!(resp.code(), "invalid_request", "{}", resp.text());
        assert_ne!(resp.headers["content-type"], "text/event-stream");
    }
    let unknown = format!("/v1/workers/w_{}/output", "0".repeat(26));
    let resp = server.get(&unknown).await?;
    assert_eq!(resp.status, StatusCode::NOT_FOUND, "{}", resp.text());
    assert_eq!(resp.code(), "worker_not_found");
    assert_ne!(resp.headers["content-type"], "text/event-stream");
    assert!(!resp.text().contains("retry:"), "no stream started");
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn output_resume_from_an_unknown_last_event_id_serves_what_is_retained() -> Result<()> {
    let server = TestServer::start().await?;
    let id = server.spawn_shell("echo one; echo two").await?;
    wait_terminal(&server, &id).await?;
    let path = format!("/v1/workers/{id}/output");
    let whole = server.sse(&path, &[]).await?.rest(WAIT).await?;
    let want = output_text(&whole, None);
    assert_eq!(want, "one\ntwo\n");
    // Malformed, beyond the newest chunk (as after a restart), and the header winning over
    // a good `after`: each is a stream of what is retained, never a 400 that would make a
    // browser's EventSource give up.
    for (query, header) in [
        ("", "abc"),
        ("", "99999"),
        ("", "e1.5"),
        ("?after=1", "abc"),
    ] {
        let mut stream = server
            .sse(&format!("{path}{query}"), &[("last-event-id", header)])
            .await?;
        let events = stream.rest(WAIT).await?;
        assert_eq!(
            output_text(&events, None),
            want,
            "{query} {header}: {events:?}"
        );
        assert_eq!(
            events.last().map(|e| e.event.as_str()),
            Some("end"),
            "{query} {header}"
        );
    }
    server.stop().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The event stream
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn events_without_cursor_start_with_snapshot_then_live_upserts_and_removal() -> Result<()> {
    let server = TestServer::start().await?;
    let earlier = server.spawn_shell("true").await?;
    wait_terminal(&server, &earlier).await?;

    let mut stream = server.sse("/v1/events", &[]).await?;
    let snapshot = stream.next_event().await?;
    assert!(stream.raw_text().starts_with("retry: 1000\n"));
    assert_eq!(snapshot.event, "snapshot");
    let runtimes = snapshot.data["runtimes"].as_array().context("runtimes")?;
    assert!(runtimes.iter().any(|r| r["id"] == "local"), "{runtimes:?}");
    let workers = snapshot.data["workers"].as_array().context("workers")?;
    assert!(
        workers
            .iter()
            .any(|w| w["id"] == earlier.as_str() && w["state"] == "exited"),
        "the snapshot holds the earlier worker: {workers:?}"
    );

    let id = server.spawn_shell("echo hi").await?;
    let live = read_until(&mut stream, |e| terminal_upsert(e, &id)).await?;
    let states: Vec<String> = live.iter().filter_map(|e| state_of(e, &id)).collect();
    assert_eq!(
        states,
        ["starting", "running", "exited"],
        "every state of the spawn, in order"
    );
    let exited = live.last().context("an event")?;
    assert_eq!(exited.data["worker"]["exit_code"], 0);

    let resp = server
        .request(Method::DELETE, &format!("/v1/workers/{id}"), &[], None)
        .await?;
    assert_eq!(resp.status, StatusCode::NO_CONTENT, "{}", resp.text());
    let more = read_until(&mut stream, |e| e.event == "worker.removed").await?;
    let removed = more.last().context("an event")?;
    assert_eq!(
        removed.data,
        json!({ "worker_id": id, "runtime_id": "local" })
    );

    let all: Vec<SseEvent> = std::iter::once(snapshot).chain(live).chain(more).collect();
    assert_increasing_cursors(&all)?;
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn events_resume_with_last_event_id_or_cursor_gets_every_later_event_once() -> Result<()> {
    let server = TestServer::start().await?;
    // A client that stays connected the whole time is the reference.
    let mut reference = server.sse("/v1/events", &[]).await?;
    let mut client = server.sse("/v1/events", &[]).await?;
    client.next_event().await?;

    let w1 = server.spawn_shell("echo one").await?;
    let seen = read_until(&mut client, |e| terminal_upsert(e, &w1)).await?;
    drop(client);
    let c1 = seen.last().and_then(|e| e.id.clone()).context("a cursor")?;

    // While the client is away.
    let w2 = server.spawn_shell("echo two").await?;
    wait_terminal(&server, &w2).await?;
    let resp = server
        .request(Method::DELETE, &format!("/v1/workers/{w1}"), &[], None)
        .await?;
    assert_eq!(resp.status, StatusCode::NO_CONTENT);

    let mut by_header = server.sse("/v1/events", &[("last-event-id", &c1)]).await?;
    let replay1 = read_until(&mut by_header, |e| e.event == "worker.removed").await?;
    drop(by_header);
    let c2 = replay1
        .last()
        .and_then(|e| e.id.clone())
        .context("a cursor")?;

    let w3 = server.spawn_shell("echo three").await?;
    wait_terminal(&server, &w3).await?;

    let mut by_query = server.sse(&format!("/v1/events?cursor={c2}"), &[]).await?;
    let replay2 = read_until(&mut by_query, |e| terminal_upsert(e, &w3)).await?;
    // The header wins over the query.
    let mut both = server
        .sse("/v1/events?cursor=garbage", &[("last-event-id", &c2)])
        .await?;
    let replay3 = read_until(&mut both, |e| terminal_upsert(e, &w3)).await?;

    let whole = read_until(&mut reference, |e| terminal_upsert(e, &w3)).await?;
    assert_increasing_cursors(&whole[1..])?;
    let after = |c: &str| -> Vec<SseEvent> {
        let at = whole
            .iter()
            .position(|e| e.id.as_deref() == Some(c))
            .expect("the cursor is one the reference saw");
        whole[at + 1..].to_vec()
    };
    let expected1 = after(&c1);
    let until_removal = expected1
        .iter()
        .position(|e| e.event == "worker.removed")
        .context("the removal")?;
    assert_eq!(
        triples(&replay1),
        triples(&expected1[..=until_removal]),
        "Last-Event-ID: every event after the cursor, once"
    );
    assert!(
        replay1.iter().any(|e| terminal_upsert(e, &w2)),
        "the replay holds what happened while away"
    );
    assert_eq!(
        triples(&replay2),
        triples(&after(&c2)),
        "?cursor=: every event after the cursor, once"
    );
    assert_eq!(triples(&replay3), triples(&replay2));
    for replay in [&replay1, &replay2, &replay3] {
        assert!(
            replay
                .iter()
                .all(|e| e.event != "snapshot" && e.event != "reset"),
            "a valid cursor is continued, not reset: {:?}",
            event_names(replay)
        );
    }
    server.stop().await?;
    Ok(())
}

/// Opens the event stream with `headers` and `query` and returns its first two events,
/// asserting they are `reset {reason}` (cursor `<epoch>-0`) and a `snapshot` of the same run.
async fn expect_reset(
    server: &TestServer,
    query: &str,
    headers: &[(&str, &str)],
    reason: &str,
) -> Result<(SseClient, SseEvent)> {
    let mut stream = server.sse(&format!("/v1/events{query}"), headers).await?;
    let reset = stream.next_event().await?;
    assert_eq!(reset.event, "reset", "{query} {headers:?}: {reset:?}");
    assert_eq!(reset.data, json!({ "reason": reason }));
    let snapshot = stream.next_event().await?;
    assert_eq!(snapshot.event, "snapshot", "{snapshot:?}");
    let (reset_epoch, reset_seq) = cursor(&reset)?;
    let (snap_epoch, _) = cursor(&snapshot)?;
    assert_eq!(reset_seq, 0, "a reset carries the run's origin cursor");
    assert_eq!(reset_epoch, snap_epoch);
    Ok((stream, snapshot))
}

#[tokio::test]
async fn malformed_cursor_gets_reset_and_snapshot() -> Result<()> {
    let server = TestServer::start().await?;
    let id = server.spawn_shell("true").await?;
    wait_terminal(&server, &id).await?;
    expect_reset(&server, "?cursor=abc", &[], "malformed").await?;
    let (mut stream, snapshot) =
        expect_reset(&server, "", &[("last-event-id", "abc")], "malformed").await?;
    assert!(snapshot.data["workers"]
        .as_array()
        .is_some_and(|ws| ws.iter().any(|w| w["id"] == id.as_str())));
    // A cursor of this run from the future is not one the registry issued either.
    let (epoch, seq) = cursor(&snapshot)?;
    let ahead = format!("{epoch}-{}", seq + 1000);
    expect_reset(&server, &format!("?cursor={ahead}"), &[], "malformed").await?;
    // After the reset the stream is live.
    let next = server.spawn_shell("true").await?;
    read_until(&mut stream, |e| terminal_upsert(e, &next)).await?;
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn expired_cursor_gets_reset_and_snapshot() -> Result<()> {
    let mut config = common::config("");
    config.server.event_retention = 4;
    let server = TestServer::start_with(config, ServeOptions::default()).await?;
    let mut first = server.sse("/v1/events", &[]).await?;
    let snapshot = first.next_event().await?;
    let old = snapshot.id.clone().context("a cursor")?;
    drop(first);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let id = server.spawn_shell("true").await?;
        wait_terminal(&server, &id).await?;
        ids.push(id);
    }
    let (mut stream, snapshot) =
        expect_reset(&server, "", &[("last-event-id", &old)], "expired").await?;
    let workers = snapshot.data["workers"].as_array().context("workers")?;
    for id in &ids {
        assert!(
            workers
                .iter()
                .any(|w| w["id"] == id.as_str() && w["state"] == "exited"),
            "the snapshot holds {id}: {workers:?}"
        );
    }
    expect_reset(&server, &format!("?cursor={old}"), &[], "expired").await?;
    let next = server.spawn_shell("true").await?;
    read_until(&mut stream, |e| terminal_upsert(e, &next)).await?;
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn cursor_from_an_earlier_run_gets_reset_and_snapshot() -> Result<()> {
    let server = TestServer::start().await?;
    let mut stream = server.sse("/v1/events", &[]).await?;
    let id = server.spawn_shell("true").await?;
    let seen = read_until(&mut stream, |e| terminal_upsert(e, &id)).await?;
    drop(stream);
    let old = seen.last().and_then(|e| e.id.clone()).context("a cursor")?;
    let dir = server.stop().await?;

    let server = TestServer::start_in(dir, common::config(""), ServeOptions::default()).await?;
    let (_, snapshot) =
        expect_reset(&server, "", &[("last-event-id", &old)], "foreign_epoch").await?;
    let (old_epoch, _) = cursor(&seen[0])?;
    let (new_epoch, _) = cursor(&snapshot)?;
    assert_ne!(old_epoch, new_epoch, "each run has its own epoch");
    expect_reset(&server, &format!("?cursor={old}"), &[], "foreign_epoch").await?;
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn events_runtime_filter_keeps_one_runtime_and_unknown_runtime_is_404() -> Result<()> {
    let mut config = common::config("");
    let mut other = config.runtimes[0].clone();
    other.id = RuntimeId::new("other")?;
    config.runtimes.push(other);
    let server = TestServer::start_with(config, ServeOptions::default()).await?;
    let elsewhere = spawn_in(&server, "other", "true").await?;
    wait_terminal(&server, &elsewhere).await?;

    let mut local = server.sse("/v1/events?runtime=local", &[]).await?;
    let mut everything = server.sse("/v1/events", &[]).await?;
    let snapshot = local.next_event().await?;
    assert_eq!(snapshot.event, "snapshot");
    let runtimes: Vec<&Value> = snapshot.data["runtimes"]
        .as_array()
        .context("runtimes")?
        .iter()
        .map(|r| &r["id"])
        .collect();
    assert_eq!(runtimes, [&json!("local")]);
    assert_eq!(snapshot.data["workers"], json!([]), "no worker of `other`");
    let full = everything.next_event().await?;
    assert_eq!(full.data["runtimes"].as_array().map(Vec::len), Some(2));

    // A worker in `other`, then one in `local`: the filtered stream sees only the second.
    let w_other = spawn_in(&server, "other", "true").await?;
    read_until(&mut everything, |e| terminal_upsert(e, &w_other)).await?;
    let w_local = server.spawn_shell("true").await?;
    let seen = read_until(&mut local, |e| terminal_upsert(e, &w_local)).await?;
    for ev in &seen {
        let runtime = match ev.event.as_str() {
            "worker.upserted" => &ev.data["worker"]["runtime_id"],
            "runtime.updated" => &ev.data["runtime"]["id"],
            "worker.removed" => &ev.data["runtime_id"],
            other => bail!("unexpected {other} on a live filtered stream"),
        };
        assert_eq!(runtime, "local", "{ev:?}");
    }

    let resp = server.get("/v1/events?runtime=nope").await?;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    assert_eq!(resp.code(), "runtime_not_found");
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn client_that_never_reads_does_not_delay_others_and_gets_lagged_reset() -> Result<()> {
    let mut config = common::config("");
    config.server.subscriber_queue = 8;
    let server = TestServer::start_with(config, ServeOptions::default()).await?;
    let mut slow = server.sse("/v1/events", &[]).await?;
    let mut reader = server.sse("/v1/events", &[]).await?;
    assert_eq!(reader.next_event().await?.event, "snapshot");

    // Big events fill the buffers between the registry and the client that does not read.
    let padding = "x".repeat(100_000);
    let mut ids = Vec::new();
    let mut seen = Vec::new();
    for _ in 0..64 {
        let id = server.spawn_shell(&format!(": {padding}; true")).await?;
        // The reading client sees each worker end before the next one starts.
        seen.extend(read_until(&mut reader, |e| terminal_upsert(e, &id)).await?);
        ids.push(id);
    }
    assert!(
        seen.iter().all(|e| e.event != "reset"),
        "the reading client never lags: {:?}",
        event_names(&seen)
    );
    assert_increasing_cursors(&seen)?;
    for id in &ids {
        let states: Vec<String> = seen.iter().filter_map(|e| state_of(e, id)).collect();
        assert_eq!(states.last().map(String::as_str), Some("exited"), "{id}");
    }

    // Now the slow client reads: what its queue held, then reset + snapshot.
    let mut held = read_until(&mut slow, |e| e.event == "reset").await?;
    let reset = held.pop().context("the reset")?;
    assert_eq!(reset.data, json!({ "reason": "lagged" }));
    assert_eq!(held.first().map(|e| e.event.as_str()), Some("snapshot"));
    assert_increasing_cursors(&held)?;
    assert!(
        held.len() < ids.len() * 3,
        "the slow client got only part of the events before its reset ({})",
        held.len()
    );
    let snapshot = slow.next_event().await?;
    assert_eq!(snapshot.event, "snapshot");
    let workers = snapshot.data["workers"].as_array().context("workers")?;
    let finals: HashMap<&str, &str> = workers
        .iter()
        .filter_map(|w| Some((w["id"].as_str()?, w["state"].as_str()?)))
        .collect();
    for id in &ids {
        assert_eq!(
            finals.get(id.as_str()),
            Some(&"exited"),
            "{id} in the snapshot"
        );
    }
    // And it carries on live.
    let next = server.spawn_shell("true").await?;
    read_until(&mut slow, |e| terminal_upsert(e, &next)).await?;
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn idle_streams_carry_ping_comments() -> Result<()> {
    let options = ServeOptions {
        sse_ping: Duration::from_millis(200),
        ..Default::default()
    };
    let server = TestServer::start_with(common::config(""), options).await?;
    let id = server.spawn_shell("exec sleep 30").await?;
    let mut events = server.sse("/v1/events", &[]).await?;
    let mut output = server.sse(&format!("/v1/workers/{id}/output"), &[]).await?;
    for stream in [&mut events, &mut output] {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !stream.raw_text().contains("\n: ping\n\n") {
            ensure!(
                tokio::time::Instant::now() < deadline,
                "no ping: {:?}",
                stream.raw_text()
            );
            // Pings are comments, not events: reading just collects the bytes, and a read
            // that finds no event in a while is cut short to look again.
            if let Ok(read) =
                tokio::time::timeout(Duration::from_millis(100), stream.next_event_within(WAIT))
                    .await
            {
                ensure!(read?.is_some(), "the stream ended: {:?}", stream.raw_text());
            }
        }
    }
    stop_worker(&server, &id).await?;
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn shutdown_ends_streams_with_final_events_and_leaves_no_process() -> Result<()> {
    let server = TestServer::start().await?;
    let marker = unique_marker();
    let id = server.spawn_shell(&format!("sleep 30; : {marker}")).await?;
    server.wait_worker(&id, |w| w["state"] == "running").await?;
    // `running` comes once the process exists; its command line shows in /proc a moment
    // later, when the kernel has finished setting up the exec'd program.
    let group = common::eventually("the worker's process to be visible", WAIT, || async {
        Ok(processes_with(&marker).first().map(|(_, group)| *group))
    })
    .await?;

    let mut events = server.sse("/v1/events", &[]).await?;
    assert_eq!(events.next_event().await?.event, "snapshot");
    let mut output = server.sse(&format!("/v1/workers/{id}/output"), &[]).await?;
    assert_eq!(output.next_event().await?.event, "state");

    server.stop().await?;

    let rest = events.rest(WAIT).await?;
    let names = event_names(&rest);
    assert_eq!(names.last(), Some(&"shutdown"), "{names:?}");
    let states: Vec<String> = rest.iter().filter_map(|e| state_of(e, &id)).collect();
    assert_eq!(
        states.last().map(String::as_str),
        Some("stopped"),
        "the worker's stop reaches the stream before shutdown: {names:?}"
    );

    let rest = output.rest(WAIT).await?;
    let names = event_names(&rest);
    match names.last() {
        Some(&"end") => {
            let state = rest
                .iter()
                .rev()
                .find_map(|e| state_of(e, &id))
                .context("a state before end")?;
            assert!(is_terminal(&state), "{state}");
        }
        Some(&"shutdown") => {}
        _ => bail!("the output stream ends with end or shutdown: {names:?}"),
    }

    eventually("the worker's processes are gone", || {
        processes_with(&marker).is_empty() && !group_alive(group)
    })
    .await?;
    Ok(())
}

/// Reads comments and events until the raw text holds `: live`, or fails after `WAIT`.
async fn read_until_live(stream: &mut SseClient) -> Result<String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !stream.raw_text().contains("\n: live\n\n") {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no `: live` comment: {:?}",
            stream.raw_text()
        );
        // Events may or may not come; only the raw text matters here.
        let _ = stream.next_event_within(Duration::from_millis(50)).await;
    }
    Ok(stream.raw_text())
}

#[tokio::test]
async fn events_say_live_once_after_the_snapshot_or_the_replay() -> Result<()> {
    let server = TestServer::start().await?;
    let mut fresh = server.sse("/v1/events", &[]).await?;
    let snapshot = fresh.next_event().await?;
    ensure!(snapshot.event == "snapshot", "{snapshot:?}");
    let raw = read_until_live(&mut fresh).await?;
    let at = |needle: &str| {
        raw.find(needle)
            .with_context(|| format!("{needle} in {raw:?}"))
    };
    ensure!(at("retry: 1000")? < at("event: snapshot")? && at("event: snapshot")? < at(": live")?);
    let cursor = snapshot.id.context("the snapshot's id")?;

    // A worker's whole life happens; a client resuming from the snapshot gets it replayed,
    // then `: live` — once, and after the replay.
    let id = server.spawn_shell("exit 0").await?;
    wait_terminal(&server, &id).await?;
    let mut resumed = server
        .sse("/v1/events", &[("last-event-id", cursor.as_str())])
        .await?;
    let raw = read_until_live(&mut resumed).await?;
    let live = raw.find(": live").context("live")?;
    let exited = raw
        .rfind("\"exited\"")
        .context("the replayed exited state")?;
    ensure!(
        exited < live,
        "`: live` came before the replay ended: {raw:?}"
    );
    ensure!(!raw.contains("event: reset"), "{raw:?}");
    // Live events after it carry no second `: live`.
    let second = server.spawn_shell("exit 0").await?;
    wait_terminal(&server, &second).await?;
    while !resumed.raw_text().contains(&second) {
        resumed.next_event().await?;
    }
    ensure!(resumed.raw_text().matches(": live").count() == 1);
    drop((fresh, resumed));
    server.stop().await?;
    Ok(())
}
