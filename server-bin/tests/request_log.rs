//! The request log as an operator reads it: the real `roster` binary with
//! `--log-format json`, each stderr line parsed as JSON that must not repeat a key, and one
//! line per request with method, path, status, token name, peer and a rounded duration.

mod common;

use std::collections::BTreeSet;
use std::fmt;

use anyhow::{ensure, Context as _, Result};
use http::Method;
use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use common::process::Roster;
use common::{eventually, request_to, WAIT};

/// A JSON value that refuses an object with a key twice (serde_json keeps the last one
/// silently, which is how `jq` lost the text of a line).
struct NoDuplicateKeys;

impl<'de> Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NoDuplicateKeys)
    }
}

impl<'de> Visitor<'de> for NoDuplicateKeys {
    type Value = NoDuplicateKeys;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<NoDuplicateKeys>()?.is_some() {}
        Ok(self)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        let mut keys = BTreeSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !keys.insert(key.clone()) {
                return Err(serde::de::Error::custom(format!("duplicate key {key:?}")));
            }
            map.next_value::<NoDuplicateKeys>()?;
        }
        Ok(self)
    }
}

/// Every line of `log` as JSON, each checked for repeated keys.
fn parse_lines(log: &str) -> Result<Vec<Value>> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            serde_json::from_str::<NoDuplicateKeys>(line)
                .with_context(|| format!("not valid JSON without repeated keys: {line}"))?;
            Ok(serde_json::from_str(line)?)
        })
        .collect()
}

fn request_lines(lines: &[Value]) -> Vec<&Value> {
    lines
        .iter()
        .filter(|l| l["fields"]["message"] == "request")
        .collect()
}

#[tokio::test]
async fn json_log_has_one_valid_line_per_request_with_path_token_peer_and_rounded_duration(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("roster.toml");
    std::fs::write(
        &config,
        r#"
[server]
listen = "127.0.0.1:0"
[[server.tokens]]
name = "ops-console"
scope = "operate"
token_env = "REQUEST_LOG_TOKEN"

[[runtimes]]
name = "local"
source = "embedded"
allow_commands = true
[runtimes.profiles.shell]
command = ["/bin/sh", "-c"]

[[runtimes]]
name = "far"
source = "remote"
url = "http://127.0.0.1:9"
remote_runtime = "local"
backoff_base = "50ms"
backoff_cap = "200ms"
"#,
    )?;
    let secret = "request-log-secret-3d1f";
    let config = config.to_str().context("a UTF-8 path")?;
    let state = dir.path().join("state");
    let state = state.to_str().context("a UTF-8 path")?;
    let mut roster = Roster::spawn(
        &[
            "serve",
            "--config",
            config,
            "--state-dir",
            state,
            "--log-format",
            "json",
        ],
        &[("REQUEST_LOG_TOKEN", secret), ("RUST_LOG", "info")],
    )?;
    let addr = roster.wait_serving()?;
    let auth = format!("Bearer {secret}");
    let headers = [("authorization", auth.as_str())];

    let spawn = request_to(
        addr,
        Method::POST,
        "/v1/runtimes/local/workers",
        &headers,
        Some(r#"{"profile": "shell", "args": ["echo hi"], "name": "log-test"}"#),
    )
    .await?;
    ensure!(spawn.status == 201, "spawn: {:?}", spawn.body);
    let worker: Value = serde_json::from_slice(&spawn.body)?;
    let id = worker["id"].as_str().context("an id")?.to_string();
    let get = request_to(
        addr,
        Method::GET,
        &format!("/v1/workers/{id}"),
        &headers,
        None,
    )
    .await?;
    ensure!(get.status == 200);
    let denied = request_to(addr, Method::GET, "/v1/runtimes", &[], None).await?;
    ensure!(denied.status == 401);

    // Let the remote runtime fail a few times, so its warnings are in the log too.
    let log = eventually("three request lines and a remote warning", WAIT, || {
        // Whole lines only: the last one may still be on its way.
        let text = roster.output();
        let text = text[..text.rfind('\n').map_or(0, |i| i + 1)].to_string();
        async move {
            let Ok(lines) = parse_lines(&text) else {
                return Ok(None);
            };
            let requests = request_lines(&lines).len();
            let warned = lines
                .iter()
                .any(|l| l["level"] == "WARN" && l["fields"]["runtime"] == "far");
            Ok((requests >= 3 && warned).then_some(text))
        }
    })
    .await?;
    let lines = parse_lines(&log)?;
    ensure!(!lines.is_empty());
    for line in &lines {
        let text = line["fields"]["message"].as_str();
        ensure!(
            text.is_some_and(|t| !t.is_empty()),
            "a line without its text: {line}"
        );
    }
    ensure!(
        !log.contains(secret),
        "the token's secret is in the log:\n{log}"
    );

    let requests = request_lines(&lines);
    ensure!(
        requests.len() == 3,
        "one line per request, got {}:\n{log}",
        requests.len()
    );
    let find = |method: &str, path: &str| {
        requests
            .iter()
            .find(|l| l["fields"]["method"] == method && l["fields"]["path"] == path)
            .map(|l| &l["fields"])
            .with_context(|| format!("no request line for {method} {path}:\n{log}"))
    };
    let spawned = find("POST", "/v1/runtimes/local/workers")?;
    ensure!(spawned["status"] == 201, "{spawned}");
    ensure!(spawned["token"] == "ops-console", "{spawned}");
    let got = find("GET", &format!("/v1/workers/{id}"))?;
    ensure!(got["status"] == 200, "{got}");
    ensure!(got["route"] == "/v1/workers/{worker_id}", "{got}");
    ensure!(got["token"] == "ops-console", "{got}");
    let refused = find("GET", "/v1/runtimes")?;
    ensure!(refused["status"] == 401, "{refused}");
    ensure!(refused["token"] == "-", "{refused}");
    for fields in [spawned, got, refused] {
        let peer = fields["peer"].as_str().context("a peer")?;
        ensure!(peer.starts_with("127.0.0.1:"), "{fields}");
        ensure!(
            fields["request_id"].as_str().is_some_and(|r| !r.is_empty()),
            "{fields}"
        );
        let ms = fields["elapsed_ms"]
            .as_f64()
            .context("elapsed_ms a number")?;
        ensure!(
            ms >= 0.0 && (ms * 100.0 - (ms * 100.0).round()).abs() < 1e-6,
            "elapsed_ms is not rounded to two decimals: {ms}"
        );
        let raw = fields["elapsed_ms"].to_string();
        ensure!(
            raw.split('.').nth(1).is_none_or(|d| d.len() <= 2),
            "elapsed_ms has more than two decimals: {raw}"
        );
    }
    Ok(())
}

#[test]
fn the_line_parser_refuses_a_repeated_key() {
    let err = parse_lines(r#"{"fields":{"message":"a","message":"b"}}"#).unwrap_err();
    assert!(
        format!("{err:#}").contains("duplicate key \"message\""),
        "{err:#}"
    );
    assert!(parse_lines(r#"{"fields":{"message":"a","reason":"b"}}"#).is_ok());
}
