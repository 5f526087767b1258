//! Config edge cases: what the file accepts must work in the running server, what the README
//! shows must pass `roster check-config`, and every error points at the line at fault.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{TestServer, WAIT};
use server_bin::config::{Config, ConfigFileError};
use server_bin::ServeOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Parses `text` and builds (then shuts down) every runtime's source, as `check-config` does.
fn build_err(text: &str) -> ConfigFileError {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::parse(text).unwrap();
    config.server.state_dir = dir.path().to_path_buf().into();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        match config.build_sources(&server_bin::default_factories()) {
            Ok(built) => {
                for b in &built {
                    b.source.shutdown(Some(Duration::ZERO)).await;
                }
                panic!("expected an error, got {} runtimes", built.len())
            }
            Err(e) => e,
        }
    })
}

/// The first ```toml block after the heading `heading` in the README.
fn readme_toml_after(heading: &str) -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let from = readme.find(heading).expect("the heading is in the README");
    let rest = &readme[from..];
    let start = rest.find("```toml\n").expect("a toml block") + "```toml\n".len();
    let end = rest[start..].find("```").unwrap();
    rest[start..start + end].to_string()
}

#[test]
fn the_readme_embedded_runtime_example_passes_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("roster.toml");
    std::fs::write(&file, readme_toml_after("### The embedded runtime")).unwrap();
    // Under `timeout`: a check that hangs must fail, not stall the suite.
    let out = Command::new("timeout")
        .arg("60")
        .arg(env!("CARGO_BIN_EXE_roster"))
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_profile_without_command_is_reported_at_that_profile() {
    let err = build_err(
        "[[runtimes]]\nname = \"local\"\nsource = \"embedded\"\n\
         [runtimes.profiles.a]\ncommand = [\"/bin/true\"]\n\
         [runtimes.profiles.b]\ncwd = \"/tmp\"\n",
    );
    assert!(matches!(err.line, Some(6) | Some(7)), "{err}");
    assert!(!err.message.contains("profiles.a"), "{err}");
}

#[test]
fn an_error_in_a_later_profile_points_at_that_profile_not_an_earlier_one() {
    // Both profiles have the same typo; the source reports `alpha` (tables are read in
    // key order), which is written second.
    let err = build_err(
        "[[runtimes]]\nname = \"local\"\nsource = \"embedded\"\n\
         [runtimes.profiles.zeta]\ncomand = [\"/bin/true\"]\n\
         [runtimes.profiles.alpha]\ncomand = [\"/bin/true\"]\n",
    );
    let names_zeta = err.message.contains("profiles.zeta");
    let names_alpha = err.message.contains("profiles.alpha");
    assert!(names_zeta || names_alpha, "no profile named: {err}");
    assert!(!(names_zeta && names_alpha), "two profiles named: {err}");
    if names_alpha {
        assert_eq!(err.line, Some(7), "{err}");
    } else {
        assert_eq!(err.line, Some(5), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subscriber_queue_the_file_accepts_serves_event_streams() {
    let text = "[server]\nsubscriber_queue = 9223372036854775807\n";
    let config = match Config::parse(text) {
        Err(e) => {
            assert_eq!(e.line, Some(2), "{e}");
            return;
        }
        Ok(config) => config,
    };
    let options = ServeOptions::from_config(&config.server, Vec::new());
    let server = TestServer::start_with(config, options).await.unwrap();
    let first = match server.sse("/v1/events", &[]).await {
        Ok(mut events) => events.next_event().await.map(|e| e.event),
        Err(e) => Err(e),
    };
    assert!(
        matches!(&first, Ok(event) if event == "snapshot"),
        "the event stream broke: {first:?}"
    );
}

/// `GET /healthz` with this `Host` header; the status code.
async fn healthz_with_host(server: &TestServer, host: &str) -> u16 {
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let req = format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut resp))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&resp);
    text.split(' ').nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_allowed_host_the_file_accepts_is_honoured() {
    let mut broken = Vec::new();
    for (entry, host) in [
        ("roster.internal:7411", "roster.internal:7411"),
        ("[fd00::1]", "[fd00::1]:7411"),
        ("roster.internal.", "roster.internal"),
    ] {
        let text = format!("[server]\nallowed_hosts = [\"{entry}\"]\n");
        let config = match Config::parse(&text) {
            Err(e) => {
                assert_eq!(e.line, Some(2), "{e}");
                continue;
            }
            Ok(config) => config,
        };
        let options = ServeOptions::from_config(&config.server, Vec::new());
        let server = TestServer::start_with(config, options).await.unwrap();
        let status = healthz_with_host(&server, host).await;
        if status != 200 {
            broken.push(format!(
                "allowed_hosts = [{entry:?}] is accepted, but Host: {host} gets {status}"
            ));
        }
        server.stop().await.unwrap();
    }
    assert!(broken.is_empty(), "{broken:#?}");
}

#[test]
fn an_sse_ping_below_the_stated_minimum_is_refused() {
    for value in ["1ns", "500us"] {
        let err = Config::parse(&format!("[server]\nsse_ping = \"{value}\"\n"));
        assert!(
            err.is_err(),
            "sse_ping = {value:?} is accepted, but the limit is stated as at least 1ms"
        );
    }
}

#[test]
fn an_empty_state_dir_is_refused() {
    let err = Config::parse("[server]\nstate_dir = \"\"\n");
    assert!(
        err.is_err(),
        "state_dir = \"\" is accepted and puts the id key in the working directory"
    );
}

#[test]
fn a_size_of_the_wrong_kind_says_what_a_size_is() {
    for value in ["-1", "1.5", "true"] {
        let err = Config::parse(&format!("[server]\nmax_body = {value}\n")).unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
        assert!(!err.message.contains("untagged enum"), "{err}");
        assert!(err.message.contains("size"), "{err}");
    }
}
