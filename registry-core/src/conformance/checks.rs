//! The conformance tests. Each states its rule in its name and its doc comment.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use tokio::time::{timeout_at, Instant};

use super::util::*;
use super::Harness;
use crate::{
    Capabilities, OutputEvent, RuntimeSource, SourceEvent, SourceKey, SourceWorker, SpawnRequest,
    StreamKind, WorkerState,
};

/// A worker's key, name and what it was asked to run are the same in what `spawn` (or the
/// harness) returned, in `get` and in `list`; `list` holds each key once; after the worker
/// ends, `get` and `list` agree on its terminal state.
pub async fn spawn_list_and_get_agree<S: RuntimeSource + ?Sized>(
    source: &S,
    harness: &dyn Harness,
) -> Result<()> {
    let caps = source.capabilities();
    let name = worker_name("agree");
    let started = start(source, harness, &long_script(caps, &name), &name).await?;
    ensure!(
        started.name.as_deref() == Some(name.as_str()),
        "expected the started worker to be named {name:?}, it is named {:?}",
        started.name
    );
    let got = source
        .get(&started.key)
        .await
        .context("expected get of the started worker to succeed")?;
    same_identity(&started, "the started worker", &got, "get")?;
    ensure!(
        may_follow(started.state, got.state),
        "expected get to show the worker in {} or a later state, it shows {}",
        started.state,
        got.state
    );
    let list = source.list().await.context("expected list to succeed")?;
    by_key(&list, "list()")?;
    let listed = find_one(&list, &started)?;
    same_identity(&got, "get", listed, "list")?;

    let ended = finish(source, &started.key).await?;
    let list = source
        .list()
        .await
        .context("expected list after the end to succeed")?;
    let listed = find_one(&list, &started)?;
    ensure!(
        comparable(listed) == comparable(&ended),
        "expected list and get to agree on the ended worker;\n  get has  {ended:?}\n  list has {listed:?}"
    );
    discard(source, &started.key).await
}

/// With a `request_id`, the same request returns the same worker and another request with
/// that id is `conflict`; name and labels are kept as asked.
pub async fn spawn_is_idempotent_by_request_id<S: RuntimeSource + ?Sized>(
    source: &S,
    harness: &dyn Harness,
) -> Result<()> {
    let request_id = unique_request_id();
    let name = worker_name("idempotent");
    let with_id = |script: &str| -> Result<SpawnRequest> {
        let mut request = harness
            .shell_request(script)
            .context("the harness gives no shell_request, which this test needs")?;
        request.request_id = Some(request_id.clone());
        request.name = Some(name.clone());
        request.labels = BTreeMap::from([("suite".to_string(), "conformance".to_string())]);
        Ok(request)
    };
    let first = source
        .spawn(with_id("exit 0")?)
        .await
        .context("expected first spawn with a request_id to succeed")?;
    ensure!(
        first.name.as_deref() == Some(name.as_str())
            && first.labels.get("suite").map(String::as_str) == Some("conformance"),
        "expected the spawned worker to keep the name and labels asked for, got name {:?} and \
         labels {:?}",
        first.name,
        first.labels
    );
    let again = source
        .spawn(with_id("exit 0")?)
        .await
        .context("expected second spawn with the same request_id and request to succeed")?;
    ensure!(
        again.key == first.key,
        "expected the same worker for the same request_id and request, got a second worker \
         (named {})",
        named(&again)
    );
    expect_error(
        source.spawn(with_id("exit 1")?).await,
        "conflict",
        "a spawn with a used request_id and another request",
    )?;
    let got = source
        .get(&first.key)
        .await
        .context("expected get to succeed")?;
    same_identity(&first, "spawn", &got, "get")?;
    let list = source.list().await.context("expected list to succeed")?;
    let count = list
        .iter()
        .filter(|w| w.labels == first.labels && w.name == first.name)
        .count();
    ensure!(
        count == 1,
        "expected one worker for one request_id, list() holds {count} with its name and labels"
    );
    discard(source, &first.key).await
}

/// Output chunks of stdout and stderr share one `seq` that starts at 1 and has no holes,
/// and each stream's bytes arrive in the order written (also where the source merges the
/// two streams into one); `End` comes last.
pub async fn output_seq_starts_at_one_without_holes<S: RuntimeSource + ?Sized>(
    source: &S,
    harness: &dyn Harness,
) -> Result<()> {
    let script = "i=1; while [ $i -le 50 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done";
    let worker = start(source, harness, script, &worker_name("order")).await?;
    let events = read_all(source, &worker.key, 0, true).await?;
    check_sequence(&events, 0)?;
    ensure!(
        !events.iter().any(|e| matches!(e, OutputEvent::Gap { .. })),
        "expected no Gap for 700 bytes of output, got {}",
        describe_output(&events)
    );
    ensure!(
        events.last() == Some(&OutputEvent::End),
        "expected End last once the worker ended, got {}",
        describe_output(&events)
    );
    let want_out: String = (1..=50).map(|i| format!("out{i}\n")).collect();
    let want_err: String = (1..=50).map(|i| format!("err{i}\n")).collect();
    let (got_out, got_err) = if harness.streams_merged() {
        // One stream: each stream's lines, picked out of it, must keep their order.
        let merged = text(&events, StreamKind::Stdout);
        let lines = |prefix: &str| -> String {
            merged
                .split_inclusive('\n')
                .filter(|line| line.starts_with(prefix))
                .collect()
        };
        ensure!(
            merged.len() == want_out.len() + want_err.len(),
            "expected the merged stream to hold both streams' {} bytes and nothing else, got \
             {merged:?}",
            want_out.len() + want_err.len()
        );
        (lines("out"), lines("err"))
    } else {
        (
            text(&events, StreamKind::Stdout),
            text(&events, StreamKind::Stderr),
        )
    };
    ensure!(
        got_out == want_out,
        "expected stdout out1..out50 in order, got {got_out:?}"
    );
    ensure!(
        got_err == want_err,
        "expected stderr err1..err50 in order, got {got_err:?}"
    );
    discard(source, &worker.key).await
}

/// `output(after: k)` sends exactly the chunks with `seq > k` (the same chunks, byte for
/// byte), then `End`; after the last seq only `End` comes.
pub async fn output_after_seq_sends_only_later_chunks<S: RuntimeSource + ?Sized>(
    source: &S,
    harness: &dyn Harness,
) -> Result<()> {
    let script = "i=1; while [ $i -le 12 ]; do echo line$i; i=$((i+1)); sleep 0.02; done";
    let worker = start(source, harness, script, &worker_name("resume")).await?;
    let all = read_all(source, &worker.key, 0, true).await?;
    check_sequence(&all, 0)?;
    let chunks: Vec<_> = chunks(&all).cloned().collect();
    ensure!(
        !chunks.is_empty() && all.last() == Some(&OutputEvent::End),
        "expected chunks then End, got {}",
        describe_output(&all)
    );
    let last = chunks.last().map_or(0, |c| c.seq);
    let mut points = vec![1, last / 2, last];
    points.dedup();
    for after in points {
        for follow in [true, false] {
            let got = read_all(source, &worker.key, after, follow).await?;
            check_sequence(&got, after)?;
            let mut want: Vec<OutputEvent> = chunks
                .iter()
                .filter(|c| c.seq > after)
                .cloned()
                .map(OutputEvent::Chunk)
                .collect();
            want.push(OutputEvent::End);
            ensure!(
                got == want,
                "expected output(after: {after}, follow: {follow}) of an ended worker to send \
                 {}, got {}",
                describe_output(&want),
                describe_output(&got)
            );
        }
    }
    discard(source, &worker.key).await
}

/// `output(after: k)` with `k` past the worker's last `seq` is `invalid_request`, with and
/// without follow: no client can have seen that chunk, so the cursor is not of this worker.
/// From the last `seq` itself only `End` comes.
pub async fn output_after_beyond_last_seq_is_invalid_request<S: RuntimeSource + ?Sized>(
    source: &S,
    harness: &dyn Harness,
) -> Result<()> {
    let script = "echo one; echo two >&2";
    let worker = start(source, harness, script, &worker_name("after-beyond")).await?;
    let all = read_all(source, &worker.key, 0, true).await?;
    check_sequence(&all, 0)?;
    let last = chunks(&all).last().map_or(0, |c| c.seq);
    ensure!(
        last >= 1 && all.last() == Some(&OutputEvent::End),
        "expected chunks then End, got {}",
        describe_output(&all)
    );
    for follow in [true, false] {
        let at_last = read_all(source, &worker.key, last, follow).await?;
        ensure!(
            at_last == [OutputEvent::End],
            "expected output(after: {last}, follow: {follow}) of an ended worker whose last seq \
             is {last} to send only End, got {}",
            describe_output(&at_last)
        );
        for after in [last + 1, u64::MAX] {
            expect_error(
                source
                    .output(&worker.key, crate::OutputRequest { after, follow })
                    .await,
                "invalid_request",
                &format!("output(after: {after}, follow: {follow}) past the last seq {last}"),
            )?;
        }
    }
    discard(source, &worker.key).await
}

/// When the retained output no longer holds the asked-for `seq`, the stream says so with a
/// `Gap` before the first retained chunk; the retained chunks are the last bytes written
/// and at least `output_retention` of them.
pub async fn output_beyond_retention_starts_with_gap<S: RuntimeSource + ?Sized>(
    source: &S,
    harness: &dyn Harness,
) -> Result<()> {
    const LINE: &str = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-+";
    let retention = harness
        .output_retention()
        .context("the harness gives no output_retention, which this test needs")?;
    let total = retention.saturating_mul(8).max(512 * 1024);
    let script = format!("yes '{LINE}' | head -c {total}");
    let worker = start(source, harness, &script, &worker_name("gap")).await?;
    wait_terminal(source, &worker.key).await?;

    let all = read_all(source, &worker.key, 0, true).await?;
    check_sequence(&all, 0)?;
    let lost_to = match all.first() {
        Some(OutputEvent::Gap { from: 1, to }) => *to,
        _ => bail!(
            "expected a Gap from seq 1 first (the worker wrote {total} bytes, {retention} are \
             retained), got {}",
            describe_output(&all)
        ),
    };
    ensure!(
        all.last() == Some(&OutputEvent::End),
        "expected End last, got {}",
        describe_output(&all)
    );
    let kept: Vec<u8> = chunks(&all).flat_map(|c| c.data.iter().copied()).collect();
    ensure!(
        kept.len() as u64 >= retention,
        "expected at least the last {retention} bytes to be retained, {} are",
        kept.len()
    );
    let written: Vec<u8> = format!("{LINE}\n")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(usize::try_from(total)?)
        .collect();
    ensure!(
        kept.len() <= written.len() && written.ends_with(&kept),
        "expected the retained chunks to be the last {} bytes written, they differ",
        kept.len()
    );

    // Resuming from inside the lost range also says what was lost.
    let resumed = read_all(source, &worker.key, 1, false).await?;
    check_sequence(&resumed, 1)?;
    let mut want: Vec<OutputEvent> = Vec::new();
    if lost_to >= 2 {
        want.push(OutputEvent::Gap {
            from: 2,
            to: lost_to,
        });
    }
    want.extend(
        all.iter()
            .filter(|e| matches!(e, OutputEvent::Chunk(_)))
            .cloned(),
    );
    want.push(OutputEvent::End);
    ensure!(
        resumed == want,
        "expected output(after: 1, follow: false) to send {}, got {}",
        describe_output(&want),
        describe_output(&resumed)
    );
    discard(source, &worker.key).await
}

/// A following stream sends `End` after the last chunk of an ended worker and then closes;
/// `follow: false` sends what is retained and closes, with `End` only when the worker is
/// terminal.
pub async fn output_end_follows_last_chunk_and_no_follow_closes<S: RuntimeSource + ?Sized>(
    source: &S,
    harness: &dyn Harness,
) -> Result<()> {
    let caps = source.capabilities();
    let script = "echo one; sleep 0.2; echo two; sleep 0.2; echo three";
    let worker = start(source, harness, script, &worker_name("end")).await?;
    let followed = read_all(source, &worker.key, 0, true).await?;
    check_sequence(&followed, 0)?;
    ensure!(
        followed.last() == Some(&OutputEvent::End),
        "expected End last on a following stream of a worker that ended, got {}",
        describe_output(&followed)
    );
    let out = text(&followed, StreamKind::Stdout);
    ensure!(
        out == "one\ntwo\nthree\n",
        "expected every line before End, got {out:?}"
    );
    let now = source
        .get(&worker.key)
        .await
        .context("expected get after End to succeed")?;
    ensure!(
        now.state.is_terminal(),
        "expected the worker to be terminal once End was sent, it is {}",
        brief(&now)
    );
    let retained = read_all(source, &worker.key, 0, false).await?;
    ensure!(
        retained == followed,
        "expected output(follow: false) of an ended worker to send what a following stream \
         sent, {}; got {}",
        describe_output(&followed),
        describe_output(&retained)
    );
    discard(source, &worker.key).await?;

    // A live worker: `follow: false` closes without End.
    let name = worker_name("no-follow");
    let script = format!("echo ready; {}", long_script(caps, &name));
    let live = start(source, harness, &script, &name).await?;
    let mut following = open_output(source, &live.key, 0, true).await?;
    let mut seen = Vec::new();
    read_until_text(&mut following, &mut seen, StreamKind::Stdout, "ready\n").await?;
    let snapshot = read_all(source, &live.key, 0, false)
        .await
        .context("output(follow: false) of a live worker must close by itself")?;
    check_sequence(&snapshot, 0)?;
    let still = source
        .get(&live.key)
        .await
        .context("expected get to succeed")?;
    if !still.state.is_terminal() {
        ensure!(
            !snapshot.contains(&OutputEvent::End),
            "expected no End from output(follow: false) of a live worker, got {}",
            describe_output(&snapshot)
        );
    }
    ensure!(
        text(&snapshot, StreamKind::Stdout).starts_with("ready\n"),
        "expected output(follow: false) to send the retained \"ready\" line, got {}",
        describe_output(&snapshot)
    );
    finish(source, &live.key).await?;
    read_to_close(&mut following, &mut seen).await?;
    check_sequence(&seen, 0)?;
    ensure!(
        seen.last() == Some(&OutputEvent::End),
        "expected End last on a following stream once the worker ended, got {}",
        describe_output(&seen)
    );
    discard(source, &live.key).await
}

/// Bytes sent with `input` reach the worker's stdin.
pub async fn input_reaches_the_worker<S: RuntimeSource + ?Sized>(
    source: &S,
    harness: &dyn Harness,
) -> Result<()> {
    let worker = start(
        source,
        harness,
        "read line; echo got:$line",
        &worker_name("input"),
    )
    .await?;
    let mut rx = open_output(source, &worker.key, 0, true).await?;
    source
        .input(&worker.key, Bytes::from_static(b"hello\n"))
        .await
        .context("expected input to a worker that reads stdin to succeed")?;
    let mut seen = Vec::new();
    read_to_close(&mut rx, &mut seen).await?;
    let out = text(&seen, StreamKind::Stdout);
    ensure!(
        out == "got:hello\n",
        "expected the worker to echo \"got:hello\" after input \"hello\\n\", its stdout is {out:?}"
    );
    discard(source, &worker.key).await
}

/// `input` to a worker that ended is `conflict`.
pub async fn input_to_ended_worker_is_conflict<S: RuntimeSource + ?Sized>(
    source: &S,
    harness: &dyn Harness,
) -> Result<()> {
    let worker = start(source, harness, "exit 0", &worker_name("input-ended")).await?;
    wait_terminal(source, &worker.key).await?;
    expect_error(
        source
            .input(&worker.key, Bytes::from_static(b"late\n"))
            .await,
        "conflict",
        "input to an ended worker",
    )?;
    discard(source, &worker.key).await
}

/// A stop with a grace ends a worker that heeds SIGTERM well before the grace, as `stopped`.
pub async fn stop_with_grace_ends_stopped<S: RuntimeSource + ?Sized>(
    source: &S,
    harness: &dyn Harness,
) -> Result<()> {
    let grace = Duration::from_secs(20);
    let script = "echo ready; while :; do sleep 0.1; done";
    let worker = start(source, harness, script, &worker_name("stop")).await?;
    wait_running(source, &worker.key).await?;
    source
        .stop(&worker.key, Some(grace))
        .await
        .context("expected stop of a running worker to succeed")?;
    let ended = wait_terminal(source, &worker.key)
        .await
        .context("a shell without a trap ends on SIGTERM, long before the grace of 20 s")?;
    ensure!(
        ended.state == WorkerState::Stopped,
        "expected a worker ended by stop to be stopped, it is {}",
        brief(&ended)
    );
    ensure!(
        ended.ended_at.is_some(),
        "expected ended_at on a stopped worker, it is None"
    );
    discard(source, &worker.key).await
}

/// A worker that ignores SIGTERM gets it (its trap runs), stays live until the grace has
/// passed, and is then killed: it ends `stopped`.
pub async fn stop_escalates_to_kill_after_grace<S: RuntimeSource + ?Sized>(
    source: &S,
    harness: &dyn Harness,
) -> Result<()> {
    let grace = Duration::from_millis(1500);
    let script = "trap 'echo term' TERM; echo ready; while :; do sleep 0.1; done";
    let worker = start(source, harness, script, &worker_name("escalate")).await?;
    let mut rx = open_output(source, &worker.key, 0, true).await?;
    let mut seen = Vec::new();
    read_until_text(&mut rx, &mut seen, StreamKind::Stdout, "ready\n").await?;
    let asked = Instant::now();
    source
        .stop(&worker.key, Some(grace))
        .await
        .context("expected stop of a worker that traps SIGTERM to succeed")?;
    read_until_text(&mut rx, &mut seen, StreamKind::Stdout, "term\n")
        .await
        .context("the worker's TERM trap must run when it is stopped")?;
    let during = source
        .get(&worker.key)
        .await
        .context("expected get during the grace to succeed")?;
    let waited = asked.elapsed();
    if waited < grace {
        ensure!(
            !during.state.is_terminal(),
            "expected the worker to stay live during the grace ({waited:?} of {grace:?} \
             passed), it is {}",
            brief(&during)
        );
    }
    let ended = wait_for_within(source, &worker.key, "terminal", grace + WAIT, |w| {
        w.state.is_terminal()
    })
    .await
    .context("a worker that traps SIGTERM must be killed once the grace has passed")?;
    let took = asked.elapsed();
    ensure!(
        took + Duration::from_millis(100) >= grace,
        "expected the worker to be killed no earlier than the grace of {grace:?}, it ended after \
         {took:?}"
    );
    ensure!(
        ended.state == WorkerState::Stopped,
        "expected a worker killed after the grace to be stopped, it is {}",
        brief(&ended)
    );
    read_to_close(&mut rx, &mut seen).await?;
    ensure!(
        seen.last() == Some(&OutputEvent::End),
        "expected End last once the killed worker's output is drained, got {}",
        describe_output(&seen)
    );
    discard(source, &worker.key).await
}

/// A second `stop` succeeds; `stop` on a terminal worker is a no-op that succeeds and keeps
/// its state, exit code and end time.
pub async fn stop_twice_succeeds_and_stop_on_terminal_is_noop<S: RuntimeSource + ?Sized>(
    source: &S,
    harness: &dyn Harness,
) -> Result<()> {
    let caps = source.capabilities();
    let name = worker_name("stop-twice");
    let worker = start(source, harness, &long_script(caps, &name), &name).await?;
    wait_running(source, &worker.key).await?;
    source
        .stop(&worker.key, Some(Duration::from_secs(5)))
        .await
        .context("expected first stop to succeed")?;
    source
        .stop(&worker.key, Some(Duration::from_secs(5)))
        .await
        .context("a second stop while the first is under way must succeed")?;
    let ended = wait_terminal(source, &worker.key).await?;
    ensure!(
        ended.state == WorkerState::Stopped,
        "expected stopped after two stops, got {}",
        brief(&ended)
    );
    source
        .stop(&worker.key, None)
        .await
        .context("stop on a stopped worker must succeed")?;
    let after = source
        .get(&worker.key)
        .await
        .context("expected get to succeed")?;
    ensure!(
        comparable(&after) == comparable(&ended),
        "expected stop on a stopped worker to change nothing;\n  before {ended:?}\n  after  {after:?}"
    );
    discard(source, &worker.key).await?;

    let worker = start(source, harness, "exit 3", &worker_name("stop-exited")).await?;
    let ended = wait_terminal(source, &worker.key).await?;
    if caps.spawn {
        ensure!(
            ended.state == WorkerState::Exited && ended.exit_code == Some(3),
            "expected a worker that ran `exit 3` to be exited with code 3, it is {}",
            brief(&ended)
        );
    }
    source
        .stop(&worker.key, Some(Duration::from_secs(1)))
        .await
        .context("stop on an exited worker must succeed")?;
    let after = source
        .get(&worker.key)
        .await
        .context("expected get to succeed")?;
    ensure!(
        comparable(&after) == comparable(&ended),
        "expected stop on an exited worker to change nothing;\n  before {ended:?}\n  after  {after:?}"
    );
    discard(source, &worker.key).await
}

/// Every operation on a key the source does not know is `worker_not_found`: a made-up key,
/// a real key with something appended, and (where records can be removed) a removed key.
pub async fn unknown_key_is_worker_not_found<S: RuntimeSource + ?Sized>(
    source: &S,
    harness: &dyn Harness,
) -> Result<()> {
    let caps = source.capabilities();
    let worker = start(source, harness, "exit 0", &worker_name("unknown")).await?;
    wait_terminal(source, &worker.key).await?;
    let mut keys = vec![
        ("an empty key", SourceKey::new("")),
        (
            "a made-up key",
            SourceKey::new("conformance-no-such-worker"),
        ),
        (
            "a real key with a suffix",
            SourceKey::new(format!("{}#no-such-worker", worker.key.as_str())),
        ),
    ];
    if caps.remove {
        source
            .remove(&worker.key)
            .await
            .context("expected remove of an ended worker to succeed")?;
        keys.push(("a removed worker's key", worker.key.clone()));
    }
    for (what, key) in &keys {
        expect_error(
            source.get(key).await,
            "worker_not_found",
            &format!("get of {what}"),
        )?;
        if caps.stop {
            expect_error(
                source.stop(key, None).await,
                "worker_not_found",
                &format!("stop of {what}"),
            )?;
        }
        if caps.input {
            expect_error(
                source.input(key, Bytes::from_static(b"x\n")).await,
                "worker_not_found",
                &format!("input to {what}"),
            )?;
        }
        if caps.output {
            expect_error(
                source
                    .output(
                        key,
                        crate::OutputRequest {
                            after: 0,
                            follow: false,
                        },
                    )
                    .await,
                "worker_not_found",
                &format!("output of {what}"),
            )?;
        }
        if caps.remove {
            expect_error(
                source.remove(key).await,
                "worker_not_found",
                &format!("remove of {what}"),
            )?;
        }
    }
    if !caps.remove {
        discard(source, &worker.key).await?;
    }
    Ok(())
}

/// Once terminal, a worker never changes: `get` keeps its state, exit code and end time
/// whatever is asked of it, and the only lifecycle event about it afterwards (other than
/// repeating it unchanged) is its removal.
pub async fn terminal_state_never_changes<S: RuntimeSource + ?Sized>(
    source: &S,
    harness: &dyn Harness,
) -> Result<()> {
    let caps = source.capabilities();
    let (mut rx, _) = open_events(source).await?;
    let worker = start(source, harness, "exit 7", &worker_name("terminal")).await?;
    let ended = wait_terminal(source, &worker.key).await?;
    if caps.spawn {
        ensure!(
            ended.state == WorkerState::Exited && ended.exit_code == Some(7),
            "expected a worker that ran `exit 7` to be exited with code 7, it is {}",
            brief(&ended)
        );
    }
    if caps.stop {
        source
            .stop(&worker.key, None)
            .await
            .context("expected stop of an ended worker to succeed")?;
    }
    if caps.input {
        // Refused (another test checks how); it must not change the worker either way.
        let _ = source.input(&worker.key, Bytes::from_static(b"x\n")).await;
    }
    if caps.output {
        read_all(source, &worker.key, 0, false).await?;
    }
    let after = source
        .get(&worker.key)
        .await
        .context("expected get to succeed")?;
    ensure!(
        comparable(&after) == comparable(&ended),
        "expected the terminal worker to stay as it was;\n  then {ended:?}\n  now  {after:?}"
    );
    // A second worker that ends marks a point in the stream: events are in order, so
    // anything the first worker's operations caused comes before the marker's end.
    let marker = start(source, harness, "exit 0", &worker_name("marker")).await?;
    wait_terminal(source, &marker.key).await?;
    if caps.remove {
        source
            .remove(&worker.key)
            .await
            .context("expected remove of the ended worker to succeed")?;
    }

    let deadline = Instant::now() + WAIT;
    let mut terminal: Option<SourceWorker> = None;
    let mut removed = false;
    let mut marker_ended = false;
    while !(marker_ended && (removed || !caps.remove)) {
        let event = next_event_until(
            &mut rx,
            "the marker worker's end (and the removal) on the lifecycle stream",
            deadline,
        )
        .await?;
        let mine: Vec<Option<&SourceWorker>> = match &event {
            SourceEvent::Upsert(w) if w.key == worker.key => vec![Some(w)],
            SourceEvent::Upsert(w) if w.key == marker.key => {
                marker_ended |= w.state.is_terminal();
                vec![]
            }
            SourceEvent::Removed(k) if *k == worker.key => vec![None],
            SourceEvent::Resync(list) => {
                marker_ended |= list
                    .iter()
                    .any(|w| w.key == marker.key && w.state.is_terminal());
                let found = list.iter().find(|w| w.key == worker.key);
                match (found, &terminal) {
                    (Some(w), _) => vec![Some(w)],
                    (None, Some(_)) => vec![None],
                    (None, None) => vec![],
                }
            }
            _ => vec![],
        };
        for seen in mine {
            if removed {
                bail!(
                    "expected nothing about a worker after its removal, got {}",
                    describe_event(&event)
                );
            }
            match (seen, &terminal) {
                (None, _) => removed = true,
                (Some(w), Some(t)) if comparable(w) != comparable(t) => bail!(
                    "expected a terminal worker never to change, it was reported as {t:?}, then \
                     as {w:?}"
                ),
                (Some(w), None) if w.state.is_terminal() => terminal = Some(w.clone()),
                (Some(_), _) => {}
            }
        }
    }
    let reported = terminal.context(
        "expected the lifecycle stream to report the worker's terminal state, it did not",
    )?;
    ensure!(
        comparable(&reported) == comparable(&ended),
        "expected the lifecycle stream to report the terminal worker as get does;\n  get    \
         {ended:?}\n  stream {reported:?}"
    );
    discard(source, &marker.key).await?;
    if !caps.remove {
        discard(source, &worker.key).await?;
    }
    Ok(())
}

/// The lifecycle events of one worker come in order: each state may follow the one before
/// it (`starting → running → stopping → exited | stopped | failed`, never back), and the last
/// one is terminal and agrees with `get`.
pub async fn lifecycle_events_of_a_worker_come_in_order<S: RuntimeSource + ?Sized>(
    source: &S,
    harness: &dyn Harness,
) -> Result<()> {
    let caps = source.capabilities();
    let (mut rx, _) = open_events(source).await?;
    let mut workers = vec![
        start(
            source,
            harness,
            "sleep 0.2; exit 0",
            &worker_name("order-a"),
        )
        .await?,
    ];
    if caps.stop {
        let name = worker_name("order-b");
        let b = start(source, harness, &long_script(caps, &name), &name).await?;
        wait_running(source, &b.key).await?;
        source
            .stop(&b.key, None)
            .await
            .context("expected stop to succeed")?;
        workers.push(b);
    }
    let mut ended = Vec::new();
    for w in &workers {
        ended.push(wait_terminal(source, &w.key).await?);
    }

    let mut states: BTreeMap<SourceKey, Vec<WorkerState>> = BTreeMap::new();
    let done = |states: &BTreeMap<SourceKey, Vec<WorkerState>>| {
        workers.iter().all(|w| {
            states
                .get(&w.key)
                .and_then(|s| s.last())
                .is_some_and(|s| s.is_terminal())
        })
    };
    let deadline = Instant::now() + WAIT;
    while !done(&states) {
        let event = next_event_until(
            &mut rx,
            "each worker's terminal state on the lifecycle stream",
            deadline,
        )
        .await
        .with_context(|| {
            let by_name: Vec<(String, &Vec<WorkerState>)> = workers
                .iter()
                .filter_map(|w| Some((named(w), states.get(&w.key)?)))
                .collect();
            format!("states seen so far: {by_name:?}")
        })?;
        let reported: Vec<&SourceWorker> = match &event {
            SourceEvent::Upsert(w) => vec![w],
            SourceEvent::Resync(list) => list.iter().collect(),
            _ => vec![],
        };
        for w in reported {
            if !workers.iter().any(|x| x.key == w.key) {
                continue;
            }
            let seq = states.entry(w.key.clone()).or_default();
            if let Some(&prev) = seq.last() {
                ensure!(
                    may_follow(prev, w.state),
                    "expected a worker's states to move forward, got {} after {} (states so far \
                     {seq:?})",
                    w.state,
                    prev
                );
            }
            seq.push(w.state);
        }
    }
    for w in &ended {
        let last = states[&w.key].last().copied();
        ensure!(
            last == Some(w.state),
            "expected the last state on the stream to be the one get shows, {}, got {last:?}",
            w.state
        );
    }
    if caps.stop {
        ensure!(
            ended[1].state == WorkerState::Stopped,
            "expected the stopped worker to end stopped, it is {}",
            brief(&ended[1])
        );
    }
    for w in &workers {
        discard(source, &w.key).await?;
    }
    Ok(())
}

/// The lifecycle stream starts with a `Resync` that holds exactly what `list` holds.
pub async fn events_start_with_resync_equal_to_list<S: RuntimeSource + ?Sized>(
    source: &S,
    harness: &dyn Harness,
) -> Result<()> {
    let caps = source.capabilities();
    let done = start(source, harness, "exit 0", &worker_name("resync-ended")).await?;
    wait_terminal(source, &done.key).await?;
    let name = worker_name("resync-live");
    let live = start(source, harness, &long_script(caps, &name), &name).await?;
    wait_running(source, &live.key).await?;

    let mut attempt = 0;
    loop {
        attempt += 1;
        let before = by_key(
            &source.list().await.context("expected list to succeed")?,
            "list()",
        )?;
        let (_rx, first) = open_events(source).await?;
        let first = by_key(&first, "the first Resync")?;
        let after = by_key(
            &source.list().await.context("expected list to succeed")?,
            "list()",
        )?;
        if first == after {
            ensure!(
                first.contains_key(&done.key) && first.contains_key(&live.key),
                "expected the first Resync to hold the workers just started"
            );
            break;
        }
        // Only a list that changed meanwhile excuses a difference; try again then.
        if before == after || attempt == 3 {
            bail!(
                "expected the first Resync to equal list():{}",
                diff("list()", &after, "the Resync", &first)
            );
        }
    }
    discard(source, &live.key).await?;
    discard(source, &done.key).await
}

/// A lifecycle stream left unread past what the source can buffer gets a fresh `Resync`
/// later, and what the stream says from there on adds up to exactly what `list` holds:
/// the source never loses track silently.
pub async fn events_overflow_is_followed_by_resync<S: RuntimeSource + ?Sized>(
    source: &S,
    harness: &dyn Harness,
) -> Result<()> {
    let overflow = harness
        .events_to_overflow()
        .context("the harness gives no events_to_overflow, which this test needs")?;
    let caps = source.capabilities();
    let (mut rx, first) = open_events(source).await?;
    let mut fold = Fold::new(&first)?;
    // Each round makes at least one event (the new worker), mostly three (new, ended,
    // removed); `overflow` rounds make well over `overflow` events.
    for _ in 0..overflow {
        let w = start(source, harness, "exit 0", &worker_name("flood")).await?;
        wait_terminal(source, &w.key).await?;
        if caps.remove {
            source
                .remove(&w.key)
                .await
                .context("expected remove of an ended worker to succeed")?;
        }
    }
    let truth = by_key(
        &source.list().await.context("expected list to succeed")?,
        "list()",
    )?;
    let deadline = Instant::now() + WAIT;
    let mut read = 0usize;
    while fold.resyncs == 0 || fold.workers != truth {
        match timeout_at(deadline, rx.recv()).await {
            Ok(Some(event)) => {
                read += 1;
                fold.apply(&event)?;
            }
            Ok(None) => {
                bail!("expected the lifecycle stream to stay open, it closed after {read} events")
            }
            Err(_) if fold.resyncs == 0 => bail!(
                "expected a Resync after at least {overflow} unread events (the harness's \
                 events_to_overflow), none came in {read} events read"
            ),
            Err(_) => bail!(
                "expected the events from the last Resync on to add up to list():{}",
                diff("list()", &truth, "the stream", &fold.workers)
            ),
        }
    }
    Ok(())
}

/// `remove` of a live worker is `conflict` and changes nothing; of a terminal one it
/// removes the record: a `Removed` event, then `get` and a second `remove` are
/// `worker_not_found`, and `list` no longer holds it.
pub async fn remove_live_is_conflict_and_remove_terminal_removes<S: RuntimeSource + ?Sized>(
    source: &S,
    harness: &dyn Harness,
) -> Result<()> {
    let caps = source.capabilities();
    let name = worker_name("remove");
    let worker = start(source, harness, &long_script(caps, &name), &name).await?;
    expect_error(
        source.remove(&worker.key).await,
        "conflict",
        "remove of a live worker",
    )?;
    let still = source
        .get(&worker.key)
        .await
        .context("expected get after a refused remove to succeed")?;
    ensure!(
        !still.state.is_terminal(),
        "expected the worker to be live after a refused remove, it is {}",
        brief(&still)
    );
    finish(source, &worker.key).await?;

    let (mut rx, first) = open_events(source).await?;
    ensure!(
        first.iter().any(|w| w.key == worker.key),
        "expected the ended worker in the first Resync"
    );
    source
        .remove(&worker.key)
        .await
        .context("expected remove of a terminal worker to succeed")?;
    let deadline = Instant::now() + WAIT;
    loop {
        let event =
            next_event_until(&mut rx, "a Removed event for the removed worker", deadline).await?;
        match event {
            SourceEvent::Removed(k) if k == worker.key => break,
            SourceEvent::Resync(list) if !list.iter().any(|w| w.key == worker.key) => break,
            _ => {}
        }
    }
    expect_error(
        source.get(&worker.key).await,
        "worker_not_found",
        "get of a removed worker",
    )?;
    let list = source.list().await.context("expected list to succeed")?;
    ensure!(
        !list.iter().any(|w| w.key == worker.key),
        "expected a removed worker to be gone from list(), it is there"
    );
    expect_error(
        source.remove(&worker.key).await,
        "worker_not_found",
        "a second remove",
    )
}

/// Each operation whose capability is false returns `unsupported` and does nothing.
pub async fn unsupported_operations_return_unsupported<S: RuntimeSource + ?Sized>(
    source: &S,
    harness: &dyn Harness,
) -> Result<()> {
    let caps = source.capabilities();
    ensure!(
        caps != Capabilities::ALL,
        "this source has every capability; there is nothing for this test to check"
    );
    ensure!(
        source.capabilities() == caps,
        "expected capabilities() to stay the same, it changed between two calls"
    );
    if !caps.spawn {
        let request = harness
            .shell_request("exit 0")
            .unwrap_or_else(|| SpawnRequest {
                command: Some(vec!["/bin/sh".into(), "-c".into(), "exit 0".into()]),
                ..Default::default()
            });
        let before = source
            .list()
            .await
            .context("expected list to succeed")?
            .len();
        expect_error(source.spawn(request).await, "unsupported", "spawn")?;
        let after = source
            .list()
            .await
            .context("expected list to succeed")?
            .len();
        ensure!(
            before == after,
            "expected a refused spawn to start nothing, list() went from {before} to {after} workers"
        );
    }
    if caps.spawn && !caps.restart {
        let mut request = harness
            .shell_request("exit 0")
            .unwrap_or_else(|| SpawnRequest {
                command: Some(vec!["/bin/sh".into(), "-c".into(), "exit 0".into()]),
                ..Default::default()
            });
        request.restart = Some(crate::Restart::Always);
        let before = source
            .list()
            .await
            .context("expected list to succeed")?
            .len();
        expect_error(
            source.spawn(request).await,
            "unsupported",
            "spawn with a restart policy",
        )?;
        let after = source
            .list()
            .await
            .context("expected list to succeed")?
            .len();
        ensure!(
            before == after,
            "expected a spawn refused for its restart policy to start nothing, list() went \
             from {before} to {after} workers"
        );
    }
    if caps.stop && caps.input && caps.output && caps.remove {
        return Ok(());
    }
    let name = worker_name("unsupported");
    let worker = start(source, harness, &long_script(caps, &name), &name).await?;
    if !caps.stop {
        expect_error(
            source.stop(&worker.key, Some(Duration::ZERO)).await,
            "unsupported",
            "stop",
        )?;
        let now = source
            .get(&worker.key)
            .await
            .context("expected get to succeed")?;
        ensure!(
            !now.state.is_terminal() && now.state != WorkerState::Stopping,
            "expected a refused stop to do nothing, the worker is {}",
            brief(&now)
        );
    }
    if !caps.input {
        expect_error(
            source.input(&worker.key, Bytes::from_static(b"x\n")).await,
            "unsupported",
            "input",
        )?;
    }
    if !caps.output {
        expect_error(
            source
                .output(
                    &worker.key,
                    crate::OutputRequest {
                        after: 0,
                        follow: true,
                    },
                )
                .await,
            "unsupported",
            "output",
        )?;
    }
    let ended = finish(source, &worker.key).await?;
    if !caps.remove {
        expect_error(source.remove(&worker.key).await, "unsupported", "remove")?;
        let now = source
            .get(&worker.key)
            .await
            .context("expected get after a refused remove to succeed")?;
        ensure!(
            now.key == ended.key,
            "expected a refused remove to keep the worker"
        );
    } else {
        source
            .remove(&worker.key)
            .await
            .context("expected remove to succeed")?;
    }
    Ok(())
}
