//! `roster`'s command-line client: `runtimes`, `ls`, `get`, `spawn`, `logs`, `input`, `stop`,
//! `rm`, `events`, `reload` and `completions`. A client of the public API only — every call it makes
//! is one a user's own client can make the same way.
//!
//! - The server comes from `--server` or `ROSTER_URL` (default `http://127.0.0.1:7411`),
//!   the token from `--token-file` (or `ROSTER_TOKEN_FILE`) or `ROSTER_TOKEN`. The token is
//!   sent as a bearer header only: never printed, never in a URL.
//! - Tables for people, `--json` (or `-o json`) for scripts: the API's own objects, one per
//!   line for lists and streams.
//! - Exit codes: 0 ok, 1 an API error (or a worker name that matches none or several),
//!   2 a usage error, 3 the server could not be reached; `logs -f` and `spawn -f` end with
//!   the worker's own code.

mod commands;
mod error;
mod format;
mod http;
mod resolve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};

pub use error::{ClientError, EXIT_API, EXIT_UNREACHABLE, EXIT_USAGE};

/// The default server address.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7411";

/// Where the server is and how to talk to it; every client subcommand takes these.
#[derive(Clone, Args)]
pub struct Conn {
    /// The server, `http://HOST:PORT`.
    #[arg(long, env = "ROSTER_URL", default_value = DEFAULT_SERVER, value_name = "URL")]
    pub server: String,
    /// A file holding the bearer token (else the `ROSTER_TOKEN` environment variable).
    #[arg(long, env = "ROSTER_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Print the API's JSON objects, one per line (same as `-o json`).
    #[arg(long)]
    pub json: bool,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, value_name = "FORMAT")]
    pub output: Option<OutputFormat>,
}

impl std::fmt::Debug for Conn {
    // The address and the token file are the user's own, but nothing of them is needed in a
    // debug print.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("json", &self.json)
            .field("output", &self.output)
            .finish_non_exhaustive()
    }
}

impl Conn {
    fn json(&self) -> bool {
        self.json || self.output == Some(OutputFormat::Json)
    }
}

/// `-o` formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned tables and lines for people.
    Table,
    /// The API's JSON objects, one per line.
    Json,
}

/// The client subcommands.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// List the runtimes: kind, health (since when), workers by state.
    #[command(after_help = "Example:\n  roster runtimes\n  roster runtimes --json")]
    Runtimes {
        /// Server and output options.
        #[command(flatten)]
        conn: Conn,
    },
    /// List workers (live ones; --all adds finished ones).
    #[command(
        visible_alias = "list",
        after_help = "Examples:\n  roster ls\n  roster ls -r local --state running -l team=a\n  \
                      roster ls --all -w"
    )]
    Ls(LsArgs),
    /// Show one worker, every field.
    #[command(after_help = "Example:\n  roster get build-1\n  roster get w_3F9 --json")]
    Get {
        /// The worker: its id, a unique prefix of its id, or its name.
        worker: String,
        /// Look the name up in this runtime only.
        #[arg(short = 'r', long, value_name = "RUNTIME")]
        runtime: Option<String>,
        /// Server and output options.
        #[command(flatten)]
        conn: Conn,
    },
    /// Start a worker from a profile or a command; prints its id (or follows it with -f).
    #[command(
        after_help = "Examples:\n  roster spawn --profile shell --name hello -- 'echo hi'\n  \
                      roster spawn -f -- make test        # like running `make test`\n  \
                      roster spawn -r local -l team=a --env MODE=fast -- ./job.sh"
    )]
    Spawn(SpawnArgs),
    /// Print a worker's output as it wrote it: stdout to stdout, stderr to stderr.
    #[command(after_help = "Examples:\n  roster logs build-1\n  roster logs -f --tail 20 build-1")]
    Logs(LogsArgs),
    /// Send input to a worker's stdin: the argument (as a line), or this terminal's stdin.
    #[command(after_help = "Examples:\n  roster input repl 'print(1)'\n  \
                      cat commands.txt | roster input repl -")]
    Input {
        /// The worker: its id, a unique prefix of its id, or its name.
        worker: String,
        /// The text to send, followed by a newline; `-` or nothing: read stdin until its end.
        data: Option<String>,
        /// Look the name up in this runtime only.
        #[arg(short = 'r', long, value_name = "RUNTIME")]
        runtime: Option<String>,
        /// Server and output options.
        #[command(flatten)]
        conn: Conn,
    },
    /// Stop workers: SIGTERM, then SIGKILL after the grace.
    #[command(after_help = "Example:\n  roster stop --grace 5s build-1 build-2")]
    Stop {
        /// The workers: ids, unique prefixes of ids, or names.
        #[arg(required = true)]
        workers: Vec<String>,
        /// How long to wait between SIGTERM and SIGKILL (the runtime's default if not given).
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
        grace: Option<std::time::Duration>,
        /// Look names up in this runtime only.
        #[arg(short = 'r', long, value_name = "RUNTIME")]
        runtime: Option<String>,
        /// Server and output options.
        #[command(flatten)]
        conn: Conn,
    },
    /// Remove finished workers' records (a running worker must be stopped first).
    #[command(after_help = "Example:\n  roster rm build-1 w_3F9")]
    Rm {
        /// The workers: ids, unique prefixes of ids, or names.
        #[arg(required = true)]
        workers: Vec<String>,
        /// Look names up in this runtime only.
        #[arg(short = 'r', long, value_name = "RUNTIME")]
        runtime: Option<String>,
        /// Server and output options.
        #[command(flatten)]
        conn: Conn,
    },
    /// Follow the registry's events, one line each; resumes across reconnects.
    #[command(after_help = "Examples:\n  roster events\n  roster events --runtime local --json")]
    Events {
        /// Only this runtime's events.
        #[arg(short = 'r', long, value_name = "RUNTIME")]
        runtime: Option<String>,
        /// Start after this cursor (an event's `cursor` from an earlier run).
        #[arg(long, value_name = "CURSOR")]
        cursor: Option<String>,
        /// Server and output options.
        #[command(flatten)]
        conn: Conn,
    },
    /// Make the server read its config file again: runtimes added, changed and removed
    /// without a restart (needs an `operate` token).
    #[command(after_help = "Example:\n  roster reload\n  roster reload --json")]
    Reload {
        /// Server and output options.
        #[command(flatten)]
        conn: Conn,
    },
    /// Print a shell completion script.
    #[command(
        after_help = "Example:\n  roster completions bash > ~/.local/share/bash-completion/completions/roster"
    )]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// `roster ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Only this runtime's workers.
    #[arg(short = 'r', long, value_name = "RUNTIME")]
    pub runtime: Option<String>,
    /// Only workers in this state (starting, running, stopping, exited, stopped, failed,
    /// unknown).
    #[arg(long, value_name = "STATE")]
    pub state: Option<String>,
    /// Only workers with this label (repeat: all must match).
    #[arg(short = 'l', long = "label", value_name = "K=V", value_parser = key_value)]
    pub labels: Vec<(String, String)>,
    /// Finished workers too.
    #[arg(short = 'a', long)]
    pub all: bool,
    /// After the list, print every change as it happens.
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// Server and output options.
    #[command(flatten)]
    pub conn: Conn,
}

/// `roster spawn`.
#[derive(Debug, Args)]
pub struct SpawnArgs {
    /// The runtime (default: the only one there is).
    #[arg(short = 'r', long, value_name = "RUNTIME")]
    pub runtime: Option<String>,
    /// A profile of the runtime; the words after `--` are its arguments.
    #[arg(long, value_name = "PROFILE")]
    pub profile: Option<String>,
    /// A name for the worker (need not be unique).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// A label (repeat for more).
    #[arg(short = 'l', long = "label", value_name = "K=V", value_parser = key_value)]
    pub labels: Vec<(String, String)>,
    /// An environment variable for the worker (repeat for more).
    #[arg(long = "env", value_name = "K=V", value_parser = key_value)]
    pub env: Vec<(String, String)>,
    /// The worker's first input: a file's text, or `-` for this terminal's stdin.
    #[arg(long, value_name = "FILE|-")]
    pub stdin: Option<PathBuf>,
    /// Follow the output and exit with the worker's exit code; Ctrl-C stops the worker.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// The command and its arguments (without --profile), or the profile's arguments.
    #[arg(last = true, value_name = "CMD ARGS")]
    pub command: Vec<String>,
    /// Server and output options.
    #[command(flatten)]
    pub conn: Conn,
}

/// `roster logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The worker: its id, a unique prefix of its id, or its name.
    pub worker: String,
    /// Keep following until the worker ends, then exit with its exit code.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only output after this seq.
    #[arg(long, value_name = "N")]
    pub since_seq: Option<u64>,
    /// Only the last N lines of what is retained (then follow, with -f).
    #[arg(long, value_name = "N")]
    pub tail: Option<usize>,
    /// Look the name up in this runtime only.
    #[arg(short = 'r', long, value_name = "RUNTIME")]
    pub runtime: Option<String>,
    /// Server and output options.
    #[command(flatten)]
    pub conn: Conn,
}

/// `K=V`.
fn key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, not {text:?}")),
    }
}

/// Runs a client subcommand; the exit code says how it went.
pub fn run(command: ClientCommand) -> ExitCode {
    if let ClientCommand::Completions { shell } = command {
        let mut cmd = <crate::cli::Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut cmd, "roster", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return ClientError::Other(format!("starting: {e}")).report(),
    };
    match rt.block_on(commands::run(command)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => e.report(),
    }
}
