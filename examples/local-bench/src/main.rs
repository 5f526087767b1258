//! `local-bench`: how soon the `local` source sees a descriptor that is new, changed or
//! removed — the time from the file operation (a rename into the spool directory, a
//! rewrite, an unlink) to the matching event on the source's lifecycle stream.
//!
//! Two setups in the same run, interleaved round by round: the default (inotify, with the
//! rescan every 500 ms behind it) and the fallback alone (`watch = false`, a rescan every
//! 500 ms). Each prints p50, p90, p99 and max per operation, and the fallback's p50 as a
//! ratio of inotify's.
//!
//!     cargo run --release -p local-bench [-- --rounds 200]
//!
//! Every descriptor names one real process (a `sleep` this program starts) with its real
//! start time, so each is a live worker.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use registry_core::{RuntimeSource, SourceEvent, SourceEvents};
use source_local::{LocalConfig, LocalSource};

#[derive(Parser, Debug)]
#[command(about = "How soon the local source sees descriptor changes")]
struct Args {
    /// Rounds per setup; each round creates, changes and removes one descriptor.
    #[arg(long, default_value_t = 100)]
    rounds: usize,
}

/// How long one event may take before the run is called broken.
const LIMIT: Duration = Duration::from_secs(10);

/// The start time of `pid`, seconds since the epoch, from `/proc` (as a launcher writes it).
fn start_time(pid: u32) -> Result<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').context("a stat line")? + 1..];
    let ticks: i64 = rest
        .split_ascii_whitespace()
        .nth(19)
        .context("field 22")?
        .parse()?;
    let btime: i64 = std::fs::read_to_string("/proc/stat")?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .context("btime")?
        .trim()
        .parse()?;
    // SAFETY: sysconf has no preconditions.
    let hz = i64::from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as i32).max(1);
    Ok(btime + ticks / hz)
}

fn rfc3339(secs: i64) -> Result<String> {
    Ok(time::OffsetDateTime::from_unix_timestamp(secs)?
        .format(&time::format_description::well_known::Rfc3339)?)
}

/// Writes a descriptor atomically, as a launcher should: a temporary name, then a rename.
fn write(dir: &Path, file: &str, pid: u32, started: &str, name: &str) -> Result<()> {
    let json = serde_json::json!({ "pid": pid, "started_at": started, "name": name });
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, json.to_string())?;
    std::fs::rename(&tmp, dir.join(file))?;
    Ok(())
}

/// Waits for the first event `pick` accepts; returns the time since `from`.
async fn until(
    events: &mut SourceEvents,
    from: Instant,
    mut pick: impl FnMut(&SourceEvent) -> bool,
) -> Result<Duration> {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(event)) if pick(&event) => return Ok(from.elapsed()),
            Ok(Some(_)) => {}
            Ok(None) => bail!("the lifecycle stream ended"),
            Err(_) => bail!("no event within {LIMIT:?}"),
        }
    }
}

fn named(event: &SourceEvent, name: &str) -> bool {
    match event {
        SourceEvent::Upsert(w) => w.name.as_deref() == Some(name),
        SourceEvent::Resync(ws) => ws.iter().any(|w| w.name.as_deref() == Some(name)),
        _ => false,
    }
}

struct Setup {
    label: &'static str,
    dir: tempfile::TempDir,
    source: LocalSource,
    events: SourceEvents,
    new: Vec<Duration>,
    changed: Vec<Duration>,
    removed: Vec<Duration>,
}

impl Setup {
    async fn new(label: &'static str, watch: bool) -> Result<Setup> {
        let dir = tempfile::tempdir()?;
        let mut config = LocalConfig::new(dir.path());
        config.watch = watch;
        let source = LocalSource::new(config)?;
        let mut events = source.events().await?;
        // The first event is the (empty) whole truth.
        events.recv().await.context("a first Resync")?;
        Ok(Setup {
            label,
            dir,
            source,
            events,
            new: Vec::new(),
            changed: Vec::new(),
            removed: Vec::new(),
        })
    }

    async fn round(&mut self, n: usize, pid: u32, started: &str) -> Result<()> {
        let file = format!("w{n}.json");
        let (first, second) = (format!("r{n}"), format!("r{n}-renamed"));

        let at = Instant::now();
        write(self.dir.path(), &file, pid, started, &first)?;
        self.new
            .push(until(&mut self.events, at, |e| named(e, &first)).await?);
        let key = self
            .source
            .list()
            .await?
            .into_iter()
            .find(|w| w.name.as_deref() == Some(first.as_str()))
            .context("the new worker is listed")?
            .key;

        let at = Instant::now();
        write(self.dir.path(), &file, pid, started, &second)?;
        self.changed
            .push(until(&mut self.events, at, |e| named(e, &second)).await?);

        let at = Instant::now();
        std::fs::remove_file(self.dir.path().join(&file))?;
        self.removed.push(
            until(&mut self.events, at, |e| match e {
                SourceEvent::Removed(k) => *k == key,
                SourceEvent::Resync(ws) => !ws.iter().any(|w| w.key == key),
                _ => false,
            })
            .await?,
        );
        Ok(())
    }
}

fn quantiles(label: &str, what: &str, times: &mut [Duration]) -> Duration {
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{label:<22} {what:<8} p50 {:>8.2} ms  p90 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms",
        ms(at(0.5)),
        ms(at(0.9)),
        ms(at(0.99)),
        ms(times[times.len() - 1])
    );
    at(0.5)
}

/// Ends the `sleep` this program started, also on an error.
struct Sleeper(Child);

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.rounds > 0, "--rounds must be at least 1");
    let sleeper = Sleeper(
        Command::new("sleep")
            .arg("3600")
            .stdin(Stdio::null())
            .spawn()
            .context("starting sleep")?,
    );
    let pid = sleeper.0.id();
    let started = rfc3339(start_time(pid)?)?;

    let mut inotify = Setup::new("inotify (default)", true).await?;
    let mut polling = Setup::new("polling alone (500ms)", false).await?;
    for n in 0..args.rounds {
        inotify.round(n, pid, &started).await?;
        polling.round(n, pid, &started).await?;
    }

    println!(
        "local-bench: {} rounds per setup; time from the file operation to the event",
        args.rounds
    );
    let mut p50 = Vec::new();
    for setup in [&mut inotify, &mut polling] {
        p50.push([
            quantiles(setup.label, "new", &mut setup.new),
            quantiles(setup.label, "changed", &mut setup.changed),
            quantiles(setup.label, "removed", &mut setup.removed),
        ]);
    }
    for (i, what) in ["new", "changed", "removed"].iter().enumerate() {
        println!(
            "ratio p50 polling/inotify, {what:<8} {:>6.1}x",
            p50[1][i].as_secs_f64() / p50[0][i].as_secs_f64().max(1e-9)
        );
    }
    for setup in [inotify, polling] {
        setup.source.shutdown(None).await;
    }
    Ok(())
}
