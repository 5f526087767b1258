//! The config's tests, by job: defaults, runtimes, unknown keys, wrong values, tokens,
//! listen, files and errors.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use registry_core::{
    ConfigError, OutputEvent, OutputRequest, SourceConfig, SourceFactories, SpawnRequest,
};

use super::lines::split_context;
use super::*;

fn parse_err(text: &str) -> ConfigFileError {
    match Config::parse(text) {
        Ok(config) => panic!("expected an error, got {config:?}"),
        Err(e) => e,
    }
}

fn embedded() -> SourceFactories {
    let mut factories = SourceFactories::new();
    factories.add::<source_embedded::EmbeddedSource>().unwrap();
    factories
}

fn build_err(text: &str) -> ConfigFileError {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::parse(text).unwrap();
    config.server.state_dir = dir.path().to_path_buf().into();
    match config.build_sources(&embedded()) {
        Ok(built) => panic!("expected an error, got {built:?}"),
        Err(e) => e,
    }
}

fn token(name: &str, env: Option<&str>, file: Option<&Path>) -> TokenSection {
    TokenSection {
        name: name.to_string(),
        scope: Scope::Operate,
        token_env: env.map(str::to_string),
        token_file: file.map(Path::to_path_buf).into(),
    }
}

fn with_tokens(tokens: Vec<TokenSection>) -> Config {
    let mut config = Config::default_embedded();
    config.server.tokens = tokens;
    config
}

fn load_err(config: &Config) -> ConfigFileError {
    match config.load_tokens() {
        Ok(tokens) => panic!("expected an error, got {tokens:?}"),
        Err(e) => e,
    }
}

fn assert_server_defaults(server: &ServerSection) {
    assert_eq!(server.listen, DEFAULT_LISTEN.parse::<SocketAddr>().unwrap());
    assert_eq!(server.state_dir, PathBuf::from("./.roster"));
    assert!(server.tokens.is_empty());
    assert!(server.allowed_hosts.is_empty());
    assert!(server.allowed_origins.is_empty());
    assert_eq!(server.max_body, 1 << 20);
    assert_eq!(server.shutdown_grace, Duration::from_secs(10));
    assert_eq!(server.sse_ping, Duration::from_secs(15));
    assert_eq!(server.event_retention, 10_000);
    assert_eq!(server.event_retention_bytes, 64 << 20);
    assert_eq!(server.subscriber_queue, 1024);
    assert_eq!(server.max_connections, 1024);
    assert_eq!(server.max_connections_per_peer, 256);
    assert_eq!(server.max_unauthenticated_connections, 512);
    assert_eq!(server.header_read_timeout, Duration::from_secs(10));
    assert_eq!(server.keep_alive_idle_timeout, Duration::from_secs(60));
    assert_eq!(server.max_header_bytes, 64 << 10);
    assert_eq!(server.max_headers, 100);
    assert_eq!(server.max_streams, 768);
    assert_eq!(server.max_streams_per_token, 256);
}

fn assert_default_runtime(runtimes: &[RuntimeSection]) {
    assert_eq!(runtimes.len(), 1);
    let local = &runtimes[0];
    assert_eq!(local.id.as_str(), "local");
    assert_eq!(local.kind, "embedded");
    assert_eq!(local.table["allow_commands"], toml::Value::Boolean(true));
    assert_eq!(
        local.table["profiles"]["shell"]["command"],
        toml::Value::Array(vec!["/bin/sh".into(), "-c".into()])
    );
    assert_eq!(local.line, 0);
}

// ---- defaults ----

#[test]
fn default_embedded_matches_spec_section_8() {
    let config = Config::default_embedded();
    assert_server_defaults(&config.server);
    assert_default_runtime(&config.runtimes);
}

#[test]
fn an_empty_file_gets_the_defaults_and_the_local_runtime() {
    for text in ["", "\n# nothing here\n", "runtimes = []\n"] {
        let config = Config::parse(text).unwrap();
        assert_server_defaults(&config.server);
        assert_default_runtime(&config.runtimes);
    }
}

#[test]
fn a_file_with_only_server_keeps_the_local_runtime() {
    let config = Config::parse("[server]\nlisten = \"127.0.0.1:9000\"\n").unwrap();
    assert_eq!(config.server.listen.port(), 9000);
    assert_eq!(config.server.sse_ping, Duration::from_secs(15));
    assert_default_runtime(&config.runtimes);
}

#[test]
fn every_server_key_is_read() {
    let config = Config::parse(
        r#"
[server]
listen = "[::1]:8000"
state_dir = "/var/lib/roster"
allowed_hosts = ["roster.internal"]
allowed_origins = ["https://console.example", "http://localhost:3000"]
max_body = "512KiB"
shutdown_grace = "3s"
sse_ping = "500ms"
event_retention = 50
event_retention_bytes = 4096
subscriber_queue = 8
[[server.tokens]]
name = "console"
scope = "operate"
token_env = "ROSTER_CONSOLE_TOKEN"
[[server.tokens]]
name = "viewer"
scope = "read"
token_file = "/etc/roster/viewer.token"
"#,
    )
    .unwrap();
    let s = &config.server;
    assert_eq!(s.listen, "[::1]:8000".parse::<SocketAddr>().unwrap());
    assert_eq!(s.state_dir, PathBuf::from("/var/lib/roster"));
    assert_eq!(s.allowed_hosts, ["roster.internal"]);
    assert_eq!(
        s.allowed_origins,
        ["https://console.example", "http://localhost:3000"]
    );
    assert_eq!(s.max_body, 512 << 10);
    assert_eq!(s.shutdown_grace, Duration::from_secs(3));
    assert_eq!(s.sse_ping, Duration::from_millis(500));
    assert_eq!(s.event_retention, 50);
    assert_eq!(s.event_retention_bytes, 4096);
    assert_eq!(s.subscriber_queue, 8);
    assert_eq!(s.tokens.len(), 2);
    assert_eq!(s.tokens[0].name, "console");
    assert_eq!(s.tokens[0].scope, Scope::Operate);
    assert_eq!(
        s.tokens[0].token_env.as_deref(),
        Some("ROSTER_CONSOLE_TOKEN")
    );
    assert_eq!(s.tokens[1].scope, Scope::Read);
    assert_eq!(
        s.tokens[1].token_file.as_deref(),
        Some(Path::new("/etc/roster/viewer.token"))
    );
}

#[test]
fn the_spec_example_parses_with_runtime_tables_without_name_and_source() {
    let text = r#"[server]
listen = "127.0.0.1:7411"
state_dir = "/var/lib/roster"
[[server.tokens]]
name = "console"
scope = "operate"
token_env = "ROSTER_CONSOLE_TOKEN"

[[runtimes]]
name = "local"
source = "embedded"
max_workers = 256
[runtimes.profiles.shell]
command = ["/bin/sh", "-c"]

[[runtimes]]
name = "gpu-box"
source = "remote"
url = "http://gpu-box.internal:7411"
remote_runtime = "local"
token_env = "GPU_BOX_TOKEN"

[[runtimes]]
name = "legacy"
source = "local"
spool_dir = "/run/legacy-workers"
"#;
    let config = Config::parse(text).unwrap();
    let ids: Vec<_> = config.runtimes.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["local", "gpu-box", "legacy"]);
    let kinds: Vec<_> = config.runtimes.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(kinds, ["embedded", "remote", "local"]);
    let lines: Vec<_> = config.runtimes.iter().map(|r| r.line).collect();
    assert_eq!(lines, [9, 16, 23]);
    let local = &config.runtimes[0];
    assert!(!local.table.contains_key("name") && !local.table.contains_key("source"));
    assert_eq!(local.table["max_workers"], toml::Value::Integer(256));
    assert_eq!(
        config.runtimes[1].table["url"],
        toml::Value::String("http://gpu-box.internal:7411".into())
    );
}

#[test]
fn an_inline_runtime_gets_the_line_of_its_table() {
    let config =
        Config::parse("\nruntimes = [\n  { name = \"a\", source = \"embedded\" },\n]\n").unwrap();
    assert_eq!(config.runtimes[0].id.as_str(), "a");
    assert_eq!(config.runtimes[0].line, 3);
}

#[tokio::test]
async fn default_embedded_builds_a_working_source() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default_embedded();
    config.server.state_dir = dir.path().to_path_buf().into();
    let built = config.build_sources(&embedded()).unwrap();
    assert_eq!(built.len(), 1);
    assert_eq!(built[0].id.as_str(), "local");
    assert_eq!(built[0].kind, "embedded");
    let source = &built[0].source;

    let worker = source
        .spawn(SpawnRequest {
            profile: Some("shell".into()),
            args: vec!["echo configured".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut output = source
        .output(
            &worker.key,
            OutputRequest {
                after: 0,
                follow: true,
            },
        )
        .await
        .unwrap();
    let mut text = Vec::new();
    while let Some(event) = output.recv().await {
        if let OutputEvent::Chunk(chunk) = event {
            text.extend_from_slice(&chunk.data);
        }
    }
    assert_eq!(text, b"configured\n");
    // allow_commands = true in the default runtime.
    source
        .spawn(SpawnRequest {
            command: Some(vec!["/bin/true".into()]),
            ..Default::default()
        })
        .await
        .unwrap();
    source.shutdown(Some(Duration::ZERO)).await;
}

#[test]
fn each_runtime_gets_its_table_and_a_state_dir_under_runtimes() {
    let seen: Arc<Mutex<Vec<SourceConfig>>> = Arc::default();
    let mut factories = SourceFactories::new();
    let record = Arc::clone(&seen);
    factories
        .register("probe", move |config: SourceConfig| {
            let runtime = config.runtime_id.to_string();
            record.lock().unwrap().push(config);
            Err(ConfigError {
                runtime,
                message: "recorded".into(),
                path: None,
            })
        })
        .unwrap();
    let config = Config::parse(
        "[server]\nstate_dir = \"/srv/roster\"\n[[runtimes]]\nname = \"p\"\nsource = \"probe\"\nx = 1\n",
    )
    .unwrap();
    let err = config.build_sources(&factories).unwrap_err();
    assert_eq!(err.line, Some(3));
    assert_eq!(err.message, "runtime \"p\": recorded");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].runtime_id.as_str(), "p");
    assert_eq!(*seen[0].state_dir, Path::new("/srv/roster/runtimes/p"));
    assert_eq!(seen[0].table.keys().collect::<Vec<_>>(), ["x"]);
}

/// Factories that fail every runtime with `message`.
fn failing_with(message: &'static str) -> SourceFactories {
    let mut factories = SourceFactories::new();
    factories
        .register("probe", move |config: SourceConfig| {
            Err(ConfigError {
                runtime: config.runtime_id.to_string(),
                message: message.to_string(),
                path: None,
            })
        })
        .unwrap();
    factories
}

#[test]
fn a_factory_error_naming_a_key_path_gets_that_keys_line() {
    let config = Config::parse(
        "[[runtimes]]\nname = \"p\"\nsource = \"probe\"\ncommand = 1\n\
         [runtimes.profiles.shell]\ncommand = 5\n",
    )
    .unwrap();
    let factories =
        failing_with("invalid type: integer `5`, expected a sequence\nin `profiles.shell.command`");
    let err = config.build_sources(&factories).unwrap_err();
    assert_eq!(err.line, Some(6), "{err}");
    assert!(
        err.message.starts_with("runtime \"p\": invalid type"),
        "{err}"
    );
    let err = config
        .build_sources(&failing_with("`command` is wrong"))
        .unwrap_err();
    assert_eq!(err.line, Some(4), "{err}");
}

/// A runtime `p` of kind `probe` with two profiles: `a` (header on line 5, `command` on
/// 6) and `b` (header on 7, `cwd` on 8).
const TWO_PROFILES: &str = "[[runtimes]]\nname = \"p\"\nsource = \"probe\"\nmax = 1\n\
                            [runtimes.profiles.a]\ncommand = [\"/bin/true\"]\n\
                            [runtimes.profiles.b]\ncwd = \"/tmp\"\n";

#[test]
fn a_factory_error_about_a_table_is_placed_in_that_table() {
    let config = Config::parse(TWO_PROFILES).unwrap();
    // The key is missing from `b`: at `b`'s header, not at `a`'s `command`.
    let err = config
        .build_sources(&failing_with("missing field `command` in `profiles.b`"))
        .unwrap_err();
    assert_eq!(err.line, Some(7), "{err}");
    assert_eq!(
        err.message,
        "runtime \"p\": missing field `command` in `profiles.b`"
    );
    // A key of `b` the message names: at its line.
    let err = config
        .build_sources(&failing_with(
            "unknown field `cwd`, expected one of `command`, `env` in `profiles.b`",
        ))
        .unwrap_err();
    assert_eq!(err.line, Some(8), "{err}");
    assert!(!err.message.contains("profiles.a"), "{err}");
    // The table is named once.
    assert_eq!(err.message.matches("profiles.b").count(), 1, "{err}");
    // A key path as the context: at that key.
    let err = config
        .build_sources(&failing_with(
            "invalid type: integer `5`, expected a sequence\nin `profiles.a.command`",
        ))
        .unwrap_err();
    assert_eq!(err.line, Some(6), "{err}");
}

#[test]
fn a_factory_error_about_an_unknown_table_falls_back_to_the_runtime_line() {
    let config = Config::parse(TWO_PROFILES).unwrap();
    // `command` is a key of `a`, but the message is about `c`, which is not written.
    let err = config
        .build_sources(&failing_with("missing field `command` in `profiles.c`"))
        .unwrap_err();
    assert_eq!(err.line, Some(1), "{err}");
    assert_eq!(
        err.message,
        "runtime \"p\": missing field `command` in `profiles.c`"
    );
}

#[test]
fn a_factory_error_without_a_table_names_the_table_of_the_nested_key_it_names() {
    let config = Config::parse(
        "[[runtimes]]\nname = \"p\"\nsource = \"probe\"\n\
         [runtimes.profiles.a]\ncwd = \"/\"\n[runtimes.more]\ncwd = \"/\"\n",
    )
    .unwrap();
    // Only nested keys have the name: the first one, with its table named.
    let err = config
        .build_sources(&failing_with("`cwd` is wrong"))
        .unwrap_err();
    assert_eq!(err.line, Some(5), "{err}");
    assert_eq!(
        err.message,
        "runtime \"p\": in `profiles.a`: `cwd` is wrong"
    );
}

#[test]
fn a_trailing_table_is_split_from_a_message() {
    assert_eq!(
        split_context("missing field `command` in `profiles.b`"),
        Some(("missing field `command`", "profiles.b"))
    );
    assert_eq!(
        split_context("invalid type: integer `5`\nin `profiles.a.command`"),
        Some(("invalid type: integer `5`", "profiles.a.command"))
    );
    assert_eq!(split_context("in `x`"), Some(("", "x")));
    for message in [
        "unknown field `maxworkers`, expected `max_workers`",
        "`command` is wrong",
        "see `x`",
        "the value within `x`",
        "empty in ``",
        "no key",
    ] {
        assert_eq!(split_context(message), None, "{message}");
    }
}

// ---- unknown keys ----

#[test]
fn an_unknown_key_in_server_names_the_key_and_the_line() {
    let err = parse_err("[server]\nlisten = \"127.0.0.1:1\"\nlisen = \"x\"\n");
    assert_eq!(err.line, Some(3));
    assert!(err.message.contains("`lisen`"), "{err}");
    assert!(err.message.contains("server"), "{err}");
    assert!(err.to_string().starts_with("line 3: "), "{err}");
}

#[test]
fn an_unknown_top_level_table_or_key_is_an_error() {
    let err = parse_err("# roster\n[sever]\nlisten = \"127.0.0.1:1\"\n");
    assert_eq!(err.line, Some(2));
    assert!(err.message.contains("`sever`"), "{err}");
    let err = parse_err("[server]\n\n[[runtime]]\nname = \"a\"\n");
    assert_eq!(err.line, Some(3));
    assert!(err.message.contains("`runtime`"), "{err}");
    let err = parse_err("verbose = true\n");
    assert_eq!(err.line, Some(1));
    assert!(err.message.contains("`verbose`"), "{err}");
}

#[test]
fn an_unknown_key_in_a_token_names_the_key_and_the_line() {
    let err = parse_err(
        "[server]\n[[server.tokens]]\nname = \"a\"\nscope = \"read\"\ntoken = \"inline\"\n",
    );
    assert_eq!(err.line, Some(5));
    assert!(err.message.contains("`token`"), "{err}");
    assert!(err.message.contains("server.tokens"), "{err}");
}

#[test]
fn an_unknown_key_in_a_runtime_table_names_the_key_and_its_line() {
    let text = "[server]\n\n[[runtimes]]\nname = \"local\"\nsource = \"embedded\"\n\
                max_workers = 4\nmaxworkers = 3\n";
    let err = build_err(text);
    assert_eq!(err.line, Some(7), "{err}");
    assert!(err.message.contains("`maxworkers`"), "{err}");
    assert!(err.message.contains("runtime \"local\""), "{err}");
    assert!(err.to_string().contains("line 7"), "{err}");
}

#[test]
fn an_unknown_key_in_a_nested_profile_names_the_key_and_its_line() {
    let text = "[[runtimes]]\nname = \"local\"\nsource = \"embedded\"\n\
                [runtimes.profiles.ok]\ncommand = [\"/bin/true\"]\n\
                [runtimes.profiles.shell]\ncomand = [\"/bin/sh\", \"-c\"]\n";
    let err = build_err(text);
    assert_eq!(err.line, Some(7), "{err}");
    assert!(err.message.contains("`comand`"), "{err}");
    assert!(err.message.contains("profiles.shell"), "{err}");
}

#[tokio::test]
async fn an_unknown_key_in_the_second_runtime_gets_that_runtimes_line() {
    let text = "[[runtimes]]\nname = \"a\"\nsource = \"embedded\"\n\
                [[runtimes]]\nname = \"b\"\nsource = \"embedded\"\nbogus = 1\n";
    let err = build_err(text);
    assert_eq!(err.line, Some(7), "{err}");
    assert!(err.message.contains("runtime \"b\""), "{err}");
    assert!(err.message.contains("`bogus`"), "{err}");
}

#[test]
fn a_runtime_error_naming_no_key_falls_back_to_the_runtime_line() {
    // The factory's message for a wrong type does not name the key.
    let text = "[server]\n[[runtimes]]\nname = \"local\"\nsource = \"embedded\"\n\
                max_workers = \"many\"\n";
    let err = build_err(text);
    assert!(matches!(err.line, Some(2) | Some(5)), "{err}");
    assert!(err.message.contains("runtime \"local\""), "{err}");
    assert!(err.message.contains("invalid type"), "{err}");
}

// ---- wrong values in [server] ----

#[test]
fn a_wrong_type_names_the_key_and_the_line() {
    let err = parse_err("[server]\nlisten = 5\n");
    assert_eq!(err.line, Some(2));
    assert!(err.message.contains("`server.listen`"), "{err}");
    let err = parse_err("[server]\n\nevent_retention = \"lots\"\n");
    assert_eq!(err.line, Some(3));
    assert!(err.message.contains("`server.event_retention`"), "{err}");
    let err = parse_err("[server]\nallowed_hosts = [\"a\", 5]\n");
    assert_eq!(err.line, Some(2));
    assert!(err.message.contains("`server.allowed_hosts`"), "{err}");
    let err = parse_err("server = 1\n");
    assert_eq!(err.line, Some(1));
    assert!(err.message.contains("`server`"), "{err}");
}

#[test]
fn a_bad_duration_names_the_key_and_the_line() {
    let err = parse_err("[server]\nsse_ping = \"15s\"\nshutdown_grace = \"soon\"\n");
    assert_eq!(err.line, Some(3));
    assert!(err.message.contains("`server.shutdown_grace`"), "{err}");
    assert!(err.message.contains("not a duration"), "{err}");
}

#[test]
fn a_bad_byte_size_names_the_key_and_the_line() {
    let err = parse_err("[server]\nmax_body = \"lots\"\n");
    assert_eq!(err.line, Some(2));
    assert!(err.message.contains("`server.max_body`"), "{err}");
    assert!(err.message.contains("not a size"), "{err}");
    let err = parse_err("[server]\n\nevent_retention_bytes = \"1.5MiB\"\n");
    assert_eq!(err.line, Some(3));
    assert!(
        err.message.contains("`server.event_retention_bytes`"),
        "{err}"
    );
}

#[test]
fn a_bad_listen_address_names_the_key_and_the_line() {
    let err = parse_err("[server]\nlisten = \"localhost\"\n");
    assert_eq!(err.line, Some(2));
    assert!(err.message.contains("`server.listen`"), "{err}");
    assert!(err.message.contains("address"), "{err}");
}

#[test]
fn zero_limits_are_refused_at_their_line() {
    for (key, value) in [
        ("max_body", "0"),
        ("sse_ping", "\"0s\""),
        ("event_retention", "0"),
        ("event_retention_bytes", "0"),
        ("subscriber_queue", "0"),
    ] {
        let err = parse_err(&format!("[server]\n{key} = {value}\n"));
        assert_eq!(err.line, Some(2), "{err}");
        assert!(err.message.contains(&format!("`server.{key}`")), "{err}");
    }
    let config = Config::parse("[server]\nshutdown_grace = \"0s\"\n").unwrap();
    assert_eq!(config.server.shutdown_grace, Duration::ZERO);
}

#[test]
fn connection_limits_are_read_and_checked_at_their_line() {
    let config = Config::parse(
        "[server]\nmax_connections = 10\nmax_connections_per_peer = 2\n\
         max_unauthenticated_connections = 3\nheader_read_timeout = \"2s\"\n\
         keep_alive_idle_timeout = \"500ms\"\nmax_header_bytes = \"8KiB\"\n\
         max_headers = 20\nmax_streams = 5\nmax_streams_per_token = 4\n",
    )
    .unwrap();
    let s = &config.server;
    assert_eq!(
        (
            s.max_connections,
            s.max_connections_per_peer,
            s.max_unauthenticated_connections
        ),
        (10, 2, 3)
    );
    assert_eq!(s.header_read_timeout, Duration::from_secs(2));
    assert_eq!(s.keep_alive_idle_timeout, Duration::from_millis(500));
    assert_eq!((s.max_header_bytes, s.max_headers), (8 << 10, 20));
    assert_eq!((s.max_streams, s.max_streams_per_token), (5, 4));
    for (key, value, says) in [
        ("max_connections", "0", "at least 1"),
        ("max_connections_per_peer", "0", "at least 1"),
        ("max_unauthenticated_connections", "0", "at least 1"),
        ("max_streams", "0", "at least 1"),
        ("max_streams_per_token", "2000000", "at most"),
        ("header_read_timeout", "\"0s\"", "at least 1ms"),
        ("keep_alive_idle_timeout", "\"2h\"", "at most 1h"),
        ("max_header_bytes", "100", "from 1KiB to 128KiB"),
        ("max_header_bytes", "\"1MiB\"", "from 1KiB to 128KiB"),
        ("max_headers", "0", "from 1 to 1000"),
        ("max_headers", "1001", "from 1 to 1000"),
    ] {
        let err = parse_err(&format!("[server]\n\n{key} = {value}\n"));
        assert_eq!(err.line, Some(3), "{err}");
        assert!(err.message.contains(&format!("`server.{key}`")), "{err}");
        assert!(err.message.contains(says), "{key} = {value}: {err}");
    }
}

#[test]
fn allowed_hosts_and_origins_must_be_bare() {
    let err = parse_err("[server]\nallowed_hosts = [\"https://roster.internal\"]\n");
    assert_eq!(err.line, Some(2));
    assert!(err.message.contains("allowed_hosts"), "{err}");
    for origin in ["https://console.example/", "console.example", "null", "*"] {
        let err = parse_err(&format!("[server]\n\nallowed_origins = [\"{origin}\"]\n"));
        assert_eq!(err.line, Some(3), "{err}");
        assert!(err.message.contains("allowed_origins"), "{err}");
    }
    Config::parse("[server]\nallowed_origins = [\"http://127.0.0.1:3000\"]\n").unwrap();
}

#[test]
fn allowed_hosts_are_kept_as_the_server_compares_them() {
    let config = Config::parse(
        "[server]\nallowed_hosts = [\"Roster.Internal.\", \"[FD00::1]\", \"fd00::2\", \
         \"10.0.0.1\"]\n",
    )
    .unwrap();
    assert_eq!(
        config.server.allowed_hosts,
        ["roster.internal", "fd00::1", "fd00::2", "10.0.0.1"]
    );
}

#[test]
fn allowed_hosts_that_could_never_match_are_refused_naming_the_entry() {
    for (entry, says) in [
        ("roster.internal:7411", "drop the port"),
        ("roster.internal:", "drop the port"),
        ("10.0.0.1:80", "drop the port"),
        ("[fd00::1]:7411", "drop the port"),
        ("", "empty"),
        (".", "empty"),
        ("[roster.internal]", "not a host name"),
        ("[fd00::1", "not a host name"),
        ("a:b:c", "not a host name"),
        ("roster]internal", "not a host name"),
    ] {
        let err = parse_err(&format!(
            "[server]\nlisten = \"127.0.0.1:1\"\nallowed_hosts = [\"ok\", \"{entry}\"]\n"
        ));
        assert_eq!(err.line, Some(3), "{err}");
        assert!(err.message.contains("`server.allowed_hosts`"), "{err}");
        assert!(err.message.contains(&format!("{entry:?}")), "{err}");
        assert!(err.message.contains(says), "{entry:?}: {err}");
    }
}

#[test]
fn allowed_origins_with_a_port_browsers_never_send_are_refused() {
    for (origin, fixed) in [
        ("http://console.example:80", "http://console.example"),
        ("https://console.example:443", "https://console.example"),
        ("HTTPS://console.example:0443", "HTTPS://console.example"),
        ("https://console.example:", "https://console.example"),
        ("http://[::1]:80", "http://[::1]"),
    ] {
        let err = parse_err(&format!("[server]\n\nallowed_origins = [\"{origin}\"]\n"));
        assert_eq!(err.line, Some(3), "{err}");
        assert!(err.message.contains(&format!("{origin:?}")), "{err}");
        assert!(err.message.contains("drop the port"), "{err}");
        assert!(err.message.contains(&format!("{fixed:?}")), "{err}");
    }
    for origin in ["https://console.example:99999", "https://console.example:x"] {
        let err = parse_err(&format!("[server]\nallowed_origins = [\"{origin}\"]\n"));
        assert_eq!(err.line, Some(2), "{err}");
        assert!(err.message.contains("not an origin"), "{err}");
    }
    let config = Config::parse(
        "[server]\nallowed_origins = [\"http://console.example:443\", \
         \"https://console.example:80\", \"http://[::1]:3000\", \"http://[::1]\"]\n",
    )
    .unwrap();
    assert_eq!(config.server.allowed_origins.len(), 4);
}

#[test]
fn an_sse_ping_below_1ms_is_refused_and_1ms_is_accepted() {
    for value in ["1ns", "999us"] {
        let err = parse_err(&format!("[server]\nsse_ping = \"{value}\"\n"));
        assert_eq!(err.line, Some(2), "{err}");
        assert!(err.message.contains("at least 1ms"), "{err}");
    }
    let config = Config::parse("[server]\nsse_ping = \"1ms\"\n").unwrap();
    assert_eq!(config.server.sse_ping, Duration::from_millis(1));
}

#[test]
fn an_empty_state_dir_is_refused_at_its_line() {
    let err = parse_err("[server]\nlisten = \"127.0.0.1:1\"\nstate_dir = \"\"\n");
    assert_eq!(err.line, Some(3), "{err}");
    assert!(err.message.contains("`server.state_dir` is empty"), "{err}");
}

#[test]
fn a_subscriber_queue_over_the_maximum_is_refused_at_its_line() {
    let config = Config::parse("[server]\nsubscriber_queue = 1048576\n").unwrap();
    assert_eq!(config.server.subscriber_queue, 1 << 20);
    for value in ["1048577", "9223372036854775807"] {
        let err = parse_err(&format!("[server]\n\nsubscriber_queue = {value}\n"));
        assert_eq!(err.line, Some(3), "{err}");
        assert!(err.message.contains("`server.subscriber_queue`"), "{err}");
        assert!(err.message.contains("at most 1048576"), "{err}");
    }
}

#[test]
fn a_syntax_error_has_its_line() {
    let err = parse_err("[server]\nlisten = \"127.0.0.1:1\"\nmax_body = \n");
    assert_eq!(err.line, Some(3), "{err}");
    assert!(err.message.contains("invalid TOML"), "{err}");
    let err = parse_err("[server]\n[server\n");
    assert_eq!(err.line, Some(2), "{err}");
    let err = parse_err("[server]\nsse_ping = \"1s\"\nsse_ping = \"2s\"\n");
    assert_eq!(err.line, Some(3), "{err}");
    assert!(err.message.contains("`sse_ping`"), "{err}");
}

// ---- runtimes ----

#[test]
fn duplicate_runtime_names_are_refused_with_both_lines() {
    let err = parse_err(
        "[[runtimes]]\nname = \"a\"\nsource = \"embedded\"\n\n\
         [[runtimes]]\nname = \"a\"\nsource = \"embedded\"\n",
    );
    assert_eq!(err.line, Some(6));
    assert!(err.message.contains("\"a\""), "{err}");
    assert!(err.message.contains("used twice"), "{err}");
    assert!(err.message.contains("line 2"), "{err}");
}

#[test]
fn a_bad_runtime_name_is_refused_at_its_line() {
    let err = parse_err("[[runtimes]]\nsource = \"embedded\"\nname = \"GPU_box\"\n");
    assert_eq!(err.line, Some(3));
    assert!(err.message.contains("GPU_box"), "{err}");
    assert!(err.message.contains("lowercase"), "{err}");
    let err = parse_err("[[runtimes]]\nname = 7\nsource = \"embedded\"\n");
    assert_eq!(err.line, Some(2));
    assert!(err.message.contains("must be a string"), "{err}");
}

#[test]
fn a_runtime_without_name_or_source_is_refused_at_its_header() {
    let err = parse_err("[server]\n\n[[runtimes]]\nsource = \"embedded\"\n");
    assert_eq!(err.line, Some(3));
    assert!(err.message.contains("`name`"), "{err}");
    let err = parse_err("[server]\n[[runtimes]]\nname = \"a\"\nmax_workers = 1\n");
    assert_eq!(err.line, Some(2));
    assert!(err.message.contains("`source`"), "{err}");
    assert!(err.message.contains("\"a\""), "{err}");
}

#[test]
fn an_unknown_source_kind_lists_the_known_kinds_at_the_source_line() {
    let err = build_err("[[runtimes]]\nname = \"a\"\nmax_workers = 1\nsource = \"embeded\"\n");
    assert_eq!(err.line, Some(4));
    assert!(err.message.contains("\"embeded\""), "{err}");
    assert!(err.message.contains("known kinds: embedded"), "{err}");
    assert!(err.message.contains("runtime \"a\""), "{err}");
}

// ---- tokens ----

#[test]
fn a_token_secret_is_read_from_its_env_variable() {
    let var = "ROSTER_TEST_CONFIG_TOKEN_ENV_READ";
    std::env::set_var(var, "0123456789abcdef-env");
    let config = with_tokens(vec![token("console", Some(var), None)]);
    let tokens = config.load_tokens().unwrap();
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0].name, "console");
    assert_eq!(tokens[0].scope, Scope::Operate);
    assert_eq!(tokens[0].secret, "0123456789abcdef-env");
}

#[test]
fn a_token_file_is_read_without_its_trailing_newline() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(b"0123456789abcdef-file\n").unwrap();
    let config = with_tokens(vec![token("viewer", None, Some(file.path()))]);
    let tokens = config.load_tokens().unwrap();
    assert_eq!(tokens[0].secret, "0123456789abcdef-file");
}

#[test]
fn a_missing_env_variable_names_it_and_the_token_but_no_secret() {
    let set = "ROSTER_TEST_CONFIG_TOKEN_ENV_SET";
    let unset = "ROSTER_TEST_CONFIG_TOKEN_ENV_UNSET";
    std::env::set_var(set, "first-secret-0123456789");
    std::env::remove_var(unset);
    let config = with_tokens(vec![
        token("first", Some(set), None),
        token("second", Some(unset), None),
    ]);
    let err = load_err(&config);
    assert!(err.message.contains(unset), "{err}");
    assert!(err.message.contains("\"second\""), "{err}");
    assert!(err.message.contains("not set"), "{err}");
    assert!(!err.message.contains("first-secret"), "{err}");
}

#[test]
fn a_short_or_empty_secret_is_refused_without_showing_it() {
    let var = "ROSTER_TEST_CONFIG_TOKEN_SHORT";
    std::env::set_var(var, "tiny-secret");
    let config = with_tokens(vec![token("console", Some(var), None)]);
    let err = load_err(&config);
    assert!(err.message.contains("shorter than 16 bytes"), "{err}");
    assert!(err.message.contains("\"console\""), "{err}");
    assert!(err.message.contains(var), "{err}");
    assert!(!err.message.contains("tiny-secret"), "{err}");

    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(b" \n\n").unwrap();
    let config = with_tokens(vec![token("blank", None, Some(file.path()))]);
    let err = load_err(&config);
    assert!(err.message.contains("empty"), "{err}");
    assert!(err.message.contains("\"blank\""), "{err}");
}

#[test]
fn a_secret_with_spaces_inside_is_refused() {
    let var = "ROSTER_TEST_CONFIG_TOKEN_SPACES";
    std::env::set_var(var, "0123456789 abcdef ghij");
    let err = load_err(&with_tokens(vec![token("console", Some(var), None)]));
    assert!(err.message.contains("visible ASCII"), "{err}");
    assert!(!err.message.contains("abcdef"), "{err}");
}

#[test]
fn an_unreadable_token_file_names_the_token_not_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such.token");
    let err = load_err(&with_tokens(vec![token("viewer", None, Some(&missing))]));
    assert!(err.message.contains("\"viewer\""), "{err}");
    assert!(err.message.contains("cannot be read"), "{err}");
    assert!(!err.message.contains("no-such.token"), "{err}");
}

#[test]
fn a_token_with_both_or_neither_source_is_refused_at_its_line() {
    let err = parse_err(
        "[server]\n[[server.tokens]]\nname = \"a\"\nscope = \"read\"\n\
         token_env = \"A\"\ntoken_file = \"/a\"\n",
    );
    assert_eq!(err.line, Some(2));
    assert!(err.message.contains("exactly one"), "{err}");
    assert!(err.message.contains("\"a\""), "{err}");
    let err = parse_err(
        "[server]\n[[server.tokens]]\nname = \"a\"\nscope = \"read\"\ntoken_env = \"A\"\n\
         [[server.tokens]]\nname = \"b\"\nscope = \"read\"\n",
    );
    assert_eq!(err.line, Some(6));
    assert!(err.message.contains("exactly one"), "{err}");
    let err = load_err(&with_tokens(vec![token(
        "both",
        Some("X"),
        Some(Path::new("/x")),
    )]));
    assert!(err.message.contains("exactly one"), "{err}");
}

#[test]
fn a_token_without_scope_or_with_a_bad_scope_is_refused() {
    let err = parse_err("[[server.tokens]]\nname = \"a\"\ntoken_env = \"A\"\n");
    assert_eq!(err.line, Some(1));
    assert!(err.message.contains("`scope`"), "{err}");
    let err = parse_err("[[server.tokens]]\nname = \"a\"\nscope = \"admin\"\ntoken_env = \"A\"\n");
    assert_eq!(err.line, Some(3));
    assert!(err.message.contains("scope"), "{err}");
}

#[test]
fn duplicate_token_names_are_refused() {
    let err = parse_err(
        "[[server.tokens]]\nname = \"a\"\nscope = \"read\"\ntoken_env = \"A\"\n\
         [[server.tokens]]\nname = \"a\"\nscope = \"operate\"\ntoken_env = \"B\"\n",
    );
    assert_eq!(err.line, Some(5));
    assert!(err.message.contains("used twice"), "{err}");
    assert!(err.message.contains("line 1"), "{err}");

    let var = "ROSTER_TEST_CONFIG_TOKEN_DUP_NAME";
    std::env::set_var(var, "0123456789abcdef-dup");
    let err = load_err(&with_tokens(vec![
        token("a", Some(var), None),
        token("a", Some(var), None),
    ]));
    assert!(err.message.contains("used twice"), "{err}");
}

#[test]
fn two_tokens_with_the_same_secret_are_refused_without_showing_it() {
    let (a, b) = (
        "ROSTER_TEST_CONFIG_TOKEN_SAME_A",
        "ROSTER_TEST_CONFIG_TOKEN_SAME_B",
    );
    std::env::set_var(a, "same-secret-0123456789");
    std::env::set_var(b, "same-secret-0123456789\n");
    let err = load_err(&with_tokens(vec![
        token("one", Some(a), None),
        token("two", Some(b), None),
    ]));
    assert!(err.message.contains("same secret"), "{err}");
    assert!(err.message.contains("\"one\"") && err.message.contains("\"two\""));
    assert!(!err.message.contains("same-secret-0123456789"), "{err}");
}

#[test]
fn debug_output_shows_no_secret_state_dir_token_file_or_runtime_value() {
    let var = "ROSTER_TEST_CONFIG_TOKEN_DEBUG";
    std::env::set_var(var, "debug-secret-0123456789");
    let config = Config::parse(&format!(
        r#"[server]
state_dir = "/srv/hidden-state"
[[server.tokens]]
name = "console"
scope = "operate"
token_env = "{var}"
[[server.tokens]]
name = "viewer"
scope = "read"
token_file = "/etc/hidden/viewer.token"
[[runtimes]]
name = "gpu-box"
source = "remote"
url = "http://hidden.internal:7411"
"#
    ))
    .unwrap();
    let debug = format!("{config:?}");
    assert!(!debug.contains("hidden"), "{debug}");
    assert!(debug.contains("<redacted>"), "{debug}");
    assert!(debug.contains("console") && debug.contains(var), "{debug}");
    assert!(debug.contains("url"), "{debug}");

    let only_env = with_tokens(vec![token("console", Some(var), None)]);
    let tokens = only_env.load_tokens().unwrap();
    let debug = format!("{tokens:?}");
    assert!(!debug.contains("debug-secret"), "{debug}");
    assert!(
        debug.contains("console") && debug.contains("<redacted>"),
        "{debug}"
    );
}

#[test]
fn scope_operate_allows_everything_and_read_only_read() {
    assert!(Scope::Operate.allows(Scope::Operate));
    assert!(Scope::Operate.allows(Scope::Read));
    assert!(Scope::Read.allows(Scope::Read));
    assert!(!Scope::Read.allows(Scope::Operate));
}

// ---- listen ----

fn listening_on(addr: &str) -> Config {
    let mut config = Config::default_embedded();
    config.server.listen = addr.parse().unwrap();
    config
}

fn a_token() -> LoadedToken {
    LoadedToken {
        name: "console".into(),
        scope: Scope::Operate,
        secret: "0123456789abcdef".into(),
    }
}

#[test]
fn without_tokens_a_non_loopback_listen_is_refused_with_the_reason_and_the_fix() {
    for addr in ["0.0.0.0:7411", "[::]:7411", "192.168.1.10:7411"] {
        let err = listening_on(addr).check_listen(&[]).unwrap_err();
        assert!(err.message.contains("without tokens"), "{err}");
        assert!(err.message.contains("start processes"), "{err}");
        assert!(err.message.contains("[[server.tokens]]"), "{err}");
        assert!(err.message.contains("127.0.0.1"), "{err}");
        assert!(err.message.contains("[::1]"), "{err}");
    }
}

#[test]
fn without_tokens_a_loopback_listen_is_accepted() {
    for addr in [
        "127.0.0.1:7411",
        "[::1]:7411",
        "127.0.0.2:80",
        "[::ffff:127.0.0.1]:1",
    ] {
        listening_on(addr).check_listen(&[]).unwrap();
    }
}

#[test]
fn with_tokens_any_listen_is_accepted() {
    listening_on("0.0.0.0:7411")
        .check_listen(&[a_token()])
        .unwrap();
}

// ---- files and errors ----

#[test]
fn load_reads_a_file_and_an_unreadable_one_says_so() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(b"[server]\nlisten = \"127.0.0.1:9100\"\n")
        .unwrap();
    let config = Config::load(file.path()).unwrap();
    assert_eq!(config.server.listen.port(), 9100);

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("roster.toml");
    let err = Config::load(&missing).unwrap_err();
    assert_eq!(err.line, None);
    assert!(err.message.contains("cannot read the config file"), "{err}");
    assert!(err.message.contains("roster.toml"), "{err}");
}

#[test]
fn config_file_error_displays_its_line_when_known() {
    let with = ConfigFileError {
        line: Some(7),
        message: "bad".into(),
    };
    assert_eq!(with.to_string(), "line 7: bad");
    let without = ConfigFileError {
        line: None,
        message: "bad".into(),
    };
    assert_eq!(without.to_string(), "bad");
}

#[tokio::test]
async fn an_in_tree_sources_check_is_placed_by_the_key_path_it_gives() {
    // Neither message quotes the key: the line comes from the error's path alone.
    let text = "[[runtimes]]\nname = \"local\"\nsource = \"embedded\"\n\
                [runtimes.profiles.ok]\ncommand = [\"/bin/true\"]\n\
                [runtimes.profiles.shell]\ncwd = \"/\"\ncommand = []\n";
    let err = build_err(text);
    assert_eq!(err.line, Some(8), "{err}");
    assert!(err.message.contains("`profiles.shell.command`"), "{err}");
    assert!(err.message.contains("empty command"), "{err}");
}

#[test]
fn a_factory_error_with_a_path_is_placed_by_the_path_not_by_the_names_it_quotes() {
    let config = Config::parse(TWO_PROFILES).unwrap();
    let mut factories = SourceFactories::new();
    factories
        .register("probe", |config: SourceConfig| {
            // Quotes `command` (a key of profile `a`), but is about `b`'s `cwd`.
            Err(
                ConfigError::new(config.runtime_id.as_str(), "must sit beside `command`")
                    .at("profiles.b.cwd"),
            )
        })
        .unwrap();
    let err = config.build_sources(&factories).unwrap_err();
    assert_eq!(err.line, Some(8), "{err}");
    assert_eq!(
        err.message,
        "runtime \"p\": `profiles.b.cwd`: must sit beside `command`"
    );
}

// ---- plain words ----

#[test]
fn serde_words_become_plain_ones_with_the_fix_where_known() {
    let err = parse_err("[server]\nevent_retention = \"lots\"\n");
    assert_eq!(err.line, Some(2), "{err}");
    assert!(
        err.message
            .contains("expected a whole number (0 or more), found the string \"lots\""),
        "{err}"
    );
    assert!(!err.message.contains("usize"), "{err}");
    let err = parse_err("[server]\nlisen = \"127.0.0.1:1\"\n");
    assert!(err.message.contains("did you mean `listen`?"), "{err}");
    let err = parse_err("[server]\nallowed_hosts = \"a\"\n");
    assert!(err.message.contains("expected a list"), "{err}");
    assert!(!err.message.contains("sequence"), "{err}");
    let err = parse_err("[server]\nlisten = 5\n");
    assert!(err.message.contains("\"127.0.0.1:7411\""), "{err}");
}

#[tokio::test]
async fn a_sources_serde_error_is_in_plain_words_at_its_line() {
    let text = "[[runtimes]]\nname = \"local\"\nsource = \"embedded\"\n\
                max_workers = \"many\"\nmax_finishd = 3\n";
    let err = build_err(text);
    assert!(!err.message.contains("usize"), "{err}");
    assert!(err.message.contains("a whole number"), "{err}");
}
