//! The web console in a real browser: headless Chromium, driven over the DevTools protocol,
//! loads `/`; the page's `EventSource` fills the tables from `/v1/events` live, a worker's
//! panel streams its output, sends it a line, stops and removes it, and the spawn form
//! starts a worker through a same-origin `POST` that carries the browser's own `Origin`.
//!
//! `tokio-tungstenite` (a dev-dependency) is here because the DevTools protocol is JSON over
//! a websocket.
//!
//! Needs `chromium` on the PATH (CI installs it). Without it the test says so and passes,
//! unless `ROSTER_REQUIRE_BROWSER=1` is set — as CI does — when a missing browser fails it.
mod common;

use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use common::{TestServer, WAIT};
use futures_util::{SinkExt as _, StreamExt as _};
use http::StatusCode;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How often a condition on the page is checked again.
const POLL: Duration = Duration::from_millis(100);

/// What the first worker runs: a greeting, then one line of stdin echoed back, then a wait.
const ECHO_SCRIPT: &str = "echo hello-from-worker; read line; echo got:$line; sleep 60";

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
    url: location.href, conn: t("conn"), runtimes: t("runtimes"), workers: t("workers"),
    panel_hidden: document.getElementById("panel") ? document.getElementById("panel").hidden : null,
    title: t("p-title"), state: t("p-state"), p_msg: t("p-msg"), sp_msg: t("sp-msg"),
    out: out === null ? null : out.slice(-2000),
  };
})()"#;

/// A JavaScript string literal for `s`.
fn js(s: &str) -> String {
    Value::from(s).to_string()
}

/// An expression for the worker table's row of worker `id` (or `undefined`).
fn row(id: &str) -> String {
    format!(
        "[...document.querySelectorAll('#workers tr')].find((tr) => tr.cells[1] && tr.cells[1].textContent === {})",
        js(id)
    )
}

/// An expression for the text of cell `cell` of worker `id`'s row (or `undefined`).
fn cell(id: &str, cell: usize) -> String {
    format!("({})?.cells[{cell}]?.textContent", row(id))
}

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
    let server = TestServer::start().await?;
    let browser = Browser::launch(&program).await?;
    let mut page = Page::open(&browser).await?;
    eprintln!("browser ready after {:?}", started.elapsed());

    // The console loads, its event stream connects, and the snapshot lists the runtime.
    let url = format!("http://127.0.0.1:{}/", server.addr.port());
    let nav = page.call("Page.navigate", json!({ "url": url })).await?;
    if let Some(error) = nav.get("errorText") {
        bail!("loading {url} failed: {error}");
    }
    page.wait(&format!(
        "location.href === {} && document.readyState === 'complete'",
        js(&url)
    ))
    .await?;
    page.wait(
        "document.getElementById('conn').textContent === 'live' \
         && [...document.querySelectorAll('#runtimes tr')].some((tr) => tr.cells[0].textContent === 'local')",
    )
    .await?;

    // A worker spawned through the API shows up live, without a reload.
    let body = json!({
        "profile": "shell", "args": [ECHO_SCRIPT], "name": "echo-worker",
        "labels": {"team": "browser"},
    });
    let resp = server
        .post("/v1/runtimes/local/workers", &body.to_string())
        .await?;
    ensure!(resp.status == StatusCode::CREATED, "spawn: {}", resp.text());
    let id = resp.json()?["id"].as_str().context("an id")?.to_string();
    page.wait(&format!(
        "{} === 'echo-worker' && {} === 'local' && {} === 'running' && {} === 'team=browser'",
        cell(&id, 0),
        cell(&id, 2),
        cell(&id, 3),
        cell(&id, 5)
    ))
    .await?;

    // The runtime's counts follow the live workers too.
    page.wait("document.getElementById('runtimes').textContent.includes('running 1')")
        .await?;

    // Its row opens the panel, which streams the worker's output.
    page.must(&format!(
        "(() => {{ const tr = {}; if (!tr) return false; tr.click(); return true; }})()",
        row(&id)
    ))
    .await?;
    page.wait(&format!(
        "!document.getElementById('panel').hidden \
         && document.getElementById('p-title').textContent.includes({}) \
         && document.getElementById('out').textContent.includes('hello-from-worker') \
         && !document.getElementById('p-text').disabled",
        js(&id)
    ))
    .await?;

    // A line typed into the input box reaches the worker's stdin.
    page.must(
        "(() => { document.getElementById('p-text').value = 'ping'; \
         document.querySelector('#p-input button[type=submit]').click(); return true; })()",
    )
    .await?;
    page.wait(
        "document.getElementById('out').textContent.includes('got:ping') \
         && document.getElementById('p-text').value === '' \
         && document.getElementById('p-msg').textContent === ''",
    )
    .await?;

    // Stop: the API and the page both say stopped; then Remove takes it away everywhere.
    page.must(
        "(() => { const b = document.getElementById('p-stop'); if (b.disabled) return false; \
         b.click(); return true; })()",
    )
    .await?;
    server.wait_worker(&id, |w| w["state"] == "stopped").await?;
    page.wait(&format!(
        "document.getElementById('p-state').textContent === 'stopped' && {} === 'stopped' \
         && document.getElementById('p-stop').disabled \
         && !document.getElementById('p-remove').disabled \
         && document.getElementById('p-text').disabled",
        cell(&id, 3)
    ))
    .await?;
    page.must("(() => { document.getElementById('p-remove').click(); return true; })()")
        .await?;
    let deadline = Instant::now() + WAIT;
    loop {
        let resp = server.get(&format!("/v1/workers/{id}")).await?;
        if resp.status == StatusCode::NOT_FOUND {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the worker was never removed: {} {}",
            resp.status,
            resp.text()
        );
        tokio::time::sleep(POLL).await;
    }
    page.wait(&format!(
        "!({}) && document.getElementById('panel').hidden",
        row(&id)
    ))
    .await?;

    // The spawn form: a same-origin POST with the browser's Origin is let through.
    page.wait("[...document.getElementById('sp-runtime').options].some((o) => o.value === 'local' && !o.disabled)")
        .await?;
    page.must(
        "(() => { const set = (id, v) => { document.getElementById(id).value = v; }; \
         set('sp-runtime', 'local'); set('sp-profile', 'shell'); set('sp-command', ''); \
         set('sp-args', 'echo made-by-the-form'); set('sp-name', 'from-the-form'); \
         set('sp-labels', 'via=form'); \
         document.querySelector('#spawn button[type=submit]').click(); return true; })()",
    )
    .await?;
    page.wait("document.getElementById('sp-msg').textContent !== ''")
        .await?;
    let msg = page
        .eval("document.getElementById('sp-msg').textContent")
        .await?;
    let msg = msg.as_str().unwrap_or_default();
    let form_id = msg
        .strip_prefix("started ")
        .with_context(|| format!("the spawn form answered: {msg}"))?
        .to_string();
    let list = server.get("/v1/workers").await?;
    ensure!(list.status == StatusCode::OK, "list: {}", list.text());
    let list = list.json()?;
    let made = list["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|w| w["name"] == "from-the-form")
        .with_context(|| format!("no worker named from-the-form in {list}"))?;
    assert_eq!(made["id"], form_id.as_str(), "{made}");
    assert_eq!(made["runtime_id"], "local", "{made}");
    assert_eq!(made["labels"], json!({"via": "form"}), "{made}");
    // The form opens the new worker's panel; its output and exit arrive live.
    page.wait(&format!(
        "document.getElementById('p-title').textContent.includes({}) \
         && document.getElementById('out').textContent.includes('made-by-the-form') \
         && {} === 'exited' && {} === '0'",
        js(&form_id),
        cell(&form_id, 3),
        cell(&form_id, 4)
    ))
    .await?;
    ensure!(
        page.log.iter().all(|l| !l.starts_with("exception")),
        "the page threw:\n{}",
        page.log.join("\n")
    );

    drop(page);
    drop(browser);
    server.stop().await?;
    eprintln!("the console's browser test took {:?}", started.elapsed());
    Ok(())
}
