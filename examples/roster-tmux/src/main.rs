//! `roster-tmux`: `roster` with the `tmux` source kind added — a user's own binary built on
//! `server-bin` as a library. Same command line as `roster` (`serve`, `check-config`).

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut factories = server_bin::default_factories();
    if let Err(e) = factories.add::<source_tmux::TmuxSource>() {
        eprintln!("roster-tmux: {e}");
        return ExitCode::FAILURE;
    }
    server_bin::cli::main(factories)
}
