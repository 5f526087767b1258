//! Helpers of the conformance suite: waiting with deadlines, reading streams, comparing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use tokio::time::{sleep, timeout_at, Instant};

use super::{Harness, Lend};
use crate::{
    Capabilities, OutputEvent, OutputRequest, OutputStream, RegistryError, RuntimeSource,
    SourceEvent, SourceEvents, SourceKey, SourceWorker, StreamKind, WorkerState,
};

/// How long any one condition may take to come true.
pub(crate) const WAIT: Duration = Duration::from_secs(10);
/// How often a condition is polled.
pub(crate) const POLL: Duration = Duration::from_millis(10);

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh worker name for `test`, unique in this process.
pub(crate) fn worker_name(test: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("conformance-{test}-{n}")
}

/// A request id no earlier run of the suite used.
pub(crate) fn unique_request_id() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("conformance-{}-{nanos}-{n}", std::process::id())
}

/// How many tenths of a second a [`long_script`] runs at most: about 300 s, far longer than
/// any test needs a live worker, however slow the harness.
const LONG_TICKS: u32 = 3000;

/// The file whose creation ends the [`long_script`] of the worker named `name`.
fn release_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "roster-conformance-{}-{name}.release",
        std::process::id()
    ))
}

/// A script that keeps its worker live until the suite is done with it, for about 300 s at
/// most (a bound, so that a worker never outlives a run of the suite for long). The suite
/// ends it by stopping it where the source can stop workers; elsewhere the script also ends
/// once [`release`] created its release file (the source must then run its workers on this
/// machine). `name` is the name the worker is started with.
pub(crate) fn long_script(caps: Capabilities, name: &str) -> String {
    if caps.stop {
        format!("i=0; while [ $i -lt {LONG_TICKS} ]; do sleep 0.1; i=$((i+1)); done")
    } else {
        format!(
            "i=0; while [ $i -lt {LONG_TICKS} ] && [ ! -e '{}' ]; do sleep 0.1; i=$((i+1)); done",
            release_path(name).display()
        )
    }
}

/// Ends the [`long_script`] of `worker`, on a source that cannot stop workers.
pub(crate) fn release(worker: &SourceWorker) {
    if let Some(name) = &worker.name {
        let _ = std::fs::File::create(release_path(name));
    }
}

/// Deletes what [`release`] created, once the worker has ended.
pub(crate) fn forget_release(worker: &SourceWorker) {
    if let Some(name) = &worker.name {
        let _ = std::fs::remove_file(release_path(name));
    }
}

/// Starts a worker through the harness and checks that it did start.
pub(crate) async fn start<S: RuntimeSource + ?Sized>(
    source: &S,
    harness: &dyn Harness,
    script: &str,
    name: &str,
) -> Result<SourceWorker> {
    let worker = harness
        .start_shell(&Lend(source), script, name)
        .await
        .with_context(|| format!("the harness could not start a worker running {script:?}"))?;
    if worker.state == WorkerState::Failed {
        bail!(
            "expected a started worker running {script:?}, got one in state failed (reason {:?})",
            worker.reason
        );
    }
    Ok(worker)
}

/// How messages name a worker: by its name, never by its key (a source's key is internal
/// authority, such as a path, and never goes into a message or the log).
pub(crate) fn named(worker: &SourceWorker) -> String {
    match &worker.name {
        Some(name) => format!("{name:?}"),
        None => "(unnamed)".into(),
    }
}

/// The worker's name and state, for messages.
pub(crate) fn brief(worker: &SourceWorker) -> String {
    let mut s = format!("{} ({}", named(worker), worker.state);
    if let Some(code) = worker.exit_code {
        let _ = write!(s, ", exit code {code}");
    }
    if let Some(reason) = worker.reason {
        let _ = write!(s, ", reason {reason:?}");
    }
    s.push(')');
    s
}

/// Polls `get` until `pred` holds, for at most [`WAIT`].
pub(crate) async fn wait_for<S, F>(
    source: &S,
    key: &SourceKey,
    what: &str,
    pred: F,
) -> Result<SourceWorker>
where
    S: RuntimeSource + ?Sized,
    F: Fn(&SourceWorker) -> bool,
{
    wait_for_within(source, key, what, WAIT, pred).await
}

/// Polls `get` until `pred` holds, for at most `limit`.
pub(crate) async fn wait_for_within<S, F>(
    source: &S,
    key: &SourceKey,
    what: &str,
    limit: Duration,
    pred: F,
) -> Result<SourceWorker>
where
    S: RuntimeSource + ?Sized,
    F: Fn(&SourceWorker) -> bool,
{
    let deadline = Instant::now() + limit;
    loop {
        let worker = source
            .get(key)
            .await
            .with_context(|| format!("get failed while waiting for the worker to be {what}"))?;
        if pred(&worker) {
            return Ok(worker);
        }
        if Instant::now() >= deadline {
            bail!(
                "expected the worker to be {what} within {limit:?}; it is still {}",
                brief(&worker)
            );
        }
        sleep(POLL).await;
    }
}

/// Waits until the worker is terminal.
pub(crate) async fn wait_terminal<S: RuntimeSource + ?Sized>(
    source: &S,
    key: &SourceKey,
) -> Result<SourceWorker> {
    wait_for(source, key, "terminal", |w| w.state.is_terminal()).await
}

/// Waits until the worker is `running`.
pub(crate) async fn wait_running<S: RuntimeSource + ?Sized>(
    source: &S,
    key: &SourceKey,
) -> Result<SourceWorker> {
    let worker = wait_for(source, key, "running (or terminal)", |w| {
        w.state == WorkerState::Running || w.state.is_terminal()
    })
    .await?;
    if worker.state != WorkerState::Running {
        bail!(
            "expected the worker to be running, it ended first: {}",
            brief(&worker)
        );
    }
    Ok(worker)
}

/// Ends a worker the test started: stops it where the source can, then waits until it is
/// terminal, and returns it.
pub(crate) async fn finish<S: RuntimeSource + ?Sized>(
    source: &S,
    key: &SourceKey,
) -> Result<SourceWorker> {
    let now = source.get(key).await.context("get of a worker to end it")?;
    if now.state.is_terminal() {
        return Ok(now);
    }
    if source.capabilities().stop {
        source
            .stop(key, Some(Duration::from_millis(500)))
            .await
            .context("stop of a worker the test is done with")?;
        return wait_terminal(source, key).await;
    }
    release(&now);
    let ended = wait_terminal(source, key).await;
    forget_release(&now);
    ended
}

/// Ends a worker the test started and removes its record where the source can.
pub(crate) async fn discard<S: RuntimeSource + ?Sized>(source: &S, key: &SourceKey) -> Result<()> {
    finish(source, key).await?;
    if source.capabilities().remove {
        source
            .remove(key)
            .await
            .context("remove of a terminal worker the test is done with")?;
    }
    Ok(())
}

/// Whether a worker may be seen in state `to` after it was seen in state `from`.
pub(crate) fn may_follow(from: WorkerState, to: WorkerState) -> bool {
    from == to || from.may_become(to)
}

/// The worker with its volatile field (`last_seen_at`) cleared, for comparisons.
pub(crate) fn comparable(worker: &SourceWorker) -> SourceWorker {
    SourceWorker {
        last_seen_at: None,
        ..worker.clone()
    }
}

/// Workers by key, each [`comparable`]. Two workers with one key are an error.
pub(crate) fn by_key(
    list: &[SourceWorker],
    what: &str,
) -> Result<BTreeMap<SourceKey, SourceWorker>> {
    let mut map = BTreeMap::new();
    for worker in list {
        if map.insert(worker.key.clone(), comparable(worker)).is_some() {
            bail!(
                "expected each key once in {what}, got the key of worker {} twice",
                named(worker)
            );
        }
    }
    Ok(map)
}

/// What differs between two sets of workers, for messages.
pub(crate) fn diff(
    want_name: &str,
    want: &BTreeMap<SourceKey, SourceWorker>,
    got_name: &str,
    got: &BTreeMap<SourceKey, SourceWorker>,
) -> String {
    let mut out = String::new();
    for (key, w) in want {
        match got.get(key) {
            None => {
                let _ = write!(
                    out,
                    "\n  in {want_name}, missing from {got_name}: {}",
                    brief(w)
                );
            }
            Some(g) if g != w => {
                let _ = write!(
                    out,
                    "\n  differs: {want_name} has {w:?}\n           {got_name} has {g:?}"
                );
            }
            Some(_) => {}
        }
    }
    for (key, g) in got {
        if !want.contains_key(key) {
            let _ = write!(
                out,
                "\n  in {got_name}, missing from {want_name}: {}",
                brief(g)
            );
        }
    }
    if out.is_empty() {
        out.push_str(" (no difference)");
    }
    out
}

/// The entry of `worker` (by key) in `list`; an error if it is absent or there twice.
pub(crate) fn find_one<'a>(
    list: &'a [SourceWorker],
    worker: &SourceWorker,
) -> Result<&'a SourceWorker> {
    let mut found = list.iter().filter(|w| w.key == worker.key);
    let first = found.next().with_context(|| {
        format!(
            "expected worker {} in list(), it is not there ({} workers listed)",
            named(worker),
            list.len()
        )
    })?;
    if found.next().is_some() {
        bail!(
            "expected worker {} once in list(), it is there twice",
            named(worker)
        );
    }
    Ok(first)
}

/// Checks that two views of one worker agree on what never changes.
pub(crate) fn same_identity(
    a: &SourceWorker,
    a_name: &str,
    b: &SourceWorker,
    b_name: &str,
) -> Result<()> {
    let fields = |w: &SourceWorker| {
        (
            w.key.clone(),
            w.name.clone(),
            w.labels.clone(),
            w.created_at,
            w.profile.clone(),
            w.args.clone(),
            w.command.clone(),
        )
    };
    if fields(a) != fields(b) {
        bail!(
            "expected {a_name} and {b_name} to agree on key, name, labels, created_at, profile, \
             args and command;\n  {a_name} has {a:?}\n  {b_name} has {b:?}"
        );
    }
    Ok(())
}

/// Expects `result` to be the error `code` (e.g. `worker_not_found`).
pub(crate) fn expect_error<T>(
    result: Result<T, RegistryError>,
    code: &str,
    what: &str,
) -> Result<()> {
    match result {
        Err(e) if e.code() == code => Ok(()),
        Err(e) => bail!(
            "expected {what} to fail with {code}, it failed with {}: {e}",
            e.code()
        ),
        Ok(_) => bail!("expected {what} to fail with {code}, it succeeded"),
    }
}

// ---------------------------------------------------------------------------------------
// Output streams

/// Opens a worker's output stream.
pub(crate) async fn open_output<S: RuntimeSource + ?Sized>(
    source: &S,
    key: &SourceKey,
    after: u64,
    follow: bool,
) -> Result<OutputStream> {
    source
        .output(key, OutputRequest { after, follow })
        .await
        .with_context(|| format!("output(after: {after}, follow: {follow}) failed"))
}

/// Reads `rx` until it closes, for at most [`WAIT`].
pub(crate) async fn read_to_close(
    rx: &mut OutputStream,
    seen: &mut Vec<OutputEvent>,
) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        match timeout_at(deadline, rx.recv()).await {
            Ok(Some(event)) => seen.push(event),
            Ok(None) => return Ok(()),
            Err(_) => bail!(
                "expected the output stream to close within {WAIT:?}, it stayed open; seen: {}",
                describe_output(seen)
            ),
        }
    }
}

/// Opens a worker's output stream and reads it until it closes.
pub(crate) async fn read_all<S: RuntimeSource + ?Sized>(
    source: &S,
    key: &SourceKey,
    after: u64,
    follow: bool,
) -> Result<Vec<OutputEvent>> {
    let mut rx = open_output(source, key, after, follow).await?;
    let mut seen = Vec::new();
    read_to_close(&mut rx, &mut seen)
        .await
        .with_context(|| format!("reading output(after: {after}, follow: {follow})"))?;
    Ok(seen)
}

/// Reads `rx` until the text of `stream` contains `needle`, for at most [`WAIT`].
pub(crate) async fn read_until_text(
    rx: &mut OutputStream,
    seen: &mut Vec<OutputEvent>,
    stream: StreamKind,
    needle: &str,
) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    while !text(seen, stream).contains(needle) {
        match timeout_at(deadline, rx.recv()).await {
            Ok(Some(event)) => seen.push(event),
            Ok(None) => bail!(
                "expected {needle:?} on {stream:?}, the output stream closed first; seen: {}",
                describe_output(seen)
            ),
            Err(_) => bail!(
                "expected {needle:?} on {stream:?} within {WAIT:?}; seen: {}",
                describe_output(seen)
            ),
        }
    }
    Ok(())
}

/// The text of one stream's chunks (invalid UTF-8 replaced).
pub(crate) fn text(events: &[OutputEvent], stream: StreamKind) -> String {
    let bytes: Vec<u8> = chunks(events)
        .filter(|c| c.stream == stream)
        .flat_map(|c| c.data.iter().copied())
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The chunks among `events`.
pub(crate) fn chunks(events: &[OutputEvent]) -> impl Iterator<Item = &crate::OutputChunk> {
    events.iter().filter_map(|e| match e {
        OutputEvent::Chunk(c) => Some(c),
        _ => None,
    })
}

/// Checks the shape of an output stream that starts after `after`: chunks in `seq` order
/// with no holes (a hole only as an explicit `Gap` that starts where the chunks stopped),
/// and nothing after `End`.
pub(crate) fn check_sequence(events: &[OutputEvent], after: u64) -> Result<()> {
    let mut next = after + 1;
    let mut ended = false;
    for (i, event) in events.iter().enumerate() {
        if ended {
            bail!(
                "expected nothing after End, got {} at position {i}; stream: {}",
                describe_one(event),
                describe_output(events)
            );
        }
        match event {
            OutputEvent::Chunk(c) => {
                if c.seq != next {
                    bail!(
                        "expected chunk seq {next} at position {i}, got seq {} (a hole must be an \
                         explicit Gap); stream: {}",
                        c.seq,
                        describe_output(events)
                    );
                }
                next += 1;
            }
            OutputEvent::Gap { from, to } => {
                if *from != next || to < from {
                    bail!(
                        "expected a Gap to start at seq {next} and end at or after it, got gap \
                         {from}..={to} at position {i}; stream: {}",
                        describe_output(events)
                    );
                }
                next = to + 1;
            }
            OutputEvent::End => ended = true,
        }
    }
    Ok(())
}

fn describe_one(event: &OutputEvent) -> String {
    match event {
        OutputEvent::Chunk(c) => format!("chunk {} {:?} {}B", c.seq, c.stream, c.data.len()),
        OutputEvent::Gap { from, to } => format!("gap {from}..={to}"),
        OutputEvent::End => "end".into(),
    }
}

/// A short description of an output stream, for messages.
pub(crate) fn describe_output(events: &[OutputEvent]) -> String {
    const EDGE: usize = 8;
    if events.is_empty() {
        return "nothing".into();
    }
    let parts: Vec<String> = if events.len() <= 2 * EDGE {
        events.iter().map(describe_one).collect()
    } else {
        let mut p: Vec<String> = events[..EDGE].iter().map(describe_one).collect();
        p.push(format!("… {} more …", events.len() - 2 * EDGE));
        p.extend(events[events.len() - EDGE..].iter().map(describe_one));
        p
    };
    format!("[{}]", parts.join(", "))
}

// ---------------------------------------------------------------------------------------
// Lifecycle streams

/// Opens the lifecycle stream and reads its first event, which must be a `Resync`.
pub(crate) async fn open_events<S: RuntimeSource + ?Sized>(
    source: &S,
) -> Result<(SourceEvents, Vec<SourceWorker>)> {
    let mut rx = source.events().await.context("events() failed")?;
    match next_event(&mut rx, "the first lifecycle event").await? {
        SourceEvent::Resync(list) => Ok((rx, list)),
        other => bail!(
            "expected the lifecycle stream to start with Resync, it started with {}",
            describe_event(&other)
        ),
    }
}

/// The next lifecycle event, within [`WAIT`].
pub(crate) async fn next_event(rx: &mut SourceEvents, what: &str) -> Result<SourceEvent> {
    next_event_until(rx, what, Instant::now() + WAIT).await
}

/// The next lifecycle event, before `deadline`.
pub(crate) async fn next_event_until(
    rx: &mut SourceEvents,
    what: &str,
    deadline: Instant,
) -> Result<SourceEvent> {
    match timeout_at(deadline, rx.recv()).await {
        Ok(Some(event)) => Ok(event),
        Ok(None) => bail!("expected {what}, the lifecycle stream closed"),
        Err(_) => bail!("expected {what}, no lifecycle event came in time"),
    }
}

/// A lifecycle event, for messages.
pub(crate) fn describe_event(event: &SourceEvent) -> String {
    match event {
        SourceEvent::Upsert(w) => format!("Upsert {}", brief(w)),
        SourceEvent::Removed(_) => "Removed of a worker".into(),
        SourceEvent::Resync(list) => format!("Resync of {} workers", list.len()),
        SourceEvent::Health(h) => format!("Health {:?}", h.status),
    }
}

/// The registry's view of a source, rebuilt from its lifecycle stream.
#[derive(Debug)]
pub(crate) struct Fold {
    pub(crate) workers: BTreeMap<SourceKey, SourceWorker>,
    pub(crate) resyncs: usize,
}

impl Fold {
    /// Starts from the first `Resync`.
    pub(crate) fn new(first: &[SourceWorker]) -> Result<Self> {
        Ok(Fold {
            workers: by_key(first, "the first Resync")?,
            resyncs: 0,
        })
    }

    /// Applies one event, as the registry would.
    pub(crate) fn apply(&mut self, event: &SourceEvent) -> Result<()> {
        match event {
            SourceEvent::Upsert(w) => {
                self.workers.insert(w.key.clone(), comparable(w));
            }
            SourceEvent::Removed(key) => {
                self.workers.remove(key);
            }
            SourceEvent::Resync(list) => {
                self.workers = by_key(list, "a Resync")?;
                self.resyncs += 1;
            }
            SourceEvent::Health(_) => {}
        }
        Ok(())
    }
}
