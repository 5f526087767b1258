//! # roster-bench
//!
//! Measures Roster beside the process managers an operator would pick instead
//! (supervisord, circus, pm2) and beside raw baselines the bench builds itself (a fork/exec
//! loop, a bare hyper server, a pipe), all in the same run, and prints min / median / max
//! and the ratio to each baseline. See `docs/BENCHMARKS.md` for what each scenario does.
//!
//! ```sh
//! bench/peers/install.sh                       # supervisord, circus, pm2, wrk
//! cargo run --release -p roster-bench -- all   # or: spawn, get, output, fanout, records, heal
//! cargo run --release -p roster-bench -- load  # the load and fault run (not part of `all`)
//! cargo run --release -p roster-bench -- all --tiny --json
//! ```
//!
//! Every daemon (Roster, the peers, the bare hyper server) is a child process on loopback;
//! Roster and the bare server are this same binary run as `serve-roster` / `bare-hyper`.

mod common;
mod peers;
mod report;
mod scenarios;
mod serve;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use report::Row;

/// Benchmarks Roster side by side with supervisord, circus, pm2 and raw baselines.
#[derive(Debug, Parser)]
#[command(name = "roster-bench")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
    #[command(flatten)]
    opts: Opts,
}

/// Options shared by every scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct Opts {
    /// Rounds per measurement (at least 3 for a table worth reading).
    #[arg(long, global = true, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
    /// Tiny sizes (what the test runs): every scenario in seconds, figures meaningless.
    #[arg(long, global = true)]
    pub tiny: bool,
    /// Print JSON rows on stdout instead of the table.
    #[arg(long, global = true)]
    pub json: bool,
    /// Do not run `bench/peers/install.sh` first (it is idempotent and quick when the peers
    /// are there; without this flag `spawn` and `records` run it).
    #[arg(long, global = true)]
    pub no_install: bool,
    /// spawn: workers per round (default 1000).
    #[arg(long, global = true)]
    pub spawn_workers: Option<usize>,
    /// spawn: containers per round of the docker rows (default 200; a container costs the
    /// engine far more than a process costs the kernel).
    #[arg(long, global = true)]
    pub docker_workers: Option<usize>,
    /// spawn: seconds a peer's round may take before it is cut off and its rate taken
    /// over the exits it saw (default 60; pm2 needs minutes for 1,000).
    #[arg(long, global = true)]
    pub peer_cap_secs: Option<f64>,
    /// records: finished programs each peer holds for its per-record RSS (default 200).
    #[arg(long, global = true)]
    pub peer_records: Option<usize>,
    /// get: seconds of load per round (default 10).
    #[arg(long, global = true)]
    pub get_secs: Option<f64>,
    /// output: MB the worker writes (default 200).
    #[arg(long, global = true)]
    pub output_mb: Option<u64>,
    /// output: lines timed for the latency rows (default 1000).
    #[arg(long, global = true)]
    pub lines: Option<usize>,
    /// fanout: subscribers (default 1000).
    #[arg(long, global = true)]
    pub subscribers: Option<usize>,
    /// fanout: seconds of churn (default 30).
    #[arg(long, global = true)]
    pub fanout_secs: Option<f64>,
    /// fanout: workers started per second (default 200).
    #[arg(long, global = true)]
    pub fanout_rate: Option<u32>,
    /// records: the record counts measured, comma-separated (default 10000,100000, the
    /// issue's two counts; the fill to 100,000 takes two to three minutes).
    #[arg(long, global = true, value_delimiter = ',')]
    pub records: Option<Vec<usize>>,
    /// load: concurrent clients (default 1000).
    #[arg(long, global = true)]
    pub load_clients: Option<usize>,
    /// load: seconds of load (default 60).
    #[arg(long, global = true)]
    pub load_secs: Option<f64>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Every scenario, one after another.
    All,
    /// Start short workers, 32 in flight, until every exit is seen.
    Spawn,
    /// GET one worker at 64 connections, vs a bare hyper server.
    Get,
    /// Output throughput and line latency, embedded and through one remote hop.
    Output,
    /// Many SSE subscribers while workers start and end.
    Fanout,
    /// RSS per finished worker record; idle RSS beside the peers; list pages.
    Records,
    /// A remote runtime's upstream SIGKILLed and restarted.
    Heal,
    /// Not part of `all`: 1,000 clients for 60 s mixing every operation, the upstream of a
    /// remote runtime SIGKILLed twice; fails on any error but 429 and the outage's, on a
    /// worker not seen to end, on a process left behind.
    Load,
    /// (internal) Serve Roster from a config file; prints `listening ADDR`.
    #[command(hide = true)]
    ServeRoster {
        #[arg(long)]
        config: PathBuf,
    },
    /// (internal) A bare hyper server answering every request with a file's bytes.
    #[command(hide = true)]
    BareHyper {
        #[arg(long)]
        body: PathBuf,
    },
}

/// Every scenario name, in the order `all` runs them.
pub const SCENARIOS: [&str; 6] = ["spawn", "get", "output", "fanout", "records", "heal"];

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    common::raise_nofile();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("roster-bench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        let which: Vec<&str> = match &args.command {
            Cmd::ServeRoster { config } => return serve::roster(config).await,
            Cmd::BareHyper { body } => return serve::bare_hyper(body).await,
            Cmd::All => SCENARIOS.to_vec(),
            Cmd::Spawn => vec!["spawn"],
            Cmd::Get => vec!["get"],
            Cmd::Output => vec!["output"],
            Cmd::Fanout => vec!["fanout"],
            Cmd::Records => vec!["records"],
            Cmd::Heal => vec!["heal"],
            Cmd::Load => vec!["load"],
        };
        run(&args.opts, &which).await
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("roster-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(opts: &Opts, which: &[&str]) -> Result<()> {
    if !opts.no_install && which.iter().any(|s| ["spawn", "records"].contains(s)) {
        install_peers().await?;
    }
    let dir = tempfile::tempdir()?;
    let mut rows: Vec<Row> = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    for name in which {
        common::progress(&format!("scenario {name}"));
        let scratch = dir.path().join(name);
        std::fs::create_dir_all(&scratch)?;
        let got = match *name {
            "spawn" => scenarios::spawn::run(opts, &scratch).await,
            "get" => scenarios::get::run(opts, &scratch).await,
            "output" => scenarios::output::run(opts, &scratch).await,
            "fanout" => scenarios::fanout::run(opts, &scratch).await,
            "records" => scenarios::records::run(opts, &scratch).await,
            "load" => scenarios::load::run(opts, &scratch).await,
            _ => scenarios::heal::run(opts, &scratch).await,
        };
        match got {
            Ok(got) => rows.extend(got),
            // The other scenarios still run; the run fails at the end.
            Err(e) => {
                common::progress(&format!("scenario {name} failed: {e:#}"));
                failed.push(format!("{name}: {e:#}"));
                rows.push(Row::not_measured(
                    name,
                    "the scenario",
                    "roster",
                    &format!("failed: {e:#}"),
                ));
            }
        }
    }
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let build = if cfg!(debug_assertions) {
            "debug build: figures not representative, use --release"
        } else {
            "release build"
        };
        let size = if opts.tiny {
            "tiny sizes"
        } else {
            "full sizes"
        };
        print!(
            "{}",
            report::table(
                &rows,
                &format!(
                    "roster-bench: {cores} cores, {build}, {size}, {} rounds; ratio > 1 means Roster is better",
                    opts.rounds
                )
            )
        );
    }
    anyhow::ensure!(failed.is_empty(), "failed scenarios: {}", failed.join("; "));
    Ok(())
}

/// Runs `bench/peers/install.sh`; a peer it cannot install is left for the scenarios to
/// report as not measured.
async fn install_peers() -> Result<()> {
    let script = common::workspace_root().join("bench/peers/install.sh");
    common::progress("installing the peers (bench/peers/install.sh)");
    let status = tokio::process::Command::new("bash")
        .arg(&script)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .status()
        .await?;
    anyhow::ensure!(status.success(), "bench/peers/install.sh failed: {status}");
    Ok(())
}
