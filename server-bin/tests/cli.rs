//! The `roster` command-line client as a person or a script uses it: every subcommand
//! against a real server (`roster serve`, the real binary) with real workers, in tables and
//! in `--json`; `logs -f` across dropped connections; `spawn -f` exiting with the worker's
//! code; naming workers by id, prefix and name; and the messages and exit codes for an
//! unreachable server, a missing or wrong token, and a wrong command line.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;

use common::process::{Roster, POLL};

/// How long one client command may take on a loaded machine.
const COMMAND_WAIT: Duration = Duration::from_secs(60);
/// How long a condition is polled for.
const WAIT: Duration = Duration::from_secs(30);

/// What one run of the client did.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The stdout lines as JSON objects.
    fn json_lines(&self) -> Result<Vec<Value>> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
            .collect()
    }

    fn ok(self) -> Result<Run> {
        ensure!(
            self.code == 0,
            "exit {}: {}{}",
            self.code,
            self.stdout,
            self.stderr
        );
        Ok(self)
    }
}

/// `roster args…` against `server`, to its end.
fn roster(server: &str, args: &[&str]) -> Result<Run> {
    roster_env(server, args, &[])
}

fn roster_env(server: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Run> {
    let child = start(server, args, env)?;
    let (status, stdout, stderr) = child.finish(COMMAND_WAIT)?;
    Ok(Run {
        code: status.code().context("killed by a signal")?,
        stdout,
        stderr,
    })
}

/// `roster args… --server server` started (its subcommand first, so the flag lands on it).
fn start(server: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Roster> {
    let mut all: Vec<&str> = args.to_vec();
    // The flag goes before a `--`, if there is one.
    let at = all.iter().position(|a| *a == "--").unwrap_or(all.len());
    all.splice(at..at, ["--server", server]);
    let mut env = env.to_vec();
    env.push(("NO_COLOR", "1"));
    Roster::spawn(&all, &env)
}

/// Polls `check` until it holds.
fn wait_for(what: &str, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        if check()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(POLL);
    }
}

/// A server of its own: `roster serve` on 127.0.0.1:0 with a fresh state directory.
struct Server {
    _roster: Roster,
    addr: SocketAddr,
    url: String,
    _dir: tempfile::TempDir,
}

fn serve() -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let (roster, addr) = Roster::serve(dir.path(), &[], &[])?;
    Ok(Server {
        _roster: roster,
        addr,
        url: format!("http://{addr}"),
        _dir: dir,
    })
}

impl Server {
    /// `roster get WORKER --json`.
    fn worker(&self, worker: &str) -> Result<Value> {
        let run = roster(&self.url, &["get", worker, "--json"])?.ok()?;
        Ok(serde_json::from_str(run.stdout.trim())?)
    }

    fn wait_state(&self, worker: &str, state: &str) -> Result<Value> {
        let mut last = Value::Null;
        wait_for(&format!("{worker} to be {state}"), || {
            last = self.worker(worker)?;
            Ok(last["state"] == state)
        })?;
        Ok(last)
    }

    /// Spawns `sh -c script` named `name`; returns its id.
    fn spawn_shell(&self, name: &str, script: &str) -> Result<String> {
        let run = roster(
            &self.url,
            &["spawn", "--profile", "shell", "--name", name, "--", script],
        )?
        .ok()?;
        let id = run.stdout.trim().to_string();
        ensure!(
            id.starts_with("w_") && id.len() == 28,
            "not an id: {:?}",
            run.stdout
        );
        Ok(id)
    }
}

#[test]
fn runtimes_lists_each_runtime_in_a_table_and_in_json() -> Result<()> {
    let server = serve()?;
    let table = roster(&server.url, &["runtimes"])?.ok()?;
    let header = table.stdout.lines().next().unwrap_or_default();
    for column in ["NAME", "KIND", "HEALTH", "SINCE", "WORKERS"] {
        assert!(header.contains(column), "{column} not in {header:?}");
    }
    let row = table.stdout.lines().nth(1).unwrap_or_default();
    assert!(
        row.starts_with("local") && row.contains("embedded") && row.contains("ready"),
        "{row:?}"
    );
    assert!(row.contains("ago"), "{row:?}");
    assert!(
        !table.stdout.contains('\u{1b}'),
        "colour without a terminal"
    );

    let json = roster(&server.url, &["runtimes", "--json"])?.ok()?;
    let runtimes = json.json_lines()?;
    assert_eq!(runtimes.len(), 1);
    assert_eq!(runtimes[0]["id"], "local");
    assert_eq!(runtimes[0]["kind"], "embedded");
    assert_eq!(runtimes[0]["capabilities"]["spawn"], true);
    let same = roster(&server.url, &["runtimes", "-o", "json"])?.ok()?;
    assert_eq!(same.json_lines()?[0]["id"], "local");
    Ok(())
}

#[test]
fn spawn_ls_get_input_logs_stop_and_rm_drive_real_workers() -> Result<()> {
    let server = serve()?;
    let url = server.url.as_str();
    let greeter = server.spawn_shell(
        "greeter",
        "echo hello; echo oops >&2; read line; echo \"got $line\"; exit 4",
    )?;
    let sleeper = {
        let run = roster(
            url,
            &[
                "spawn", "--name", "sleeper", "-l", "team=a", "--json", "--", "sleep", "300",
            ],
        )?
        .ok()?;
        let worker: Value = serde_json::from_str(run.stdout.trim())?;
        assert_eq!(worker["command"], serde_json::json!(["sleep", "300"]));
        assert_eq!(worker["labels"]["team"], "a");
        worker["id"].as_str().context("an id")?.to_string()
    };
    server.wait_state(&greeter, "running")?;
    server.wait_state(&sleeper, "running")?;

    // ls: a table with both, then filters, then JSON.
    let ls = roster(url, &["ls"])?.ok()?;
    let header = ls.stdout.lines().next().unwrap_or_default();
    for column in [
        "ID", "NAME", "RUNTIME", "STATE", "CREATED", "UPTIME", "LABELS",
    ] {
        assert!(header.contains(column), "{column} not in {header:?}");
    }
    for (id, name) in [(&greeter, "greeter"), (&sleeper, "sleeper")] {
        let row = ls
            .stdout
            .lines()
            .find(|l| l.starts_with(id.as_str()))
            .with_context(|| format!("{id} not listed:\n{}", ls.stdout))?;
        assert!(
            row.contains(name) && row.contains("running") && row.contains("ago"),
            "{row}"
        );
    }
    let labelled = roster(url, &["ls", "-l", "team=a", "--json"])?
        .ok()?
        .json_lines()?;
    assert_eq!(labelled.len(), 1);
    assert_eq!(labelled[0]["id"], sleeper.as_str());
    let none = roster(url, &["ls", "-l", "team=b", "--json"])?.ok()?;
    assert_eq!(none.stdout, "");
    let running = roster(url, &["ls", "--state", "running", "-r", "local", "--json"])?.ok()?;
    assert_eq!(running.json_lines()?.len(), 2);

    // get: every field, by name and by a prefix of the id.
    let get = roster(url, &["get", "greeter"])?.ok()?;
    for field in [
        "id:",
        "runtime_id:",
        "name:",
        "state:",
        "created_at:",
        "profile:",
        "args:",
    ] {
        assert!(
            get.stdout.contains(field),
            "{field} not in:\n{}",
            get.stdout
        );
    }
    assert!(get.stdout.contains(&greeter), "{}", get.stdout);
    let by_prefix = server.worker(&greeter[..10])?;
    assert_eq!(by_prefix["id"], greeter.as_str());
    let lower = server.worker(&greeter.to_ascii_lowercase())?;
    assert_eq!(lower["id"], greeter.as_str());

    // input, then logs -f to its end: the worker's output as it wrote it, its exit code.
    roster(url, &["input", "greeter", "world"])?.ok()?;
    let logs = roster(url, &["logs", "-f", &greeter])?;
    assert_eq!(logs.code, 4, "{logs:?}");
    assert_eq!(logs.stdout, "hello\ngot world\n");
    assert!(logs.stderr.contains("oops\n"), "{logs:?}");
    // Without -f, what is retained; --since-seq and --tail cut it.
    let all = roster(url, &["logs", "greeter"])?.ok()?;
    assert_eq!(all.stdout, "hello\ngot world\n");
    let after = roster(url, &["logs", "--since-seq", "2", "greeter"])?.ok()?;
    assert_eq!(after.stdout, "got world\n");
    assert!(!after.stderr.contains("oops"), "{after:?}");
    let tail = roster(url, &["logs", "--tail", "1", "greeter"])?.ok()?;
    assert_eq!(tail.stdout, "got world\n");

    // rm of a running worker is refused; stop, then rm.
    let refused = roster(url, &["rm", "sleeper"])?;
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(refused.stderr.contains("conflict"), "{refused:?}");
    let stop = roster(url, &["stop", "--grace", "2s", "sleeper"])?.ok()?;
    assert!(
        stop.stdout.contains(&format!("stopping {sleeper}")),
        "{stop:?}"
    );
    let stopped = server.wait_state(&sleeper, "stopped")?;
    assert!(stopped["ended_at"].is_string(), "{stopped}");
    // The finished ones are hidden from ls unless --all.
    let live = roster(url, &["ls", "--json"])?.ok()?;
    assert_eq!(live.stdout, "", "{live:?}");
    let every = roster(url, &["ls", "--all"])?.ok()?;
    assert!(every.stdout.contains("exited (4)"), "{}", every.stdout);
    assert!(every.stdout.contains("stopped"), "{}", every.stdout);

    let rm = roster(url, &["rm", "sleeper", &greeter, "--json"])?.ok()?;
    assert_eq!(rm.stdout.lines().count(), 2, "{rm:?}");
    let gone = roster(url, &["get", &sleeper])?;
    assert_eq!(gone.code, 1, "{gone:?}");
    assert!(gone.stderr.contains("worker_not_found"), "{gone:?}");
    Ok(())
}

#[test]
fn input_from_stdin_reaches_the_worker_as_it_is_typed() -> Result<()> {
    let server = serve()?;
    let id = server.spawn_shell(
        "echoer",
        "while read line; do echo \"got $line\"; [ \"$line\" = bye ] && exit 0; done",
    )?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["input", "--server", &server.url, &id, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(b"one\n")?;
    // The first line arrives before stdin ends.
    wait_for("the first line", || {
        Ok(roster(&server.url, &["logs", &id])?.ok()?.stdout == "got one\n")
    })?;
    stdin.write_all("twö\nbye\n".as_bytes())?;
    drop(stdin);
    let status = child.wait()?;
    ensure!(status.success(), "input exited {status}");
    let logs = roster(&server.url, &["logs", "-f", &id])?;
    assert_eq!(logs.code, 0, "{logs:?}");
    assert_eq!(logs.stdout, "got one\ngot twö\ngot bye\n");
    Ok(())
}

#[test]
fn spawn_follow_exits_with_the_workers_code() -> Result<()> {
    let server = serve()?;
    let run = roster(
        &server.url,
        &[
            "spawn",
            "-f",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 7",
        ],
    )?;
    assert_eq!(run.code, 7, "{run:?}");
    assert_eq!(run.stdout, "out\n");
    assert!(run.stderr.contains("err\n"), "{run:?}");

    let ok = roster(
        &server.url,
        &["spawn", "-f", "--profile", "shell", "--", "echo fine"],
    )?;
    assert_eq!((ok.code, ok.stdout.as_str()), (0, "fine\n"), "{ok:?}");

    // The first input, env and name reach the worker.
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("input.txt");
    std::fs::write(&input, "from a file\n")?;
    let with = roster(
        &server.url,
        &[
            "spawn",
            "-f",
            "--name",
            "reader",
            "--env",
            "GREETING=hi",
            "--stdin",
            input.to_str().context("utf-8")?,
            "--",
            "sh",
            "-c",
            "read line; echo \"$GREETING: $line\"",
        ],
    )?;
    assert_eq!(
        (with.code, with.stdout.as_str()),
        (0, "hi: from a file\n"),
        "{with:?}"
    );
    let named = roster(&server.url, &["ls", "--all", "--json"])?
        .ok()?
        .json_lines()?;
    assert!(named.iter().any(|w| w["name"] == "reader"), "{named:?}");
    Ok(())
}

#[test]
fn ctrl_c_during_spawn_follow_stops_the_worker_and_exits_with_its_code() -> Result<()> {
    let server = serve()?;
    let mut follow = start(
        &server.url,
        &[
            "spawn",
            "-f",
            "--name",
            "interrupted",
            "--",
            "sh",
            "-c",
            "echo up; exec sleep 300",
        ],
        &[],
    )?;
    wait_for("the worker's first line", || {
        Ok(follow.stdout.text() == "up\n")
    })?;
    follow.signal(libc::SIGINT)?;
    let status = follow.wait_exit_and_output(COMMAND_WAIT)?;
    let stderr = follow.stderr.text();
    assert_eq!(status.code(), Some(143), "{stderr}");
    assert!(stderr.contains("stopping"), "{stderr}");
    assert_eq!(server.worker("interrupted")?["state"], "stopped");
    Ok(())
}

/// A TCP proxy on 127.0.0.1 in front of the server, whose open connections the test can cut:
/// to the client, the server dropped it.
struct Proxy {
    addr: SocketAddr,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(upstream: SocketAddr) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let conns = open.clone();
        // The thread ends with the test process; it only ever serves this test's client.
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                {
                    let mut open = conns.lock().unwrap_or_else(|e| e.into_inner());
                    open.retain(|s: &TcpStream| s.peer_addr().is_ok());
                    if let (Ok(a), Ok(b)) = (client.try_clone(), server.try_clone()) {
                        open.push(a);
                        open.push(b);
                    }
                }
                pipe(client, server);
                pipe(s2, c2);
            }
        });
        Ok(Proxy { addr, open })
    }

    /// Closes every connection open now.
    fn cut(&self) {
        for stream in self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

/// Copies `from` to `to` on a thread of its own until either side closes.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

#[test]
fn logs_follow_resumes_after_a_dropped_connection_losing_and_repeating_nothing() -> Result<()> {
    let server = serve()?;
    let proxy = Proxy::start(server.addr)?;
    let through = format!("http://{}", proxy.addr);
    // Three batches of lines; the worker waits for a line of input between them.
    let id = server.spawn_shell(
        "batches",
        "for b in a b c; do i=1; while [ $i -le 50 ]; do echo $b-$i; i=$((i+1)); done; \
         [ $b = c ] || read go; done; exit 5",
    )?;
    let mut logs = start(&through, &["logs", "-f", &id], &[])?;
    for (done, next) in [("a-50\n", 1), ("b-50\n", 2)] {
        wait_for(done, || Ok(logs.stdout.text().contains(done)))?;
        proxy.cut();
        wait_for("the reconnect notice", || {
            Ok(logs.stderr.text().matches("reconnecting").count() >= next)
        })?;
        roster(&server.url, &["input", &id, "go"])?.ok()?;
    }
    let status = logs.wait_exit_and_output(COMMAND_WAIT)?;
    let (stdout, stderr) = (logs.stdout.text(), logs.stderr.text());
    assert_eq!(status.code(), Some(5), "{stderr}");
    let expected: String = ["a", "b", "c"]
        .iter()
        .flat_map(|b| (1..=50).map(move |i| format!("{b}-{i}\n")))
        .collect();
    assert_eq!(stdout, expected, "stderr: {stderr}");
    // One line per drop, naming where it resumes.
    let notices: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("reconnecting"))
        .collect();
    assert_eq!(notices.len(), 2, "{stderr}");
    assert!(notices.iter().all(|n| n.contains("after")), "{stderr}");
    Ok(())
}

#[test]
fn events_and_ls_watch_follow_changes_and_resume_after_a_drop() -> Result<()> {
    let server = serve()?;
    let proxy = Proxy::start(server.addr)?;
    let through = format!("http://{}", proxy.addr);
    let mut events = start(&through, &["events", "--json"], &[])?;
    let mut watch = start(&through, &["ls", "-w"], &[])?;
    wait_for("the snapshot", || {
        Ok(events.stdout.text().contains("\"event\":\"snapshot\""))
    })?;
    let first = server.spawn_shell("first", "sleep 300")?;
    wait_for("the first worker's event", || {
        Ok(events.stdout.text().contains(&first) && watch.stdout.text().contains(&first))
    })?;
    proxy.cut();
    wait_for("both reconnect notices", || {
        Ok(events.stderr.text().contains("reconnecting")
            && watch.stderr.text().contains("reconnecting"))
    })?;
    let second = server.spawn_shell("second", "sleep 300")?;
    roster(&server.url, &["stop", "--grace", "1s", &first])?.ok()?;
    wait_for("the second worker and the stop", || {
        let text = watch.stdout.text();
        Ok(text.contains(&second) && text.contains(&format!("{first}  first  local  stopped")))
    })?;
    wait_for("the events of the second worker", || {
        Ok(events.stdout.text().contains(&second))
    })?;
    events.signal(libc::SIGTERM)?;
    events.wait_exit_and_output(COMMAND_WAIT)?;
    watch.signal(libc::SIGTERM)?;

    // Every event once, in cursor order, across the drop; the only snapshot is the first.
    let lines: Vec<Value> = events
        .stdout
        .text()
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let cursors: Vec<&str> = lines.iter().filter_map(|e| e["cursor"].as_str()).collect();
    let mut unique = cursors.clone();
    unique.dedup();
    assert_eq!(cursors, unique, "an event came twice");
    let snapshots = lines.iter().filter(|e| e["event"] == "snapshot").count();
    assert_eq!(snapshots, 1, "{lines:?}");
    assert!(
        lines.iter().any(
            |e| e["event"] == "worker.upserted" && e["data"]["worker"]["id"] == second.as_str()
        ),
        "{lines:?}"
    );
    Ok(())
}

#[test]
fn names_and_prefixes_resolve_and_an_ambiguous_name_lists_the_candidates() -> Result<()> {
    let server = serve()?;
    let one = server.spawn_shell("twin", "sleep 300")?;
    let two = server.spawn_shell("twin", "sleep 300")?;
    let solo = server.spawn_shell("solo", "sleep 300")?;

    let ambiguous = roster(&server.url, &["get", "twin"])?;
    assert_eq!(ambiguous.code, 1, "{ambiguous:?}");
    assert!(
        ambiguous.stderr.contains("\"twin\" matches 2 workers"),
        "{ambiguous:?}"
    );
    assert!(
        ambiguous.stderr.contains(&one) && ambiguous.stderr.contains(&two),
        "{ambiguous:?}"
    );
    assert!(ambiguous.stderr.contains("hint:"), "{ambiguous:?}");
    assert_eq!(ambiguous.stdout, "");
    // stop with an ambiguous name does nothing to either.
    let stop = roster(&server.url, &["stop", "twin"])?;
    assert_eq!(stop.code, 1, "{stop:?}");
    assert_eq!(server.worker(&one)?["state"], "running");

    assert_eq!(server.worker("solo")?["id"], solo.as_str());
    assert_eq!(server.worker(&solo[2..8])?["id"], solo.as_str());
    let in_runtime = roster(&server.url, &["get", "-r", "local", "solo", "--json"])?.ok()?;
    assert!(in_runtime.stdout.contains(&solo), "{in_runtime:?}");

    let no_runtime = roster(&server.url, &["get", "-r", "nosuch", "solo"])?;
    assert_eq!(no_runtime.code, 1, "{no_runtime:?}");
    assert!(
        no_runtime.stderr.contains("runtime_not_found"),
        "{no_runtime:?}"
    );
    let nobody = roster(&server.url, &["logs", "nobody"])?;
    assert_eq!(nobody.code, 1, "{nobody:?}");
    assert!(nobody.stderr.contains("worker_not_found"), "{nobody:?}");
    assert!(nobody.stderr.contains("\"nobody\""), "{nobody:?}");
    Ok(())
}

#[test]
fn an_unreachable_server_says_where_it_looked_and_exits_3() -> Result<()> {
    // A port nothing listens on: bound, then closed.
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let url = format!("http://127.0.0.1:{port}");
    for args in [
        &["runtimes"][..],
        &["ls"],
        &["logs", "-f", "x"],
        &["events"],
    ] {
        let run = roster(&url, args)?;
        assert_eq!(run.code, 3, "{args:?}: {run:?}");
        assert!(run.stderr.contains(&url), "{run:?}");
        assert!(run.stderr.contains("roster serve"), "{run:?}");
    }
    // ROSTER_URL stands for --server.
    let run = Roster::spawn(&["ls"], &[("ROSTER_URL", &url)])?.finish(COMMAND_WAIT)?;
    assert_eq!(run.0.code(), Some(3), "{}", run.2);
    assert!(run.2.contains(&url), "{}", run.2);
    Ok(())
}

/// A server with an `operate` and a `read` token.
fn serve_with_tokens(dir: &Path, operate: &str, read: &str) -> Result<(Roster, String)> {
    let config = dir.join("roster.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:0\"\n\
         [[server.tokens]]\nname = \"ops\"\nscope = \"operate\"\ntoken_env = \"CLI_TEST_OPERATE\"\n\
         [[server.tokens]]\nname = \"viewer\"\nscope = \"read\"\ntoken_env = \"CLI_TEST_READ\"\n",
    )?;
    let state = dir.join("state");
    let (roster, addr) = Roster::serve_config(
        &config,
        &state,
        &[("CLI_TEST_OPERATE", operate), ("CLI_TEST_READ", read)],
    )?;
    Ok((roster, format!("http://{addr}")))
}

#[test]
fn a_missing_or_wrong_token_is_told_how_to_give_one_and_never_printed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let operate = "operate-secret-0123456789abcdef";
    let read = "read-secret-0123456789abcdef";
    let (_server, url) = serve_with_tokens(dir.path(), operate, read)?;
    let wrong_file = dir.path().join("wrong.token");
    std::fs::write(&wrong_file, "not-the-token-0123456789\n")?;
    let good_file = dir.path().join("good.token");
    std::fs::write(&good_file, format!("{operate}\n"))?;

    let mut runs = Vec::new();
    let missing = roster(&url, &["ls"])?;
    assert_eq!(missing.code, 1, "{missing:?}");
    assert!(missing.stderr.contains("unauthorized (401)"), "{missing:?}");
    assert!(missing.stderr.contains("--token-file") && missing.stderr.contains("ROSTER_TOKEN"));
    runs.push(missing);

    let wrong = roster(
        &url,
        &["ls", "--token-file", wrong_file.to_str().context("utf-8")?],
    )?;
    assert_eq!(wrong.code, 1, "{wrong:?}");
    assert!(wrong.stderr.contains("unauthorized"), "{wrong:?}");
    runs.push(wrong);

    let good = roster(
        &url,
        &[
            "spawn",
            "--token-file",
            good_file.to_str().context("utf-8")?,
            "--",
            "true",
        ],
    )?;
    assert_eq!(good.code, 0, "{good:?}");
    runs.push(good);

    let by_env = roster_env(&url, &["ls", "--all"], &[("ROSTER_TOKEN", operate)])?;
    assert_eq!(by_env.code, 0, "{by_env:?}");
    runs.push(by_env);

    let viewer = roster_env(&url, &["spawn", "--", "true"], &[("ROSTER_TOKEN", read)])?;
    assert_eq!(viewer.code, 1, "{viewer:?}");
    assert!(viewer.stderr.contains("forbidden"), "{viewer:?}");
    assert!(viewer.stderr.contains("operate"), "{viewer:?}");
    runs.push(viewer);

    let no_file = roster(&url, &["ls", "--token-file", "/nonexistent/roster.token"])?;
    assert_eq!(no_file.code, 2, "{no_file:?}");
    runs.push(no_file);

    for run in &runs {
        for secret in [operate, read] {
            assert!(
                !run.stdout.contains(secret) && !run.stderr.contains(secret),
                "{run:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn usage_errors_exit_2_and_help_shows_examples() -> Result<()> {
    let server = serve()?;
    let nothing = roster(&server.url, &["spawn"])?;
    assert_eq!(nothing.code, 2, "{nothing:?}");
    assert!(nothing.stderr.contains("--profile"), "{nothing:?}");
    let bad_flag = roster(&server.url, &["ls", "--bogus"])?;
    assert_eq!(bad_flag.code, 2, "{bad_flag:?}");
    let bad_label = roster(&server.url, &["ls", "-l", "nolabel"])?;
    assert_eq!(bad_label.code, 2, "{bad_label:?}");
    let bad_server = roster("https://127.0.0.1:1", &["ls"])?;
    assert_eq!(bad_server.code, 2, "{bad_server:?}");
    // A state the API does not know is its error, not a silent empty list.
    let bad_state = roster(&server.url, &["ls", "--state", "sleeping"])?;
    assert_eq!(bad_state.code, 1, "{bad_state:?}");
    assert!(
        bad_state.stderr.contains("invalid_request"),
        "{bad_state:?}"
    );

    for sub in [
        "runtimes",
        "ls",
        "get",
        "spawn",
        "logs",
        "input",
        "stop",
        "rm",
        "events",
        "completions",
    ] {
        let (status, stdout, _) = Roster::spawn(&[sub, "--help"], &[])?.finish(COMMAND_WAIT)?;
        assert!(status.success(), "{sub}");
        assert!(
            stdout.contains("Example"),
            "{sub} --help has no example:\n{stdout}"
        );
        assert!(
            stdout.contains(&format!("roster {sub}")),
            "{sub}:\n{stdout}"
        );
    }
    let (status, stdout, _) = Roster::spawn(&["--help"], &[])?.finish(COMMAND_WAIT)?;
    assert!(status.success());
    assert!(stdout.contains("Exit codes"), "{stdout}");
    Ok(())
}

#[test]
fn completions_are_generated_for_each_shell() -> Result<()> {
    for (shell, needle) in [
        ("bash", "_roster()"),
        ("zsh", "#compdef roster"),
        ("fish", "complete -c roster"),
    ] {
        let (status, stdout, stderr) =
            Roster::spawn(&["completions", shell], &[])?.finish(COMMAND_WAIT)?;
        assert!(status.success(), "{shell}: {stderr}");
        assert!(stdout.contains(needle), "{shell}: {stdout}");
        assert!(
            stdout.contains("spawn") && stdout.contains("logs"),
            "{shell}"
        );
    }
    Ok(())
}
