//! `roster`: the runtime registry server.

fn main() -> std::process::ExitCode {
    server_bin::cli::main(server_bin::default_factories())
}
