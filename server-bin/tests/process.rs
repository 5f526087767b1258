//! The `roster` binary as an operator runs it: signals and exit codes, no worker left behind
//! (SPEC §2), `check-config` and the config file (§8), tokens and the listen address (§7), log
//! formats, the default config, and a restart on the same state directory (§5).
//!
//! Every test starts the real binary on `127.0.0.1:0` with a state directory of its own and
//! talks to it over plain HTTP/1.1. Workers carry a marker unique to the test in their command
//! line, so the test finds them (and only them) in `/proc`.

mod common;

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::{json, Value};

use common::process::{descendants, wait_all_gone, Process, Roster, POLL};
use common::{unique, SseDecoder, SseEvent, WAIT};

// ---------------------------------------------------------------------------------------------
// The roster process

/// `roster serve --listen 127.0.0.1:0 --state-dir <state> extra…` once it serves, and a
/// client of it.
fn serve(state: &Path, extra: &[&str], env: &[(&str, &str)]) -> Result<(Roster, Http)> {
    let (roster, addr) = Roster::serve(state, extra, env)?;
    Ok((roster, Http { addr }))
}

// ---------------------------------------------------------------------------------------------
// HTTP over a plain socket

/// A client of one server.
struct Http {
    addr: SocketAddr,
}

/// A whole response.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("not JSON ({}): {}", self.status, self.text()))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn code(&self) -> String {
        self.json()
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

/// A response's status line and headers.
struct Head {
    status: u16,
    headers: HashMap<String, String>,
    /// Where the body starts in the bytes read.
    body_start: usize,
}

/// The head of a response, once it is complete in `raw`.
fn parse_head(raw: &[u8]) -> Result<Option<Head>> {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("a status line: {status_line}"))?;
    let mut headers = HashMap::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    Ok(Some(Head {
        status,
        headers,
        body_start: end + 4,
    }))
}

/// Decodes the complete chunks of a chunked body: the bytes, how much of `raw` they took,
/// and whether the last chunk was seen.
fn dechunk(raw: &[u8]) -> Result<(Vec<u8>, usize, bool)> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let Some(eol) = raw[pos..].windows(2).position(|w| w == b"\r\n") else {
            return Ok((out, pos, false));
        };
        let size_text = String::from_utf8_lossy(&raw[pos..pos + eol]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("a chunk size: {size_text:?}"))?;
        let start = pos + eol + 2;
        if size == 0 {
            // No trailers are sent: the last chunk ends with an empty line.
            let end = if raw[start..].starts_with(b"\r\n") {
                start + 2
            } else {
                start
            };
            return Ok((out, end, true));
        }
        if raw.len() < start + size + 2 {
            return Ok((out, pos, false));
        }
        out.extend_from_slice(&raw[start..start + size]);
        pos = start + size + 2;
    }
}

impl Http {
    /// Writes one request with `Connection: close`; `body` goes as JSON unless the headers
    /// name another type.
    fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Result<TcpStream> {
        let mut stream = TcpStream::connect(self.addr)?;
        stream.set_read_timeout(Some(WAIT))?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n",
            self.addr.port()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(body) = body {
            if !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            {
                req.push_str("Content-Type: application/json\r\n");
            }
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        req.push_str(body.unwrap_or(""));
        stream.write_all(req.as_bytes())?;
        Ok(stream)
    }

    /// One request, read to the end of the response.
    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Result<Reply> {
        let mut stream = self.send(method, path, headers, body)?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .with_context(|| format!("reading the answer to {method} {path}"))?;
        let Head {
            status,
            headers,
            body_start: start,
        } = parse_head(&raw)?.context("a complete response head")?;
        let body = if headers
            .get("transfer-encoding")
            .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
        {
            let (body, _, complete) = dechunk(&raw[start..])?;
            ensure!(complete, "a chunked body without its last chunk");
            body
        } else {
            raw[start..].to_vec()
        };
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    fn get(&self, path: &str) -> Result<Reply> {
        self.request("GET", path, &[], None)
    }

    /// Spawns `sh -c script` in runtime `local`; returns the worker's id.
    fn spawn_shell(&self, script: &str, headers: &[(&str, &str)]) -> Result<String> {
        let body = json!({ "profile": "shell", "args": [script] }).to_string();
        let reply = self.request("POST", "/v1/runtimes/local/workers", headers, Some(&body))?;
        ensure!(
            reply.status == 201,
            "spawn answered {}: {}",
            reply.status,
            reply.text()
        );
        Ok(reply.json()?["id"].as_str().context("an id")?.to_string())
    }

    /// Polls a worker until `check` holds.
    fn wait_worker(&self, id: &str, check: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let w = self.get(&format!("/v1/workers/{id}"))?.json()?;
            if check(&w) {
                return Ok(w);
            }
            ensure!(
                Instant::now() < deadline,
                "worker never reached the condition: {w}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// Opens an event stream; fails unless it answers `200`.
    fn sse(&self, path: &str, headers: &[(&str, &str)]) -> Result<Sse> {
        let mut stream = self.send("GET", path, headers, None)?;
        let deadline = Instant::now() + WAIT;
        let mut raw = Vec::new();
        let Head {
            status,
            headers: head,
            body_start: start,
        } = loop {
            if let Some(head) = parse_head(&raw)? {
                break head;
            }
            read_some(&mut stream, &mut raw, deadline)?.context("closed before its head")?;
        };
        ensure!(
            status == 200,
            "stream answered {status}: {}",
            String::from_utf8_lossy(&raw[start..])
        );
        ensure!(
            head.get("transfer-encoding").map(String::as_str) == Some("chunked"),
            "a stream is sent in chunks: {head:?}"
        );
        Ok(Sse {
            stream,
            raw: raw[start..].to_vec(),
            body: Vec::new(),
            decoder: SseDecoder::default(),
            ready: VecDeque::new(),
            ended: false,
        })
    }
}

/// Reads what is there into `raw`; `None` at the end of the stream. Fails at `deadline`.
fn read_some(stream: &mut TcpStream, raw: &mut Vec<u8>, deadline: Instant) -> Result<Option<()>> {
    let left = deadline.saturating_duration_since(Instant::now());
    ensure!(!left.is_zero(), "nothing more arrived in time");
    stream.set_read_timeout(Some(left))?;
    let mut buf = [0u8; 8192];
    match stream.read(&mut buf) {
        Ok(0) => Ok(None),
        Ok(n) => {
            raw.extend_from_slice(&buf[..n]);
            Ok(Some(()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(None),
        Err(e) => Err(e).context("nothing more arrived in time"),
    }
}

/// A Server-Sent-Events stream read from a socket.
struct Sse {
    stream: TcpStream,
    /// Chunked bytes not decoded yet.
    raw: Vec<u8>,
    /// Decoded bytes since the last blank line: an event not complete yet.
    body: Vec<u8>,
    decoder: SseDecoder,
    ready: VecDeque<SseEvent>,
    ended: bool,
}

impl Sse {
    /// The next event (comments and `retry:` skipped); `None` once the server closed the
    /// stream. Fails at `deadline`.
    fn next_event(&mut self, deadline: Instant) -> Result<Option<SseEvent>> {
        loop {
            if !self.ended {
                let (decoded, used, last) = dechunk(&self.raw)?;
                self.ready.extend(self.decoder.feed(&decoded)?);
                self.body.extend_from_slice(&decoded);
                if let Some(pos) = self.body.windows(2).rposition(|w| w == b"\n\n") {
                    self.body.drain(..pos + 2);
                }
                self.raw.drain(..used);
                self.ended = last;
            }
            if let Some(ev) = self.ready.pop_front() {
                return Ok(Some(ev));
            }
            if self.ended {
                ensure!(
                    self.body.is_empty(),
                    "a stream ended inside an event: {:?}",
                    String::from_utf8_lossy(&self.body)
                );
                return Ok(None);
            }
            if read_some(&mut self.stream, &mut self.raw, deadline)?.is_none() {
                bail!("the connection closed without the last chunk");
            }
        }
    }

    /// The events up to the end of the stream.
    fn rest(&mut self, within: Duration) -> Result<Vec<SseEvent>> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        while let Some(ev) = self.next_event(deadline)? {
            out.push(ev);
        }
        Ok(out)
    }

    /// The next event, which must come within [`WAIT`].
    fn next(&mut self) -> Result<SseEvent> {
        self.next_event(Instant::now() + WAIT)?
            .context("the stream ended")
    }
}

// ---------------------------------------------------------------------------------------------
// Workers in /proc

/// Three workers `sh -c 'sleep 300; : MARKER'` and one that starts a grandchild in the
/// background and waits for it; returns their ids once every process of theirs runs, and
/// every descendant of roster (the workers, the grandchild and roster's own helpers).
fn start_sleepers(
    roster: &Roster,
    http: &Http,
    marker: &str,
) -> Result<(Vec<String>, Vec<Process>)> {
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(http.spawn_shell(&format!("sleep 300; : {marker}"), &[])?);
    }
    ids.push(http.spawn_shell(
        &format!("sh -c 'sleep 300; : {marker}-grandchild' & wait; : {marker}"),
        &[],
    )?);
    // 3 + 2 shells with the marker, and the four `sleep`s under them.
    let deadline = Instant::now() + WAIT;
    loop {
        let tree = descendants(roster.pid());
        let marked = tree.iter().filter(|p| p.cmdline.contains(marker)).count();
        let sleeps = tree
            .iter()
            .filter(|p| p.cmdline.trim_end() == "sleep 300")
            .count();
        if marked == 5 && sleeps == 4 {
            return Ok((ids, tree));
        }
        ensure!(
            Instant::now() < deadline,
            "the workers did not all start: {tree:#?}"
        );
        std::thread::sleep(POLL);
    }
}

fn is_terminal(state: &str) -> bool {
    matches!(state, "exited" | "stopped" | "failed")
}

// ---------------------------------------------------------------------------------------------
// Signals

/// Sends `signal` to a `roster` with sleeping workers and an open event stream, and checks
/// a graceful stop: exit 0, no process left, each worker's end on the stream before its
/// final `shutdown`. Returns the log.
fn stops_gracefully_on(signal: i32, name: &str) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let marker = unique(name);
    let (mut roster, http) = serve(dir.path(), &[], &[])?;
    let (ids, tree) = start_sleepers(&roster, &http, &marker)?;
    let mut events = http.sse("/v1/events", &[])?;
    let first = events.next()?;
    assert_eq!(first.event, "snapshot", "{first:?}");

    roster.signal(signal)?;
    let rest = events.rest(Duration::from_secs(30))?;
    let status = roster.wait_exit_and_output(Duration::from_secs(30))?;
    assert_eq!(
        status.code(),
        Some(0),
        "{status}; stderr:\n{}",
        roster.stderr.text()
    );
    wait_all_gone(&tree, &marker, WAIT)?;
    assert_eq!(
        rest.last().map(|e| e.event.as_str()),
        Some("shutdown"),
        "{rest:#?}"
    );
    for id in &ids {
        assert!(
            rest.iter().any(|e| e.event == "worker.upserted"
                && e.data["worker"]["id"] == id.as_str()
                && is_terminal(e.data["worker"]["state"].as_str().unwrap_or_default())),
            "no terminal state of {id} in {rest:#?}"
        );
    }
    Ok(roster.stderr.text())
}

#[test]
fn sigterm_stops_every_worker_and_exits_zero() -> Result<()> {
    stops_gracefully_on(libc::SIGTERM, "marker-sigterm").map(drop)
}

#[test]
fn sigkill_of_roster_leaves_no_worker() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let marker = unique("marker-sigkill");
    let (mut roster, http) = serve(dir.path(), &[], &[])?;
    let (_, tree) = start_sleepers(&roster, &http, &marker)?;
    roster.signal(libc::SIGKILL)?;
    let status = roster.wait_exit(WAIT)?;
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    wait_all_gone(&tree, &marker, WAIT)
}

#[test]
fn sigint_also_shuts_down_gracefully() -> Result<()> {
    let log = stops_gracefully_on(libc::SIGINT, "marker-sigint")?;
    assert!(log.contains("SIGINT") && log.contains("shut down"), "{log}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// check-config and the command line

/// `roster check-config <text>`: the status, stdout and stderr. Runs in a directory of its
/// own, so a default state directory could not land in the repository.
fn check_config(text: &str, env: &[(&str, &str)]) -> Result<(ExitStatus, String, String)> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("roster.toml");
    std::fs::write(&file, text)?;
    let roster = Roster::spawn_in(Some(dir.path()), &["check-config", "roster.toml"], env)?;
    let out = roster.finish(WAIT)?;
    // Checking writes nothing, not even a default state directory (`./.roster`).
    assert_eq!(
        std::fs::read_dir(dir.path())?.count(),
        1,
        "check-config wrote into its directory"
    );
    Ok(out)
}

/// The config must be refused, with each of `needles` in the message on stderr.
fn assert_refused(text: &str, env: &[(&str, &str)], needles: &[&str]) -> Result<()> {
    let (status, stdout, stderr) = check_config(text, env)?;
    assert!(!status.success(), "accepted: {stdout}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    }
    Ok(())
}

#[test]
fn check_config_accepts_a_valid_file_and_says_so() -> Result<()> {
    let (status, stdout, stderr) = check_config(
        r#"[server]
listen = "127.0.0.1:7411"
shutdown_grace = "5s"

[[runtimes]]
name = "local"
source = "embedded"
max_workers = 8
allow_commands = true
[runtimes.profiles.shell]
command = ["/bin/sh", "-c"]
"#,
        &[],
    )?;
    assert!(status.success(), "{status}: {stderr}");
    assert!(
        stdout.contains("valid") && stdout.contains("local"),
        "{stdout}"
    );
    Ok(())
}

#[test]
fn check_config_accepts_a_non_loopback_listen_with_a_token() -> Result<()> {
    let var = format!("ROSTER_TEST_TOKEN_{}", std::process::id());
    let (status, stdout, stderr) = check_config(
        &format!(
            "[server]\nlisten = \"0.0.0.0:7411\"\n[[server.tokens]]\nname = \"ops\"\n\
             scope = \"operate\"\ntoken_env = \"{var}\"\n"
        ),
        &[(&var, "a-long-enough-secret-0123456789")],
    )?;
    assert!(status.success(), "{status}: {stderr}");
    assert!(stdout.contains("1 token"), "{stdout}");
    assert!(!stdout.contains("a-long-enough-secret"), "{stdout}");
    Ok(())
}

#[test]
fn check_config_builds_a_remote_runtime_and_ends_without_reaching_it() -> Result<()> {
    // Port 9 (discard) on loopback: nothing answers there, and check-config must not wait.
    let (status, stdout, stderr) = check_config(
        "[[runtimes]]\nname = \"far\"\nsource = \"remote\"\n\
         url = \"http://127.0.0.1:9\"\nremote_runtime = \"local\"\n",
        &[],
    )?;
    assert!(status.success(), "{status}: {stderr}");
    assert!(stdout.contains("far"), "{stdout}");
    assert_refused(
        "[[runtimes]]\nname = \"far\"\nsource = \"remote\"\n\
         url = \"http://127.0.0.1:9\"\nremote_runtime = \"local\"\n\
         token_env = \"ROSTER_TEST_UNSET_REMOTE_TOKEN\"\n",
        &[],
        &["far", "ROSTER_TEST_UNSET_REMOTE_TOKEN", "token_env"],
    )?;
    assert_refused(
        "[[runtimes]]\nname = \"far\"\nsource = \"remote\"\n\
         url = \"https://127.0.0.1:9\"\nremote_runtime = \"local\"\n",
        &[],
        &["far", "https", "line 4"],
    )
}

#[test]
fn check_config_names_an_unknown_key_and_its_line() -> Result<()> {
    assert_refused(
        "[server]\nlisten = \"127.0.0.1:7411\"\nbogus_key = 1\n",
        &[],
        &["bogus_key", "line 3"],
    )
}

#[test]
fn check_config_names_a_bad_runtime_key_and_its_line() -> Result<()> {
    assert_refused(
        "[[runtimes]]\nname = \"local\"\nsource = \"embedded\"\n\nnot_a_key = true\n",
        &[],
        &["not_a_key", "line 5", "local"],
    )
}

#[test]
fn check_config_refuses_an_unknown_source_kind() -> Result<()> {
    assert_refused(
        "[[runtimes]]\nname = \"local\"\nsource = \"no-such-kind\"\n",
        &[],
        &["no-such-kind", "line 3", "embedded"],
    )
}

#[test]
fn check_config_refuses_a_non_loopback_listen_without_tokens() -> Result<()> {
    assert_refused(
        "[server]\nlisten = \"0.0.0.0:7411\"\n",
        &[],
        &["0.0.0.0:7411", "without tokens", "[[server.tokens]]"],
    )
}

#[test]
fn check_config_refuses_a_token_whose_env_var_is_unset() -> Result<()> {
    let var = format!("ROSTER_TEST_UNSET_{}", std::process::id());
    assert_refused(
        &format!("[[server.tokens]]\nname = \"ops\"\nscope = \"operate\"\ntoken_env = \"{var}\"\n"),
        &[],
        &[&var, "\"ops\"", "not set"],
    )
}

#[test]
fn check_config_refuses_a_file_that_is_not_there() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("missing.toml");
    let roster = Roster::spawn(&["check-config", missing.to_str().context("UTF-8")?], &[])?;
    let (status, _, stderr) = roster.finish(WAIT)?;
    assert!(!status.success());
    assert!(stderr.contains("cannot read"), "{stderr}");
    Ok(())
}

#[test]
fn an_unknown_flag_is_refused() -> Result<()> {
    for args in [
        &["serve", "--no-such-flag"][..],
        &["check-config", "--no-such-flag", "x.toml"][..],
        &["--no-such-flag"][..],
    ] {
        let roster = Roster::spawn(args, &[])?;
        let (status, _, stderr) = roster.finish(WAIT)?;
        assert!(!status.success(), "{args:?} was accepted");
        assert!(stderr.contains("--no-such-flag"), "{args:?}: {stderr}");
    }
    Ok(())
}

#[test]
fn serve_refuses_a_non_loopback_listen_without_tokens() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    let roster = Roster::spawn(
        &[
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--state-dir",
            state.to_str().context("UTF-8")?,
        ],
        &[],
    )?;
    let (status, _, stderr) = roster.finish(WAIT)?;
    assert!(!status.success(), "served: {stderr}");
    assert!(!stderr.contains("roster is serving"), "{stderr}");
    for needle in [
        "refusing",
        "without tokens",
        "[[server.tokens]]",
        "127.0.0.1",
    ] {
        assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tokens from the config file

#[test]
fn tokens_from_env_and_file_guard_the_api_and_are_never_logged() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let u = unique("t").replace('-', "_");
    let var = format!("ROSTER_TEST_TOKEN_{u}");
    let operate = format!("operate-secret-{u}-0123456789");
    let read = format!("read-secret-{u}-0123456789");
    let token_file = dir.path().join("read.token");
    std::fs::write(&token_file, format!("{read}\n"))?;
    let config = dir.path().join("roster.toml");
    std::fs::write(
        &config,
        format!(
            r#"[server]
[[server.tokens]]
name = "ops"
scope = "operate"
token_env = "{var}"
[[server.tokens]]
name = "viewer"
scope = "read"
token_file = {file}
"#,
            file = serde_json::to_string(token_file.to_str().context("UTF-8")?)?
        ),
    )?;
    let config = config.to_str().context("UTF-8")?;
    let env = [(var.as_str(), operate.as_str()), ("RUST_LOG", "debug")];
    let env_trace = [(var.as_str(), operate.as_str()), ("RUST_LOG", "trace")];
    let read_auth = format!("Bearer {read}");
    let operate_auth = format!("Bearer {operate}");
    let spawn_body = json!({ "profile": "shell", "args": ["echo token-ok"] }).to_string();

    let (mut roster, http) = serve(&dir.path().join("state"), &["--config", config], &env)?;
    let none = http.get("/v1/runtimes")?;
    assert_eq!((none.status, none.code().as_str()), (401, "unauthorized"));
    let wrong = http.request(
        "GET",
        "/v1/runtimes",
        &[("Authorization", "Bearer not-a-token-0123456789")],
        None,
    )?;
    assert_eq!(wrong.status, 401, "{}", wrong.text());
    let ok = http.request(
        "GET",
        "/v1/runtimes",
        &[("Authorization", &read_auth)],
        None,
    )?;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let mut events = http.sse("/v1/events", &[("Authorization", &read_auth)])?;
    assert_eq!(events.next()?.event, "snapshot");
    drop(events);
    let forbidden = http.request(
        "POST",
        "/v1/runtimes/local/workers",
        &[("Authorization", &read_auth)],
        Some(&spawn_body),
    )?;
    assert_eq!(
        (forbidden.status, forbidden.code().as_str()),
        (403, "forbidden"),
        "{}",
        forbidden.text()
    );
    let created = http.request(
        "POST",
        "/v1/runtimes/local/workers",
        &[("Authorization", &operate_auth)],
        Some(&spawn_body),
    )?;
    assert_eq!(created.status, 201, "{}", created.text());
    for reply in [&none, &wrong, &ok, &forbidden, &created] {
        assert!(!reply.text().contains(&read) && !reply.text().contains(&operate));
    }
    assert_eq!(roster.terminate()?.code(), Some(0));

    // With tokens, a wildcard address is accepted.
    let mut wild = Roster::spawn(
        &[
            "serve",
            "--config",
            config,
            "--listen",
            "0.0.0.0:0",
            "--state-dir",
            dir.path().join("state").to_str().context("UTF-8")?,
        ],
        &env_trace,
    )?;
    let http = Http {
        addr: wild.wait_serving()?,
    };
    let ok = http.request(
        "GET",
        "/v1/runtimes",
        &[("Authorization", &read_auth)],
        None,
    )?;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(http.get("/v1/runtimes")?.status, 401);
    assert_eq!(wild.terminate()?.code(), Some(0));

    for log in [roster.stderr.bytes(), wild.stderr.bytes()] {
        let text = String::from_utf8_lossy(&log);
        for secret in [&read, &operate] {
            assert!(
                !text.contains(secret.as_str()),
                "a token in the log:\n{text}"
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Logs

#[test]
fn json_logs_are_one_object_per_line_with_the_request_id_of_the_response() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut roster, http) = serve(dir.path(), &["--log-format", "json"], &[])?;
    let client_id = unique("client-request");
    let replies = [
        http.get("/healthz")?,
        http.request("GET", "/v1/runtimes", &[("x-request-id", &client_id)], None)?,
        http.get("/no/such/route")?,
        http.request("POST", "/v1/runtimes/local/workers", &[], Some("{"))?,
    ];
    assert_eq!(roster.terminate()?.code(), Some(0));
    let log = roster.stderr.text();

    let mut lines = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("not a JSON line: {line}"))?;
        ensure!(v.is_object(), "not an object: {line}");
        lines.push(v);
    }
    ensure!(!lines.is_empty(), "no log lines");
    let field = |v: &Value, k: &str| -> Value {
        v.get("fields")
            .and_then(|f| f.get(k))
            .or_else(|| v.get(k))
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(
        replies[1].headers.get("x-request-id").map(String::as_str),
        Some(client_id.as_str()),
        "a client's plain request id is kept"
    );
    for reply in &replies {
        let id = reply
            .headers
            .get("x-request-id")
            .context("every response has x-request-id")?;
        let logged: Vec<&Value> = lines
            .iter()
            .filter(|l| field(l, "request_id") == id.as_str())
            .collect();
        assert_eq!(logged.len(), 1, "{id}: {logged:#?}\n{log}");
        assert_eq!(field(logged[0], "message"), "request", "{:?}", logged[0]);
        assert_eq!(field(logged[0], "status"), reply.status, "{:?}", logged[0]);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The default config and restarts

#[test]
fn with_no_config_the_default_runtime_is_embedded_local_with_shell_profile() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut roster, http) = serve(dir.path(), &[], &[])?;
    let runtimes = http.get("/v1/runtimes")?.json()?;
    let list = runtimes["runtimes"].as_array().context("a list")?;
    assert_eq!(list.len(), 1, "{runtimes}");
    assert_eq!(list[0]["id"], "local");
    assert_eq!(list[0]["kind"], "embedded");

    let by_profile = http.spawn_shell("echo from-shell", &[])?;
    let body = json!({ "command": ["/bin/echo", "x"] }).to_string();
    let reply = http.request("POST", "/v1/runtimes/local/workers", &[], Some(&body))?;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let by_command = reply.json()?["id"].as_str().context("an id")?.to_string();

    for (id, expected) in [(by_profile, "from-shell\n"), (by_command, "x\n")] {
        let w = http.wait_worker(&id, |w| w["state"] == "exited")?;
        assert_eq!(w["exit_code"], 0, "{w}");
        let mut out = http.sse(&format!("/v1/workers/{id}/output?follow=0"), &[])?;
        let text: String = out
            .rest(WAIT)?
            .iter()
            .filter(|e| e.event == "output")
            .map(|e| e.data["data"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(text, expected);
    }
    assert_eq!(roster.terminate()?.code(), Some(0));
    Ok(())
}

#[test]
fn a_restart_keeps_the_id_key_and_resets_an_old_cursor_as_foreign_epoch() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut first, http) = serve(dir.path(), &[], &[])?;
    let mut events = http.sse("/v1/events", &[])?;
    let snapshot = events.next()?;
    assert_eq!(snapshot.event, "snapshot");
    let id = http.spawn_shell("echo before-restart", &[])?;
    let cursor = loop {
        let ev = events.next()?;
        if ev.event == "worker.upserted" && ev.data["worker"]["id"] == id.as_str() {
            break ev.id.context("an event id")?;
        }
    };
    drop(events);
    assert_eq!(first.terminate()?.code(), Some(0));
    // The id key stays, private to its owner: worker ids are stable across restarts.
    let key_file = dir.path().join(registry_core::KEY_FILE);
    let key = std::fs::read(&key_file).context("the id key")?;
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key_file)?.permissions());
    assert_eq!(
        mode & 0o077,
        0,
        "the id key is readable by others: {mode:o}"
    );

    let (mut second, http) = serve(dir.path(), &[], &[])?;
    let by_header = http.sse("/v1/events", &[("Last-Event-ID", &cursor)])?;
    let by_query = http.sse(
        &format!(
            "/v1/events?cursor={}",
            form_urlencoded::byte_serialize(cursor.as_bytes()).collect::<String>()
        ),
        &[],
    )?;
    for mut stream in [by_header, by_query] {
        let reset = stream.next()?;
        assert_eq!(reset.event, "reset", "{reset:?}");
        assert_eq!(reset.data["reason"], "foreign_epoch", "{reset:?}");
        let snapshot = stream.next()?;
        assert_eq!(snapshot.event, "snapshot", "{snapshot:?}");
        assert_ne!(snapshot.id.as_deref(), Some(cursor.as_str()));
    }
    assert_eq!(second.terminate()?.code(), Some(0));
    assert_eq!(
        std::fs::read(&key_file)?,
        key,
        "the id key changed on restart"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Host and Origin

/// A request names one server and comes from one origin: with a second `Host` or `Origin`
/// line it is refused, not judged by its first line alone (RFC 9112 §3.2: more than one
/// `Host` is a `400`).
#[test]

fn a_second_host_or_origin_line_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut roster, http) = serve(dir.path(), &[], &[])?;
    let port = http.addr.port();
    // `send` writes `Host: 127.0.0.1:PORT` first; these come after it.
    let two_hosts = http.request("GET", "/v1/runtimes", &[("Host", "evil.example")], None)?;
    let same = format!("http://127.0.0.1:{port}");
    let body = json!({ "profile": "shell", "args": ["echo from-evil"] }).to_string();
    let two_origins = http.request(
        "POST",
        "/v1/runtimes/local/workers",
        &[("Origin", &same), ("Origin", "http://evil.example")],
        Some(&body),
    )?;
    assert_eq!(roster.terminate()?.code(), Some(0));
    assert!(
        [400, 403].contains(&two_hosts.status),
        "two Host lines: {} {}",
        two_hosts.status,
        two_hosts.text()
    );
    assert!(
        [400, 403].contains(&two_origins.status),
        "two Origin lines: {} {}",
        two_origins.status,
        two_origins.text()
    );
    Ok(())
}
