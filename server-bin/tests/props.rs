//! Property tests for what a client or an operator hands the server: the config file (a
//! mutating corpus grown from the README's examples), and, through the real server on
//! loopback, worker ids in paths, page tokens and filters in queries, and `Last-Event-ID` on
//! both kinds of stream. Nothing panics, nothing answers 5xx, and a stream resumed from a
//! cursor it can't use starts over (a `reset`, or what is retained) instead of refusing.

use std::time::Duration;

use anyhow::Result;
use http::Method;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use server_bin::Config;
use testkit::{SseEvent, TestServer, WAIT};

/// The README's TOML examples that are whole config files.
fn readme_configs() -> Vec<String> {
    let readme = include_str!("../../README.md");
    let mut out = Vec::new();
    let mut rest = readme;
    while let Some(start) = rest.find("```toml\n") {
        let body = &rest[start + 8..];
        let Some(end) = body.find("```") else { break };
        let block = &body[..end];
        if Config::parse(block).is_ok() {
            out.push(block.to_string());
        }
        rest = &body[end..];
    }
    out
}

/// One edit of a config file's text.
#[derive(Debug, Clone)]
enum Edit {
    /// Delete `len` bytes at `at`.
    Delete { at: usize, len: usize },
    /// Insert a piece of TOML syntax at `at`.
    Insert { at: usize, piece: &'static str },
    /// Repeat line `line` (a duplicate key or table).
    RepeatLine { line: usize },
    /// Cut the file at `at`.
    Truncate { at: usize },
}

fn edit() -> impl Strategy<Value = Edit> {
    let piece = prop::sample::select(vec![
        "=",
        "\"",
        "'",
        "[",
        "]",
        "[[",
        "]]",
        "{",
        "}",
        ",",
        "\n",
        "#",
        ".",
        "-1",
        "0",
        "99999999999999999999",
        "\"10x\"",
        "\"1MiB\"",
        "true",
        "[server]\n",
        "[[runtimes]]\n",
        "name = \"a\"\n",
        "source = \"embedded\"\n",
        "profiles = 1\n",
        "¡",
        "\u{0}",
        "\"\\u0000\"",
    ]);
    prop_oneof![
        (any::<usize>(), 1usize..12).prop_map(|(at, len)| Edit::Delete { at, len }),
        (any::<usize>(), piece).prop_map(|(at, piece)| Edit::Insert { at, piece }),
        any::<usize>().prop_map(|line| Edit::RepeatLine { line }),
        any::<usize>().prop_map(|at| Edit::Truncate { at }),
    ]
}

/// The byte index at or before `at` (modulo the length) that is a char boundary.
fn boundary(text: &str, at: usize) -> usize {
    let mut i = at % (text.len() + 1);
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn apply(text: &mut String, edit: &Edit) {
    match *edit {
        Edit::Delete { at, len } => {
            let start = boundary(text, at);
            let end = boundary(text, start + len.min(text.len() - start));
            text.replace_range(start..end.max(start), "");
        }
        Edit::Insert { at, piece } => {
            let at = boundary(text, at);
            text.insert_str(at, piece);
        }
        Edit::RepeatLine { line } => {
            let lines: Vec<&str> = text.lines().collect();
            if !lines.is_empty() {
                let i = line % lines.len();
                let mut out = lines[..=i].join("\n");
                out.push('\n');
                out.push_str(&lines[i..].join("\n"));
                *text = out;
            }
        }
        Edit::Truncate { at } => {
            let at = boundary(text, at);
            text.truncate(at);
        }
    }
}

#[test]
fn the_readme_examples_parse_and_every_mutation_of_them_is_answered() {
    let seeds = readme_configs();
    assert!(
        seeds.len() >= 3,
        "the README's whole-file examples should parse: found {}",
        seeds.len()
    );
    let mut runner = TestRunner::new(RunnerConfig {
        cases: 1024,
        ..RunnerConfig::default()
    });
    let strategy = (
        prop::sample::select(seeds),
        prop::collection::vec(edit(), 1..5),
    );
    runner
        .run(&strategy, |(seed, edits)| {
            let mut text = seed;
            for e in &edits {
                apply(&mut text, e);
            }
            if let Err(err) = Config::parse(&text) {
                let message = err.to_string();
                prop_assert!(!message.trim().is_empty());
                // Plain words for people, not the parser's type names.
                for rust in ["usize", "u64", "i64", "Option<", "Vec<"] {
                    prop_assert!(!message.contains(rust), "{:?}: {}", text, message);
                }
            }
            Ok(())
        })
        .unwrap();
}

/// A string of the visible ASCII a header or a query can carry, leaning to the shapes the
/// server parses (ids, cursors, numbers, page tokens).
fn token_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,40}",
        "w_[0-9A-Z]{20,30}",
        "[0-9a-f]{16}-[0-9]{1,22}",
        "[0-9]{1,25}",
        "-?[0-9]{1,20}\\.w_[0-9A-Z]{26}",
        "e?[0-9]{0,4}\\.?[0-9]{0,4}",
    ]
}

fn pct(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

fn fail(e: anyhow::Error) -> TestCaseError {
    TestCaseError::fail(format!("{e:#}"))
}

fn output_text(events: &[SseEvent]) -> String {
    events
        .iter()
        .filter(|e| e.event == "output")
        .map(|e| e.data["data"].as_str().unwrap_or_default())
        .collect()
}

#[test]
fn ids_page_tokens_filters_and_cursors_from_clients_are_answered_never_5xx() -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let (server, id, whole) = rt.block_on(async {
        let server = TestServer::start().await?;
        let id = server
            .spawn_shell("for i in 1 2 3 4 5 6; do echo line$i; done")
            .await?;
        server.wait_worker(&id, |w| w["state"] == "exited").await?;
        let path = format!("/v1/workers/{id}/output");
        let whole = output_text(&server.sse(&path, &[]).await?.rest(WAIT).await?);
        anyhow::Ok((server, id, whole))
    })?;
    assert!(
        whole.starts_with("line1\n") && whole.ends_with("line6\n"),
        "{whole:?}"
    );

    let mut runner = TestRunner::new(RunnerConfig {
        cases: 160,
        ..RunnerConfig::default()
    });
    let strategy = (token_text(), token_text(), token_text());
    runner
        .run(&strategy, |(a, b, c)| {
            rt.block_on(async {
                // A worker id in the path.
                let r = server
                    .get(&format!("/v1/workers/{}", pct(&a)))
                    .await
                    .map_err(fail)?;
                prop_assert!(r.status.as_u16() < 500, "{} for id {:?}", r.status, a);
                prop_assert!(r.status.is_client_error() || r.status.is_success());

                // A page token, a limit and a state filter.
                let query = format!(
                    "/v1/workers?page={}&limit={}&state={}",
                    pct(&a),
                    pct(&b),
                    pct(&c)
                );
                let r = server.get(&query).await.map_err(fail)?;
                prop_assert!(
                    r.status == 200 || r.code() == "invalid_request",
                    "{} {} for {}",
                    r.status,
                    r.text(),
                    query
                );

                // A cursor on the event stream: a snapshot or a reset comes first.
                let mut events = server
                    .sse("/v1/events", &[("last-event-id", &b)])
                    .await
                    .map_err(fail)?;
                let first = events
                    .next_event_within(WAIT)
                    .await
                    .map_err(fail)?
                    .ok_or_else(|| TestCaseError::fail("no first event"))?;
                prop_assert!(
                    first.event == "snapshot"
                        || first.event == "reset"
                        || first.event == "worker.upserted",
                    "{:?} after Last-Event-ID {:?}",
                    first,
                    b
                );
                drop(events);

                // A Last-Event-ID on the output stream: the stream is served, ends, and
                // holds a tail of the output (all of it when the id can't be used).
                let path = format!("/v1/workers/{id}/output");
                let mut stream = server
                    .sse(&path, &[("last-event-id", &c)])
                    .await
                    .map_err(fail)?;
                let events = stream.rest(Duration::from_secs(20)).await.map_err(fail)?;
                prop_assert_eq!(events.last().map(|e| e.event.as_str()), Some("end"));
                let got = output_text(&events);
                prop_assert!(whole.ends_with(&got), "{:?} is no tail of {:?}", got, whole);
                if c.parse::<u64>().is_err() {
                    prop_assert_eq!(&got, &whole, "Last-Event-ID {:?}", c);
                }
                Ok(())
            })
        })
        .unwrap();
    rt.block_on(server.stop())?;
    Ok(())
}

#[test]
fn every_method_on_every_route_with_a_junk_body_is_answered() -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let server = rt.block_on(TestServer::start())?;
    let mut runner = TestRunner::new(RunnerConfig {
        cases: 128,
        ..RunnerConfig::default()
    });
    let route = prop::sample::select(vec![
        "/v1/runtimes",
        "/v1/runtimes/local",
        "/v1/runtimes/local/workers",
        "/v1/workers",
        "/v1/workers/w_0000000000000000000000000A",
        "/v1/workers/w_0000000000000000000000000A/input",
        "/v1/workers/w_0000000000000000000000000A/stop",
        "/v1/admin/reload",
        "/healthz",
        "/metrics",
    ]);
    let method = prop::sample::select(vec![
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
    ]);
    let body = prop_oneof![
        any::<String>(),
        Just("{}".to_string()),
        Just("{\"profile\": \"shell\", \"args\": [\"true\"], \"x\": 1}".to_string()),
        "\\{\"[a-z_]{1,8}\": [ -~]{0,20}\\}",
    ];
    runner
        .run(&(route, method, body), |(route, method, body)| {
            rt.block_on(async {
                let r = server
                    .request(method.clone(), route, &[], Some(&body))
                    .await
                    .map_err(fail)?;
                prop_assert!(
                    r.status.as_u16() < 500 || r.status == 501,
                    "{} {} with {:?}: {} {}",
                    method,
                    route,
                    body,
                    r.status,
                    r.text()
                );
                Ok(())
            })
        })
        .unwrap();
    rt.block_on(server.stop())?;
    Ok(())
}
