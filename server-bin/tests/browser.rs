//! The web console in a real browser: headless Chromium, driven over the DevTools protocol,
//! loads `/` through a loopback relay; the page fills its health strip and worker table from
//! `/v1/events` live, filters it, starts a worker from the spawn form (a same-origin `POST`
//! with the browser's own `Origin`), streams its output with colours and times, sends it
//! input, pauses, stops and removes it behind a confirmation, opens a worker from its link,
//! shows a gap and bounds its memory; then the relay cuts the page off (it resumes with
//! `Last-Event-ID`), and roster restarts behind it on the same state with a token (the page
//! asks for it, then resets to the new run's snapshot).
//!
//! It takes screenshots on the way; with `ROSTER_SCREENSHOTS=1` they are written to
//! `docs/img/console-*.png`, the pictures the README shows.
//!
//! `tokio-tungstenite` (a dev-dependency) is here because the DevTools protocol is JSON over
//! a websocket.
//!
//! Needs `chromium` on the PATH (CI installs it). Without it the test says so and passes,
//! unless `ROSTER_REQUIRE_BROWSER=1` is set — as CI does — when a missing browser fails it.
mod common;

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use common::{TestServer, WAIT};
use futures_util::{SinkExt as _, StreamExt as _};
use http::StatusCode;
use serde_json::{json, Value};
use server_bin::config::{LoadedToken, Scope};
use server_bin::{Config, ServeOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How often a condition on the page is checked again.
const POLL: Duration = Duration::from_millis(100);

/// `chromium` from the PATH, if it is there and executable.
fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("chromium"))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// A headless Chromium with its own profile directory. Dropping it kills its whole process
/// group with SIGKILL and reaps it.
struct Browser {
    child: Child,
    /// The `ws://…/devtools/browser/…` address of the browser's DevTools endpoint.
    ws_url: String,
    /// Removed after the browser is gone (fields drop after [`Drop::drop`]).
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn launch(program: &Path) -> Result<Browser> {
        let profile = tempfile::tempdir()?;
        let mut child = Command::new(program)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(["--remote-debugging-port=0", "about:blank"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group, so that the renderers go down with it.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let stderr = child.stderr.take().context("the browser's stderr")?;
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<String, String>>();
        // Reads stderr to its end, so that the browser never blocks on a full pipe; the
        // DevTools address goes back as soon as it shows up.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            let mut seen = Vec::new();
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(Ok(url.trim().to_string()));
                    }
                } else if tx.is_some() && seen.len() < 50 {
                    seen.push(line);
                }
            }
            if let Some(tx) = tx.take() {
                let _ = tx.send(Err(seen.join("\n")));
            }
        });
        let mut browser = Browser {
            child,
            ws_url: String::new(),
            _profile: profile,
        };
        browser.ws_url = match tokio::time::timeout(WAIT, rx).await {
            Err(_) => bail!("the browser did not announce its DevTools address within {WAIT:?}"),
            Ok(Err(_)) => bail!("the browser's stderr reader went away"),
            Ok(Ok(Err(stderr))) => {
                bail!("the browser exited without a DevTools address:\n{stderr}")
            }
            Ok(Ok(Ok(url))) => url,
        };
        Ok(browser)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: a plain syscall on the process group this test created for the browser.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One page of the browser, attached over a flat DevTools session.
struct Page {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    session: Option<String>,
    /// Exceptions and console messages of the page, for failure reports.
    log: Vec<String>,
}

impl Page {
    /// Opens a new tab in the browser and attaches to it.
    async fn open(browser: &Browser) -> Result<Page> {
        let (ws, _) = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::connect_async(browser.ws_url.as_str()),
        )
        .await
        .context("connecting to DevTools timed out")?
        .context("connecting to DevTools")?;
        let mut page = Page {
            ws,
            next_id: 0,
            session: None,
            log: Vec::new(),
        };
        let target = page
            .call("Target.createTarget", json!({ "url": "about:blank" }))
            .await?;
        let target_id = target["targetId"].as_str().context("a targetId")?;
        let attached = page
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
            )
            .await?;
        page.session = Some(
            attached["sessionId"]
                .as_str()
                .context("a sessionId")?
                .to_string(),
        );
        page.call("Runtime.enable", json!({})).await?;
        page.call("Page.enable", json!({})).await?;
        Ok(page)
    }

    /// One DevTools command (in the page's session once attached) and its result.
    async fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = &self.session {
            msg["sessionId"] = json!(session);
        }
        let deadline = Instant::now() + WAIT;
        tokio::time::timeout_at(deadline, self.ws.send(Message::text(msg.to_string())))
            .await
            .with_context(|| format!("sending {method} timed out"))?
            .with_context(|| format!("sending {method}"))?;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .with_context(|| format!("no answer to {method} within {WAIT:?}"))?;
            let text = match frame {
                None => bail!("DevTools closed the connection during {method}"),
                Some(Err(e)) => bail!("DevTools connection failed during {method}: {e}"),
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Close(frame))) => {
                    bail!("DevTools closed the connection during {method}: {frame:?}")
                }
                Some(Ok(_)) => continue,
            };
            let reply: Value = serde_json::from_str(text.as_str())
                .with_context(|| format!("DevTools sent something other than JSON: {text}"))?;
            if reply["id"] == id {
                if let Some(error) = reply.get("error") {
                    bail!("{method} failed: {error}");
                }
                return Ok(reply["result"].clone());
            }
            self.note_event(&reply);
        }
    }

    /// Keeps what the page reported on its own: uncaught exceptions and console output.
    fn note_event(&mut self, event: &Value) {
        let params = &event["params"];
        match event["method"].as_str() {
            Some("Runtime.exceptionThrown") => {
                let details = &params["exceptionDetails"];
                let text = details["exception"]["description"]
                    .as_str()
                    .or(details["text"].as_str())
                    .unwrap_or("?");
                self.log.push(format!("exception: {text}"));
            }
            Some("Runtime.consoleAPICalled") => {
                let args: Vec<String> = params["args"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| match &a["value"] {
                        Value::Null => a["description"].as_str().unwrap_or("?").to_string(),
                        Value::String(s) => s.clone(),
                        v => v.to_string(),
                    })
                    .collect();
                self.log
                    .push(format!("console.{}: {}", params["type"], args.join(" ")));
            }
            _ => {}
        }
    }

    /// The value of a JavaScript expression in the page (promises are awaited).
    async fn eval(&mut self, expr: &str) -> Result<Value> {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(details) = result.get("exceptionDetails") {
            let text = details["exception"]["description"]
                .as_str()
                .or(details["text"].as_str())
                .unwrap_or("?");
            bail!("`{expr}` threw: {text}");
        }
        Ok(result["result"]["value"].clone())
    }

    /// Polls `expr` every [`POLL`] until it is `true`; fails at `deadline` with what the page
    /// showed then.
    async fn wait_for(&mut self, expr: &str, deadline: Instant) -> Result<()> {
        loop {
            // An evaluation may fail while a navigation replaces the document: try again.
            let last = match self.eval(expr).await {
                Ok(Value::Bool(true)) => return Ok(()),
                Ok(v) => v.to_string(),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                let state = match self.eval(SNAPSHOT).await {
                    Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
                    Err(e) => format!("(no snapshot: {e:#})"),
                };
                bail!(
                    "the page never satisfied `{expr}` (last: {last})\npage: {state}\nlog:\n{}",
                    self.log.join("\n")
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// [`Self::wait_for`] with [`WAIT`] from now.
    async fn wait(&mut self, expr: &str) -> Result<()> {
        self.wait_for(expr, Instant::now() + WAIT).await
    }

    /// Evaluates an expression that must be `true` (an action that found what it acts on).
    async fn must(&mut self, expr: &str) -> Result<()> {
        let v = self.eval(expr).await?;
        ensure!(v == Value::Bool(true), "`{expr}` gave {v}, not true");
        Ok(())
    }
}

/// What the console shows, for failure reports.
const SNAPSHOT: &str = r#"(() => {
  const t = (id) => { const e = document.getElementById(id); return e ? e.textContent : null; };
  const out = t("out");
  return {
    url: location.href, conn: t("conn"), conn_note: t("conn-note"), runtimes: t("runtimes"),
    workers: t("workers"), pane_hidden: document.getElementById("pane").hidden,
    title: t("p-title"), state: t("p-state"), p_msg: t("p-msg"), sp_msg: t("sp-msg"),
    out: out === null ? null : out.slice(-2000),
  };
})()"#;

/// A JavaScript string literal for `s`.
fn js(s: &str) -> String {
    Value::from(s).to_string()
}

/// An expression for the worker table's row of worker `id` (or `null`).
fn row(id: &str) -> String {
    format!("document.querySelector('#workers tr[data-id={}]')", js(id))
}

/// An expression for the text of the cell of class `cell` in worker `id`'s row (or
/// `undefined`).
fn cell(id: &str, cell: &str) -> String {
    format!("({})?.querySelector('.{cell}')?.textContent", row(id))
}

/// An expression that clicks the element `selector` if it is there and enabled.
fn click(selector: &str) -> String {
    format!(
        "(() => {{ const e = document.querySelector({}); if (!e || e.disabled) return false; \
         e.click(); return true; }})()",
        js(selector)
    )
}

/// An expression that sets the value of form fields (`[(id, value)]`) as a person would.
fn fill(fields: &[(&str, &str)]) -> String {
    let sets: Vec<String> = fields
        .iter()
        .map(|(id, v)| {
            format!(
                "{{ const e = document.getElementById({}); e.value = {}; \
                 e.dispatchEvent(new Event('input', {{bubbles: true}})); \
                 e.dispatchEvent(new Event('change', {{bubbles: true}})); }}",
                js(id),
                js(v)
            )
        })
        .collect();
    format!("(() => {{ {} return true; }})()", sets.join(" "))
}

/// The text of the connection indicator is `text` (and, with `note`, its note holds it).
fn conn_is(text: &str, note: &str) -> String {
    format!(
        "document.getElementById('conn').textContent === {} \
         && document.getElementById('conn-note').textContent.includes({})",
        js(text),
        js(note)
    )
}

/// Decodes standard base64 (what `Page.captureScreenshot` returns).
fn base64_decode(text: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in text.bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b'\n' | b'\r' => continue,
            _ => bail!("not base64: byte {b}"),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

impl Page {
    /// A PNG of the page as it is now. With `ROSTER_SCREENSHOTS=1` it is also written to
    /// `docs/img/console-{name}.png`, the pictures the README shows.
    async fn screenshot(&mut self, name: &str) -> Result<()> {
        let shot = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await?;
        let png = base64_decode(shot["data"].as_str().context("screenshot data")?)?;
        ensure!(
            png.len() > 1000 && png.starts_with(b"\x89PNG\r\n\x1a\n"),
            "the screenshot {name} is not a PNG ({} bytes)",
            png.len()
        );
        if std::env::var("ROSTER_SCREENSHOTS").as_deref() == Ok("1") {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/img");
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join(format!("console-{name}.png")), &png)?;
        }
        Ok(())
    }
}

/// A TCP relay on loopback between the browser and a server: the page's origin stays the
/// same while the server behind it is cut off, restarted or replaced.
struct Relay {
    addr: SocketAddr,
    upstream: Arc<Mutex<Option<SocketAddr>>>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
    accept: JoinHandle<()>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let up = Arc::new(Mutex::new(Some(upstream)));
        let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (up2, conns2) = (up.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                // Refusing: the connection is closed at once, as a stopped server's would be.
                let Some(target) = *up2.lock().unwrap_or_else(|e| e.into_inner()) else {
                    drop(client);
                    continue;
                };
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                let mut conns = conns2.lock().unwrap_or_else(|e| e.into_inner());
                conns.retain(|c| !c.is_finished());
                conns.push(task.abort_handle());
            }
        });
        Ok(Relay {
            addr,
            upstream: up,
            conns,
            accept,
        })
    }

    /// Closes every relayed connection and refuses new ones.
    fn cut(&self) {
        *self.upstream.lock().unwrap_or_else(|e| e.into_inner()) = None;
        for c in self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            c.abort();
        }
    }

    /// Relays new connections to `upstream`.
    fn restore(&self, upstream: SocketAddr) {
        *self.upstream.lock().unwrap_or_else(|e| e.into_inner()) = Some(upstream);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// Three runtimes: `local` (commands allowed), `batch` (keeps only 256 bytes of output per
/// worker), and `gpu-box`, a remote roster that does not answer (nothing listens at its
/// loopback port).
fn console_config(dead_port: u16) -> Result<Config> {
    Ok(Config::parse(&format!(
        r#"
[[runtimes]]
name = "local"
source = "embedded"
allow_commands = true
[runtimes.profiles.shell]
command = ["/bin/sh", "-c"]
description = "a shell script, as the one argument"
show_command = true
[runtimes.profiles.nightly]
command = ["/bin/sh", "-c"]
restart = "on-failure"

[[runtimes]]
name = "batch"
source = "embedded"
output_retention = 256
[runtimes.profiles.shell]
command = ["/bin/sh", "-c"]

[[runtimes]]
name = "gpu-box"
source = "remote"
url = "http://127.0.0.1:{dead_port}"
remote_runtime = "local"
"#
    ))?)
}

/// A port nothing listens on (it was free a moment ago).
fn dead_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Spawns in `runtime` and returns the worker's id.
async fn spawn(server: &TestServer, runtime: &str, body: Value) -> Result<String> {
    server
        .post(
            &format!("/v1/runtimes/{runtime}/workers"),
            &body.to_string(),
        )
        .await?
        .created_id()
}

/// Polls until `GET path` answers `status`.
async fn wait_status(server: &TestServer, path: &str, status: StatusCode) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let resp = server.get(path).await?;
        if resp.status == status {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{path} never answered {status}: {} {}",
            resp.status,
            resp.text()
        );
        tokio::time::sleep(POLL).await;
    }
}

/// What the first worker the form starts runs: a coloured greeting, a line on stderr, then
/// every line of stdin echoed back.
const ECHO_SCRIPT: &str = r"printf '\033[31mred\033[0m and \033[1;32mbold green\033[0m\n'; echo hello-from-worker; echo to-stderr >&2; while read line; do echo got:$line; done";

/// A worker that keeps running and writing: a coloured tick a second.
const TICKER: &str = r"i=0; while :; do i=$((i+1)); printf '\033[32m✓\033[0m request %s served in \033[33m%sms\033[0m\n' $i $((i % 7 + 3)); sleep 1; done";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_drives_workers_through_the_browser() -> Result<()> {
    let Some(program) = chromium() else {
        if std::env::var("ROSTER_REQUIRE_BROWSER").as_deref() == Ok("1") {
            bail!("ROSTER_REQUIRE_BROWSER=1 but there is no chromium on the PATH");
        }
        eprintln!("no chromium on the PATH: the console's browser test did not run");
        return Ok(());
    };
    let started = std::time::Instant::now();
    let config = console_config(dead_port()?)?;
    let server = TestServer::start_in(
        tempfile::tempdir()?,
        config.clone(),
        ServeOptions::default(),
    )
    .await?;
    let relay = Relay::start(server.addr).await?;
    let browser = Browser::launch(&program).await?;
    let mut page = Page::open(&browser).await?;
    page.call(
        "Emulation.setDeviceMetricsOverride",
        json!({ "width": 1400, "height": 900, "deviceScaleFactor": 1, "mobile": false }),
    )
    .await?;
    eprintln!("browser ready after {:?}", started.elapsed());

    // The console loads, its event stream connects, and the health strip shows every
    // runtime: the remote one that does not answer as unavailable.
    let url = format!("http://127.0.0.1:{}/", relay.addr.port());
    let nav = page.call("Page.navigate", json!({ "url": url })).await?;
    if let Some(error) = nav.get("errorText") {
        bail!("loading {url} failed: {error}");
    }
    page.wait(&conn_is("live", "")).await?;
    page.wait(
        "(() => { const h = (r) => document.querySelector(`.rt[data-runtime=\"${r}\"] .rt-health .st`)?.textContent; \
         return h('local') === 'ready' && h('batch') === 'ready' && h('gpu-box') === 'unavailable'; })()",
    )
    .await?;

    // Workers started through the API show up live: state, exit codes told apart, the
    // failure cause, start time and uptime.
    let ticker = spawn(
        &server,
        "local",
        json!({"profile": "shell", "args": [TICKER], "name": "web-1", "labels": {"team": "web"}}),
    )
    .await?;
    let migrate = spawn(
        &server,
        "batch",
        json!({"profile": "shell", "name": "migrate-db", "labels": {"team": "data"},
               "args": ["echo migrating; echo 'error: table locked' >&2; exit 3"]}),
    )
    .await?;
    let ok_job = spawn(
        &server,
        "local",
        json!({"profile": "shell", "args": ["echo done"], "name": "nightly-report", "labels": {"team": "data"}}),
    )
    .await?;
    let typo = spawn(
        &server,
        "local",
        json!({"command": ["/nonexistent/tool"], "name": "typo"}),
    )
    .await?;
    page.wait(&format!(
        "{} === 'running' && {}?.startsWith('exited') && {}?.startsWith('exited') && {}?.startsWith('failed')",
        cell(&ticker, "c-state"),
        cell(&migrate, "c-state"),
        cell(&ok_job, "c-state"),
        cell(&typo, "c-state"),
    ))
    .await?;
    page.must(&format!(
        "(() => {{ const bad = ({m})?.querySelector('.exit'), good = ({o})?.querySelector('.exit'); \
         return bad.textContent === 'exit 3' && bad.classList.contains('exit-bad') \
           && good.textContent === 'exit 0' && good.classList.contains('exit-ok') \
           && getComputedStyle(bad).backgroundColor !== getComputedStyle(good).backgroundColor; }})()",
        m = row(&migrate),
        o = row(&ok_job),
    ))
    .await?;
    page.wait(&format!(
        "{}?.includes('spawn failed') && /^\\d\\d:\\d\\d:\\d\\d$/.test({}) && /^\\d+s$/.test({})",
        cell(&typo, "c-state"),
        cell(&ticker, "c-started"),
        cell(&ticker, "c-uptime"),
    ))
    .await?;

    // Filters: by state, runtime, label and text.
    let shown =
        "[...document.querySelectorAll('#workers tr')].map((tr) => tr.dataset.id).sort().join(',')";
    let only = |ids: &[&str]| {
        let mut ids: Vec<&str> = ids.to_vec();
        ids.sort_unstable();
        format!("{shown} === {}", js(&ids.join(",")))
    };
    page.must(&fill(&[("f-state", "problem")])).await?;
    page.wait(&only(&[&migrate, &typo])).await?;
    page.must(&fill(&[("f-state", ""), ("f-runtime", "batch")]))
        .await?;
    page.wait(&only(&[&migrate])).await?;
    page.must(&fill(&[("f-runtime", ""), ("f-label", "team=data")]))
        .await?;
    page.wait(&only(&[&migrate, &ok_job])).await?;
    page.must(&fill(&[("f-label", ""), ("f-text", "nightly")]))
        .await?;
    page.wait(&only(&[&ok_job])).await?;
    page.must(&fill(&[("f-text", "")])).await?;
    page.wait(&only(&[&ticker, &migrate, &ok_job, &typo]))
        .await?;
    page.screenshot("overview").await?;

    // The spawn form offers the profiles the runtime lists, and says what the chosen one
    // does; a runtime whose list can't be had says why. The same-origin POST with the
    // browser's Origin is let through.
    page.must(&click("#spawn-open")).await?;
    page.must(&fill(&[("sp-runtime", "gpu-box")])).await?;
    page.wait(
        "document.getElementById('sp-profile-hint').textContent\
         .startsWith('could not list the runtime\\'s profiles: ')",
    )
    .await?;
    page.must(&fill(&[("sp-runtime", "local")])).await?;
    page.wait(
        "[...document.getElementById('sp-runtime').options].some((o) => o.value === 'local' && !o.disabled) \
         && [...document.getElementById('sp-profile').options].map((o) => o.value).join(',') === 'nightly,shell,'",
    )
    .await?;
    page.must(&fill(&[("sp-profile", "nightly")])).await?;
    page.wait("document.getElementById('sp-profile-hint').textContent.includes('Restarts on failure, at most 10 times in 10 min.')")
        .await?;
    page.must(&fill(&[("sp-profile", "shell")])).await?;
    page.wait(
        "document.getElementById('sp-profile-hint').textContent\
         .startsWith('a shell script, as the one argument. Arguments are appended to: /bin/sh -c.')",
    )
    .await?;
    page.screenshot("spawn-form").await?;
    page.must(&fill(&[
        ("sp-runtime", "local"),
        ("sp-profile", "shell"),
        ("sp-args", ECHO_SCRIPT),
        ("sp-name", "echo-worker"),
        ("sp-labels", "team=browser"),
        ("sp-stdin", "first"),
    ]))
    .await?;
    page.must(&click("#sp-form button[type=submit]")).await?;
    page.wait("document.getElementById('sp-msg').textContent.startsWith('started w_')")
        .await?;
    let msg = page
        .eval("document.getElementById('sp-msg').textContent")
        .await?;
    let id = msg
        .as_str()
        .unwrap_or_default()
        .strip_prefix("started ")
        .context("the spawn form's answer")?
        .to_string();
    let made = server.get(&format!("/v1/workers/{id}")).await?.json()?;
    assert_eq!(made["name"], "echo-worker", "{made}");
    assert_eq!(made["runtime_id"], "local", "{made}");
    assert_eq!(made["profile"], "shell", "{made}");
    assert_eq!(made["labels"], json!({"team": "browser"}), "{made}");
    page.must(&click("#sp-close")).await?;

    // The form opens the worker's pane at its link, with live output: ANSI colours
    // rendered (no raw escapes), stderr apart, the first input echoed, a time on each line.
    page.wait(&format!(
        "location.hash === {} && !document.getElementById('pane').hidden \
         && document.getElementById('out').textContent.includes('got:first') \
         && !document.getElementById('p-text').disabled",
        js(&format!("#/workers/{id}"))
    ))
    .await?;
    page.must(
        "(() => { const out = document.getElementById('out'); \
         const red = [...out.querySelectorAll('span.ansi')].find((s) => s.textContent === 'red'); \
         const bold = [...out.querySelectorAll('span.ansi')].find((s) => s.textContent === 'bold green'); \
         const err = [...out.querySelectorAll('.ln.stderr')].find((l) => l.textContent.includes('to-stderr')); \
         return !!red && getComputedStyle(red).color === 'rgb(249, 112, 102)' \
           && !!bold && getComputedStyle(bold).fontWeight === '700' \
           && !!err && !out.textContent.includes('\\u001b') && !out.textContent.includes('[31m') \
           && [...out.querySelectorAll('.ln')].every((l) => /^≤?\\d\\d:\\d\\d:\\d\\d\\.\\d{3}/.test(l.querySelector('.ts').textContent)); })()",
    )
    .await?;

    // A line typed into the input box reaches the worker's stdin; live lines carry the
    // time they arrived (no "≤": they were not read back from retention).
    page.must(&fill(&[("p-text", "ping")])).await?;
    page.must(&click("#p-input button[type=submit]")).await?;
    let line_of = |text: &str| {
        format!(
            "[...document.querySelectorAll('#out .ln')].find((l) => l.querySelector('.tx').textContent === {})",
            js(text)
        )
    };
    page.wait(&format!(
        "!!({l}) && /^\\d\\d:/.test(({l}).querySelector('.ts').textContent) \
         && document.getElementById('p-text').value === '' && document.getElementById('p-msg').textContent === ''",
        l = line_of("got:ping")
    ))
    .await?;

    // Pause holds new output back (and counts it); resume shows it.
    page.must(&click("#p-pause")).await?;
    server
        .post(
            &format!("/v1/workers/{id}/input"),
            &json!({"data": "while-paused\n"}).to_string(),
        )
        .await?;
    page.wait("document.getElementById('p-pending').textContent === '1 chunks waiting'")
        .await?;
    page.must(&format!("!({})", line_of("got:while-paused")))
        .await?;
    page.must(&click("#p-pause")).await?;
    page.wait(&format!(
        "!!({}) && document.getElementById('p-pending').textContent === ''",
        line_of("got:while-paused")
    ))
    .await?;
    page.screenshot("worker").await?;

    // Stop asks first; with a grace of 1 s the worker ends stopped, everywhere.
    page.must(&click("#p-stop")).await?;
    page.wait("document.getElementById('confirm').open").await?;
    page.must(&fill(&[("confirm-grace", "1")])).await?;
    page.must(&click("#confirm-ok")).await?;
    server.wait_worker(&id, |w| w["state"] == "stopped").await?;
    page.wait(&format!(
        "document.getElementById('p-state').textContent.startsWith('stopped') && {}?.startsWith('stopped') \
         && document.getElementById('p-stop').disabled && !document.getElementById('p-remove').disabled \
         && document.getElementById('p-text').disabled && !document.getElementById('confirm').open",
        cell(&id, "c-state")
    ))
    .await?;

    // Remove asks first: cancelling keeps the worker; confirming removes it.
    page.must(&click("#p-remove")).await?;
    page.wait("document.getElementById('confirm').open").await?;
    page.must(&click("#confirm-cancel")).await?;
    page.wait("!document.getElementById('confirm').open")
        .await?;
    ensure!(
        server.get(&format!("/v1/workers/{id}")).await?.status == StatusCode::OK,
        "cancelling the removal removed the worker"
    );
    page.must(&click("#p-remove")).await?;
    page.wait("document.getElementById('confirm').open").await?;
    page.must(&click("#confirm-ok")).await?;
    wait_status(&server, &format!("/v1/workers/{id}"), StatusCode::NOT_FOUND).await?;
    page.wait(&format!(
        "!({}) && document.getElementById('pane').hidden && location.hash === '#/'",
        row(&id)
    ))
    .await?;

    // A link to one worker opens its pane on a fresh load: the failure, its exit code and
    // its times, and stderr apart.
    page.eval(&format!(
        "(() => {{ location.hash = {}; location.reload(); return true; }})()",
        js(&format!("#/workers/{migrate}"))
    ))
    .await?;
    page.wait(&format!(
        "document.readyState === 'complete' && document.getElementById('conn').textContent === 'live' \
         && !document.getElementById('pane').hidden \
         && document.getElementById('p-title').textContent === 'migrate-db' \
         && document.querySelector('#p-details .exit')?.textContent === '3' \
         && document.querySelector('#p-details .exit')?.classList.contains('exit-bad') \
         && document.getElementById('p-details').textContent.includes('ended') \
         && [...document.querySelectorAll('#out .ln.stderr')].some((l) => l.textContent.includes('error: table locked')) \
         && document.getElementById('out').textContent.includes('end of output') \
         && {} === 'exited exit 3'",
        cell(&migrate, "c-state")
    ))
    .await?;
    // A worker that could not start says why in its pane.
    page.eval(&format!(
        "(() => {{ location.hash = {}; return true; }})()",
        js(&format!("#/workers/{typo}"))
    ))
    .await?;
    page.wait(
        "document.getElementById('p-title').textContent === 'typo' \
         && document.getElementById('p-details').textContent\
            .includes('program not found: No such file or directory (os error 2)')",
    )
    .await?;

    // Retention dropped output: the pane says where ("gap"), then shows the tail (long
    // lines, so that the tail the runtime keeps fits in the view).
    let gappy = spawn(
        &server,
        "batch",
        json!({"profile": "shell", "args": ["seq -f 'line %g of a long output, padded well past the width of a number' 1 20000"], "name": "gappy"}),
    )
    .await?;
    server
        .wait_worker(&gappy, |w| w["state"] == "exited")
        .await?;
    page.eval(&format!(
        "location.hash = {}; true",
        js(&format!("#/workers/{gappy}"))
    ))
    .await?;
    page.wait(
        "[...document.querySelectorAll('#out .note.gap')].some((n) => /^gap: output chunks? 1(–\\d+)? no longer retained/.test(n.textContent)) \
         && [...document.querySelectorAll('#out .ln')].some((l) => l.querySelector('.tx').textContent === 'line 20000 of a long output, padded well past the width of a number') \
         && document.getElementById('out').textContent.includes('end of output')",
    )
    .await?;

    // The page's memory is bounded: of 20,000 lines it keeps the last 5,000 and says so.
    let many = spawn(
        &server,
        "local",
        json!({"profile": "shell", "args": ["seq 1 20000"], "name": "many-lines"}),
    )
    .await?;
    server
        .wait_worker(&many, |w| w["state"] == "exited")
        .await?;
    page.eval(&format!(
        "location.hash = {}; true",
        js(&format!("#/workers/{many}"))
    ))
    .await?;
    page.wait(
        "document.getElementById('out').textContent.includes('end of output') \
         && document.querySelectorAll('#out .ln').length <= 5000 \
         && [...document.querySelectorAll('#out .ln')].some((l) => l.querySelector('.tx').textContent === '20000') \
         && /^\\d+ older lines dropped from this view/.test(document.querySelector('#out .note.dropped')?.textContent)",
    )
    .await?;

    // A dropped connection: the page says it is reconnecting and shows no worker as live;
    // what happens meanwhile arrives when it resumes (with Last-Event-ID: no snapshot).
    page.eval(&format!(
        "location.hash = {}; true",
        js(&format!("#/workers/{ticker}"))
    ))
    .await?;
    page.wait("document.getElementById('out').textContent.includes('request 1 served')")
        .await?;
    relay.cut();
    page.wait(&format!(
        "document.getElementById('conn').textContent === 'reconnecting…' \
         && !document.getElementById('stale-banner').hidden \
         && ({r}).classList.contains('stale') && {s} === 'running?' \
         && document.querySelector('#p-state .st').classList.contains('stale')",
        r = row(&ticker),
        s = cell(&ticker, "c-state .st"),
    ))
    .await?;
    page.screenshot("reconnecting").await?;
    let late = spawn(
        &server,
        "local",
        json!({"profile": "shell", "args": ["echo late"], "name": "started-while-away"}),
    )
    .await?;
    server
        .wait_worker(&late, |w| w["state"] == "exited")
        .await?;
    let seq_before = page
        .eval("Number(document.getElementById('p-seq').textContent.slice(4))")
        .await?;
    relay.restore(server.addr);
    page.wait(&format!(
        "{} && {}?.startsWith('exited') && {} === 'running' && document.getElementById('stale-banner').hidden",
        conn_is("live", "resumed: nothing missed"),
        cell(&late, "c-state"),
        cell(&ticker, "c-state"),
    ))
    .await?;
    // The worker's output resumed after the last seq it had: nothing twice, nothing missing.
    page.wait(&format!(
        "Number(document.getElementById('p-seq').textContent.slice(4)) > {seq_before}"
    ))
    .await?;
    page.must(
        "(() => { const n = [...document.querySelectorAll('#out .ln .tx')].map((t) => t.textContent) \
           .map((t) => /request (\\d+) served/.exec(t)).filter((m) => m).map((m) => Number(m[1])); \
         return n.length > 1 && n.every((v, i) => v === n[0] + i); })()",
    )
    .await?;

    // A restart of roster (on the same state, now asking for a token) while the page is cut
    // off: the page stays "reconnecting" with its workers marked stale, asks for the token,
    // then resets to the new run's snapshot, in which the old workers are gone.
    relay.cut();
    page.wait(&format!(
        "document.getElementById('conn').textContent === 'reconnecting…' && ({}).classList.contains('stale')",
        row(&ticker)
    ))
    .await?;
    let dir = server.stop().await?;
    let secret = "console-test-token-0123456789";
    let options = ServeOptions {
        tokens: vec![LoadedToken {
            name: "console".into(),
            scope: Scope::Operate,
            secret: secret.into(),
        }],
        ..ServeOptions::default()
    };
    let server = TestServer::start_in(dir, config, options).await?;
    relay.restore(server.addr);
    page.wait(&format!(
        "document.getElementById('conn').textContent === 'a token is needed' \
         && document.getElementById('token-box').classList.contains('need') \
         && {} === 'running?'",
        cell(&ticker, "c-state .st")
    ))
    .await?;
    page.must(&fill(&[("token", secret)])).await?;
    page.must(&click("#token-box button[type=submit]")).await?;
    page.wait(&format!(
        "{} && !({}) && document.querySelectorAll('#workers tr').length === 0 \
         && document.getElementById('p-state').textContent === 'gone' \
         && document.getElementById('out').textContent.includes('this worker is gone')",
        conn_is("live", "reloaded: the server restarted"),
        row(&ticker)
    ))
    .await?;
    // The token is kept for this tab only: in sessionStorage, nowhere else.
    page.must(&format!(
        "sessionStorage.getItem('roster.token') === {} && localStorage.length === 0 \
         && document.cookie === '' && !location.href.includes({})",
        js(secret),
        js(secret)
    ))
    .await?;

    // The new run serves the console's calls with the token: a worker started from the
    // form shows up, and a reload keeps the token (the same tab).
    page.must(&click("#spawn-open")).await?;
    page.must(&fill(&[("sp-runtime", "local")])).await?;
    page.wait(
        "[...document.getElementById('sp-profile').options].some((o) => o.value === 'shell')",
    )
    .await?;
    page.must(&fill(&[
        ("sp-runtime", "local"),
        ("sp-profile", "shell"),
        ("sp-args", "echo after-the-restart"),
        ("sp-name", "after-restart"),
        ("sp-labels", ""),
        ("sp-stdin", ""),
    ]))
    .await?;
    page.must(&click("#sp-form button[type=submit]")).await?;
    page.wait(
        "document.getElementById('sp-msg').textContent.startsWith('started w_') \
         && document.getElementById('out').textContent.includes('after-the-restart')",
    )
    .await?;
    page.eval("location.reload(); true").await?;
    page.wait(&format!(
        "document.readyState === 'complete' && {} \
         && [...document.querySelectorAll('#workers tr')].some((tr) => tr.textContent.includes('after-restart'))",
        conn_is("live", "")
    ))
    .await?;

    ensure!(
        page.log.iter().all(|l| !l.starts_with("exception")),
        "the page threw:\n{}",
        page.log.join("\n")
    );
    drop(page);
    drop(browser);
    drop(relay);
    server.stop().await?;
    eprintln!("the console's browser test took {:?}", started.elapsed());
    Ok(())
}
