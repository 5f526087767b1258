//! The command line of `roster` (and of any program built on this library with its own
//! source kinds): `roster serve` and `roster check-config`, and the client subcommands of
//! [`crate::client`] (`roster ls`, `roster logs -f`, …).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::{OsStringValueParser, TypedValueParser};
use clap::{Parser, Subcommand, ValueEnum};
use registry_core::SourceFactories;

use crate::config::Config;

/// Roster: every place that runs workers, behind one HTTP API with live event streams.
///
/// Run `roster serve` (this host's workers, other rosters, older launchers' workers, as the
/// config says), then drive it with the subcommands below, a browser on its address, or any
/// HTTP client.
// clap takes the help text from the comment above; a bare `about` would print the
// package's description instead, which is written for crate readers, not users.
#[derive(Debug, Parser)]
#[command(name = "roster", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The end of `roster --help`.
const AFTER_HELP: &str = "\
Examples:
  roster serve --config roster.toml     # run the server
  roster runtimes                       # then drive it: the runtimes…
  roster spawn --name hi -- echo hello  # …start a worker…
  roster logs -f hi                     # …and follow its output
  roster reload                         # read the config file again (or: kill -HUP)

The client subcommands talk to --server (or ROSTER_URL; default http://127.0.0.1:7411)
with the token of --token-file (or ROSTER_TOKEN_FILE, or ROSTER_TOKEN).

Exit codes: 0 ok; 1 the API answered an error (or a worker name matched none or several);
2 usage error; 3 the server could not be reached; `logs -f` and `spawn -f` exit with the
worker's code (143 if it was stopped, 137 if killed, 127 if it could not start).";

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the API (the default). Flags override the config file.
    Serve(ServeArgs),
    /// Validate a config file without starting; exits non-zero on any error.
    CheckConfig {
        /// The config file.
        file: PathBuf,
    },
    /// The client subcommands.
    #[command(flatten)]
    Client(crate::client::ClientCommand),
}

/// Flags of `roster serve`.
#[derive(Debug, Default, clap::Args)]
pub struct ServeArgs {
    /// The config file (TOML). Without one: an `embedded` runtime `local` on 127.0.0.1:7411.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:7411.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Directory for the registry's state (the id key).
    #[arg(long, value_name = "DIR", value_parser = state_dir())]
    pub state_dir: Option<PathBuf>,
    /// Log format on stderr; `RUST_LOG` sets the filter (default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The parser of `--state-dir`: any path (not only UTF-8 ones) but an empty one, which
/// would put the id key in the working directory.
fn state_dir() -> impl TypedValueParser<Value = PathBuf> {
    OsStringValueParser::new().try_map(|value| {
        if value.is_empty() {
            return Err("the state directory is empty; give a directory, e.g. \
                        --state-dir /var/lib/roster, or leave the flag out");
        }
        Ok(PathBuf::from(value))
    })
}

/// Log line formats.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Parses the command line and runs it; the exit code says how it went.
pub fn main(factories: SourceFactories) -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve(ServeArgs::default())) {
        Command::Serve(args) => serve(args, factories),
        Command::CheckConfig { file } => check_config(&file, &factories),
        Command::Client(command) => crate::client::run(command),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn serve(args: ServeArgs, factories: SourceFactories) -> ExitCode {
    init_logging(args.log_format);
    let mut config = match &args.config {
        Some(path) => match Config::load(path) {
            Ok(c) => c,
            Err(e) => return fail_config(path, &e, &factories),
        },
        None => Config::default_embedded(),
    };
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(dir) = &args.state_dir {
        config.server.state_dir = dir.clone().into();
    }
    // SIGHUP and `POST /v1/admin/reload` read the file again (the flags still win).
    let reload = Some(crate::ReloadConfig {
        path: args.config.clone().map(Into::into),
        listen: args.listen,
        state_dir: args.state_dir.map(Into::into),
        factories: factories.clone(),
        running: config.clone(),
        on_sighup: true,
    });
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(&e),
    };
    let checked = factories.clone();
    let run = crate::run_reloadable(config, factories, reload, crate::shutdown_signal());
    match rt.block_on(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match (
            &args.config,
            e.downcast_ref::<crate::config::ConfigFileError>(),
        ) {
            // A source that would not build: every error of the file, not only its first.
            (Some(path), Some(_)) => {
                drop(rt);
                fail_config(path, &format!("{e:#}"), &checked)
            }
            _ => fail(&format!("{e:#}")),
        },
    }
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("roster: {e}");
    ExitCode::FAILURE
}

/// `roster check-config FILE`: parse, read the tokens, check the listen address, and build
/// every runtime's source (then shut it down at once), reporting every error in file order.
pub fn check_config(file: &std::path::Path, factories: &SourceFactories) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(&e),
    };
    match rt.block_on(Config::check_file(file, factories)) {
        Ok(report) => {
            let n = report.runtimes.len();
            let kinds: Vec<String> = report
                .runtimes
                .iter()
                .map(|(id, kind)| format!("{id} ({kind})"))
                .collect();
            println!(
                "config is valid: {n} runtime{}: {}; {} token{}",
                if n == 1 { "" } else { "s" },
                kinds.join(", "),
                report.tokens,
                if report.tokens == 1 { "" } else { "s" }
            );
            ExitCode::SUCCESS
        }
        Err(errors) => report_errors(file, &errors),
    }
}

/// Prints every error of `file`, one a line, and how many there are.
fn report_errors(file: &std::path::Path, errors: &crate::config::ConfigErrors) -> ExitCode {
    for e in &errors.0 {
        eprintln!("roster: {}: {e}", file.display());
    }
    if errors.0.len() > 1 {
        eprintln!("roster: {} errors in {}", errors.0.len(), file.display());
    }
    ExitCode::FAILURE
}

/// A start that failed on the config: every error of the file, as `check-config` gives
/// them (the first alone if checking finds none, as for an error only starting shows).
fn fail_config(
    file: &std::path::Path,
    first: &dyn std::fmt::Display,
    factories: &SourceFactories,
) -> ExitCode {
    let all = runtime()
        .ok()
        .and_then(|rt| rt.block_on(Config::check_file(file, factories)).err());
    match all {
        Some(errors) => report_errors(file, &errors),
        None => fail(first),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve_args(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        let cli = Cli::try_parse_from(["roster", "serve"].iter().chain(args))?;
        match cli.command {
            Some(Command::Serve(args)) => Ok(args),
            other => panic!("expected serve, got {other:?}"),
        }
    }

    #[test]
    fn an_empty_state_dir_flag_is_refused() {
        for args in [&["--state-dir", ""][..], &["--state-dir="][..]] {
            let err = serve_args(args).unwrap_err();
            assert!(
                err.to_string().contains("state directory is empty"),
                "{err}"
            );
        }
        let args = serve_args(&["--state-dir", "/var/lib/roster"]).unwrap();
        assert_eq!(args.state_dir, Some(PathBuf::from("/var/lib/roster")));
    }
}
