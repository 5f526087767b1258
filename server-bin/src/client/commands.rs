//! The subcommands, each a few calls of the public API.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io::{Read, Write};

use http::Method;
use serde_json::{json, Value};
use time::OffsetDateTime;

use super::error::ClientError;
use super::format::{self, Style};
use super::http::{query, segment, Api, Follow};
use super::resolve;
use super::{ClientCommand, Conn, LogsArgs, LsArgs, SpawnArgs};

/// Exit code after a second Ctrl-C (128 + SIGINT, as a shell reports it).
const EXIT_INTERRUPTED: u8 = 130;
/// The most bytes of stdin sent in one input call.
const INPUT_CHUNK: usize = 64 << 10;
/// The most lines `--tail` keeps.
const MAX_TAIL: usize = 1_000_000;

/// Runs one subcommand; `Ok` holds the exit code.
pub async fn run(command: ClientCommand) -> Result<u8, ClientError> {
    match command {
        ClientCommand::Runtimes { conn } => runtimes(&conn).await,
        ClientCommand::Ls(args) => ls(args).await,
        ClientCommand::Get {
            worker,
            runtime,
            conn,
        } => get(&conn, &worker, runtime.as_deref()).await,
        ClientCommand::Spawn(args) => spawn(args).await,
        ClientCommand::Logs(args) => logs(args).await,
        ClientCommand::Input {
            worker,
            data,
            runtime,
            conn,
        } => input(&conn, &worker, data, runtime.as_deref()).await,
        ClientCommand::Stop {
            workers,
            grace,
            runtime,
            conn,
        } => {
            let body = match grace {
                Some(g) => json!({ "grace_ms": u64::try_from(g.as_millis()).unwrap_or(u64::MAX) }),
                None => json!({}),
            };
            each_worker(
                &conn,
                &workers,
                runtime.as_deref(),
                "stopping",
                |api, id| {
                    let body = body.clone();
                    async move {
                        api.call(
                            Method::POST,
                            &format!("/v1/workers/{}/stop", segment(&id)),
                            Some(&body),
                        )
                        .await
                    }
                },
            )
            .await
        }
        ClientCommand::Rm {
            workers,
            runtime,
            conn,
        } => {
            each_worker(
                &conn,
                &workers,
                runtime.as_deref(),
                "removed",
                |api, id| async move {
                    api.call(
                        Method::DELETE,
                        &format!("/v1/workers/{}", segment(&id)),
                        None,
                    )
                    .await
                },
            )
            .await
        }
        ClientCommand::Events {
            runtime,
            cursor,
            conn,
        } => events(&conn, runtime.as_deref(), cursor).await,
        ClientCommand::Reload { conn } => reload(&conn).await,
        ClientCommand::Completions { .. } => Ok(0),
    }
}

/// The client of `--server` with the token of `--token-file` or `ROSTER_TOKEN`.
fn connect(conn: &Conn) -> Result<Api, ClientError> {
    let token = match &conn.token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ClientError::Usage(format!(
                    "cannot read the token file {}: {e}",
                    path.display()
                ))
            })?;
            let token = text.trim().to_string();
            if token.is_empty() {
                return Err(ClientError::Usage(format!(
                    "the token file {} is empty",
                    path.display()
                )));
            }
            Some(token)
        }
        None => std::env::var("ROSTER_TOKEN")
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty()),
    };
    Api::new(&conn.server, token)
}

/// Writes to stdout; a closed pipe (`roster logs | head`) ends the program quietly.
fn out(bytes: &[u8]) -> Result<(), ClientError> {
    write_to(&mut std::io::stdout().lock(), bytes)
}

fn write_to(w: &mut dyn Write, bytes: &[u8]) -> Result<(), ClientError> {
    match w.write_all(bytes).and_then(|()| w.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(ClientError::Other(format!("writing the output: {e}"))),
    }
}

/// One JSON object on a line of its own.
fn out_json(value: &Value) -> Result<(), ClientError> {
    out(format!("{value}\n").as_bytes())
}

fn out_line(text: &str) -> Result<(), ClientError> {
    out(format!("{text}\n").as_bytes())
}

async fn runtimes(conn: &Conn) -> Result<u8, ClientError> {
    let api = connect(conn)?;
    let body = api.get("/v1/runtimes").await?;
    let list = body["runtimes"].as_array().cloned().unwrap_or_default();
    if conn.json() {
        for r in &list {
            out_json(r)?;
        }
    } else {
        let now = OffsetDateTime::now_utc();
        out_line(&format::runtimes_table(Style::detect(), &list, now).to_string())?;
    }
    Ok(0)
}

fn is_terminal_state(state: &str) -> bool {
    matches!(state, "exited" | "stopped" | "failed")
}

/// Whether `ls` shows this worker.
fn shown(worker: &Value, args: &LsArgs) -> bool {
    let state = worker["state"].as_str().unwrap_or_default();
    if let Some(want) = &args.state {
        if state != want {
            return false;
        }
    } else if !args.all && is_terminal_state(state) {
        return false;
    }
    if let Some(r) = &args.runtime {
        if worker["runtime_id"].as_str() != Some(r) {
            return false;
        }
    }
    args.labels
        .iter()
        .all(|(k, v)| worker["labels"][k].as_str() == Some(v.as_str()))
}

fn print_workers(json: bool, workers: &[Value]) -> Result<(), ClientError> {
    if json {
        for w in workers {
            out_json(w)?;
        }
    } else if workers.is_empty() {
        eprintln!("roster: no workers");
    } else {
        let now = OffsetDateTime::now_utc();
        out_line(&format::workers_table(Style::detect(), workers, now).to_string())?;
    }
    Ok(())
}

async fn ls(args: LsArgs) -> Result<u8, ClientError> {
    let api = connect(&args.conn)?;
    let json = args.conn.json();
    if !args.watch {
        let workers = resolve::list_all(
            &api,
            args.runtime.as_deref(),
            args.state.as_deref(),
            &args.labels,
        )
        .await?;
        let workers: Vec<Value> = workers.into_iter().filter(|w| shown(w, &args)).collect();
        print_workers(json, &workers)?;
        return Ok(0);
    }
    if let Some(state) = &args.state {
        // The stream is not filtered by state: check the word the way a list would.
        api.get(&format!(
            "/v1/workers{}",
            query([("state", state.as_str()), ("limit", "1")])
        ))
        .await?;
    }
    let path = format!(
        "/v1/events{}",
        query(args.runtime.as_deref().map(|r| ("runtime", r)))
    );
    let mut stream = api.follow(path, None, false);
    // Workers printed so far: a change of one of them is printed even when it leaves the
    // filter (a worker that ends shows its end).
    let mut printed: HashSet<String> = HashSet::new();
    while let Some(event) = stream.next().await? {
        let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
        match event.event.as_str() {
            "snapshot" => {
                let workers: Vec<Value> = data["workers"]
                    .as_array()
                    .map(|a| a.iter().filter(|w| shown(w, &args)).cloned().collect())
                    .unwrap_or_default();
                printed = workers
                    .iter()
                    .filter_map(|w| w["id"].as_str().map(str::to_string))
                    .collect();
                print_workers(json, &workers)?;
            }
            "worker.upserted" => {
                let w = &data["worker"];
                let id = w["id"].as_str().unwrap_or_default().to_string();
                if shown(w, &args) || printed.contains(&id) {
                    if json {
                        out_json(w)?;
                    } else {
                        out_line(&format::worker_line(w, OffsetDateTime::now_utc()))?;
                    }
                    printed.insert(id);
                }
            }
            "worker.removed" => {
                let id = data["worker_id"].as_str().unwrap_or_default();
                if printed.remove(id) {
                    if json {
                        out_json(&data)?;
                    } else {
                        out_line(&format!("{id}  removed"))?;
                    }
                }
            }
            "reset" => eprintln!(
                "roster: the event stream was reset ({}); the whole list follows",
                data["reason"].as_str().unwrap_or("unknown reason")
            ),
            _ => {}
        }
    }
    Ok(0)
}

async fn get(conn: &Conn, given: &str, runtime: Option<&str>) -> Result<u8, ClientError> {
    let api = connect(conn)?;
    let worker = resolve::worker(&api, given, runtime).await?;
    if conn.json() {
        out_json(&worker)?;
    } else {
        out(format::worker_fields(&worker, OffsetDateTime::now_utc()).as_bytes())?;
    }
    Ok(0)
}

/// The runtime to spawn in: the one given, or the only one there is.
async fn spawn_runtime(api: &Api, given: Option<String>) -> Result<String, ClientError> {
    if let Some(r) = given {
        return Ok(r);
    }
    let body = api.get("/v1/runtimes").await?;
    let ids: Vec<&str> = body["runtimes"]
        .as_array()
        .map(|a| a.iter().filter_map(|r| r["id"].as_str()).collect())
        .unwrap_or_default();
    match ids.as_slice() {
        [one] => Ok((*one).to_string()),
        [] => Err(ClientError::Other("the server has no runtimes".into())),
        many => Err(ClientError::Usage(format!(
            "the server has {} runtimes ({}); choose one with -r RUNTIME",
            many.len(),
            many.join(", ")
        ))),
    }
}

/// The text of `--stdin FILE|-`.
fn read_stdin_arg(path: &std::path::Path) -> Result<String, ClientError> {
    let mut bytes = Vec::new();
    let read = if path.as_os_str() == "-" {
        std::io::stdin().lock().read_to_end(&mut bytes)
    } else {
        std::fs::File::open(path).and_then(|mut f| f.read_to_end(&mut bytes))
    };
    read.map_err(|e| ClientError::Usage(format!("--stdin {}: {e}", path.display())))?;
    String::from_utf8(bytes).map_err(|_| {
        ClientError::Usage(format!(
            "--stdin {}: not UTF-8 text (input is sent as text)",
            path.display()
        ))
    })
}

async fn spawn(args: SpawnArgs) -> Result<u8, ClientError> {
    let mut body = serde_json::Map::new();
    match &args.profile {
        Some(profile) => {
            body.insert("profile".into(), json!(profile));
            if !args.command.is_empty() {
                body.insert("args".into(), json!(args.command));
            }
        }
        None if args.command.is_empty() => {
            return Err(ClientError::Usage(
                "nothing to run: give --profile PROFILE, or a command after `--` \
                 (roster spawn -- make test)"
                    .into(),
            ))
        }
        None => {
            body.insert("command".into(), json!(args.command));
        }
    }
    if let Some(name) = &args.name {
        body.insert("name".into(), json!(name));
    }
    if !args.labels.is_empty() {
        body.insert("labels".into(), json!(to_map(&args.labels)));
    }
    if !args.env.is_empty() {
        body.insert("env".into(), json!(to_map(&args.env)));
    }
    if let Some(path) = &args.stdin {
        body.insert("stdin".into(), json!(read_stdin_arg(path)?));
    }
    let api = connect(&args.conn)?;
    let runtime = spawn_runtime(&api, args.runtime.clone()).await?;
    // Ctrl-C is taken over before the worker exists, so no interrupt can kill this command
    // and leave the worker running unseen.
    let mut interrupt = match args.follow {
        true => Some(
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .map_err(|e| ClientError::Other(format!("listening for Ctrl-C: {e}")))?,
        ),
        false => None,
    };
    let worker = api
        .call(
            Method::POST,
            &format!("/v1/runtimes/{}/workers", segment(&runtime)),
            Some(&Value::Object(body)),
        )
        .await?;
    let id = worker["id"].as_str().unwrap_or_default().to_string();
    if !args.follow {
        if args.conn.json() {
            out_json(&worker)?;
        } else {
            out_line(&id)?;
        }
        return Ok(0);
    }
    let end = follow_output(&api, &id, None, true, interrupt.as_mut(), &mut print_chunk).await?;
    Ok(exit_code(&end))
}

fn to_map(pairs: &[(String, String)]) -> BTreeMap<&str, &str> {
    pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// The exit code a finished worker stands for: its own code when it exited; as a shell
/// reports a signal when it was stopped (143, SIGTERM) or killed (137, SIGKILL); 127 when
/// it could not start; 1 when it was lost or is not finished.
pub fn exit_code(worker: &Value) -> u8 {
    match worker["state"].as_str().unwrap_or_default() {
        "exited" => worker["exit_code"]
            .as_i64()
            .map_or(0, |c| u8::try_from(c).unwrap_or(1)),
        "stopped" => 143,
        "failed" => match worker["reason"].as_str() {
            Some("killed") => 137,
            Some("spawn_failed") => 127,
            _ => 1,
        },
        _ => 1,
    }
}

/// Writes one chunk as the worker wrote it.
fn print_chunk(stream: &str, data: &str) -> Result<(), ClientError> {
    if stream == "stderr" {
        write_to(&mut std::io::stderr().lock(), data.as_bytes())
    } else {
        out(data.as_bytes())
    }
}

/// Reads a worker's output stream from after `after` (none: from the start) to its `end`
/// (with `follow`: until the worker has ended; without: what is retained), handing each
/// chunk to `sink`; returns the worker as the last `state` event showed it. With an
/// `interrupt` signal, Ctrl-C stops the worker (and the stream goes on to its end); a
/// second Ctrl-C leaves.
async fn follow_output(
    api: &Api,
    id: &str,
    after: Option<u64>,
    follow: bool,
    mut interrupt: Option<&mut tokio::signal::unix::Signal>,
    sink: &mut dyn FnMut(&str, &str) -> Result<(), ClientError>,
) -> Result<Value, ClientError> {
    let path = format!(
        "/v1/workers/{}/output{}",
        segment(id),
        query((!follow).then_some(("follow", "0")))
    );
    let mut stream = api.follow(path, after.map(|a| a.to_string()), !follow);
    let mut worker = Value::Null;
    let mut interrupts = 0u32;
    loop {
        let next = if let Some(signal) = interrupt.as_deref_mut() {
            tokio::select! {
                event = stream.next() => event?,
                _ = signal.recv() => {
                    interrupts += 1;
                    if interrupts > 1 {
                        std::process::exit(i32::from(EXIT_INTERRUPTED));
                    }
                    eprintln!("roster: stopping {id} (Ctrl-C again to leave it running)");
                    api.call(Method::POST, &format!("/v1/workers/{}/stop", segment(id)), Some(&json!({})))
                        .await?;
                    continue;
                }
            }
        } else {
            stream.next().await?
        };
        let Some(event) = next else { break };
        let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
        match event.event.as_str() {
            "output" => sink(
                data["stream"].as_str().unwrap_or("stdout"),
                data["data"].as_str().unwrap_or_default(),
            )?,
            "state" => worker = data["worker"].clone(),
            "gap" => eprintln!(
                "roster: output {}..{} is no longer retained",
                data["from"], data["to"]
            ),
            "end" => break,
            _ => {}
        }
    }
    if worker.is_null() || !follow {
        worker = api.get(&format!("/v1/workers/{}", segment(id))).await?;
    }
    Ok(worker)
}

/// The last lines of the output, across chunks, each with its stream.
#[derive(Debug)]
struct Tail {
    lines: VecDeque<(String, String)>,
    keep: usize,
}

impl Tail {
    fn push(&mut self, stream: &str, data: &str) {
        for piece in data.split_inclusive('\n') {
            match self.lines.back_mut() {
                Some((s, line)) if s == stream && !line.ends_with('\n') => line.push_str(piece),
                _ => self
                    .lines
                    .push_back((stream.to_string(), piece.to_string())),
            }
            while self.lines.len() > self.keep {
                self.lines.pop_front();
            }
        }
    }
}

async fn logs(args: LogsArgs) -> Result<u8, ClientError> {
    let api = connect(&args.conn)?;
    let worker = resolve::worker(&api, &args.worker, args.runtime.as_deref()).await?;
    let id = worker["id"].as_str().unwrap_or_default().to_string();
    let mut after = args.since_seq;
    if let Some(keep) = args.tail {
        let mut tail = Tail {
            lines: VecDeque::new(),
            keep: keep.min(MAX_TAIL),
        };
        let mut seen: Option<u64> = None;
        let mut collect = |stream: &str, data: &str| {
            tail.push(stream, data);
            Ok(())
        };
        let path = format!("/v1/workers/{}/output?follow=0", segment(&id));
        let mut stream: Follow<'_> = api.follow(path, after.map(|a| a.to_string()), true);
        while let Some(event) = stream.next().await? {
            let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
            match event.event.as_str() {
                "output" => {
                    collect(
                        data["stream"].as_str().unwrap_or("stdout"),
                        data["data"].as_str().unwrap_or_default(),
                    )?;
                    seen = data["seq"].as_u64().or(seen);
                }
                "end" => break,
                _ => {}
            }
        }
        for (stream, line) in &tail.lines {
            print_chunk(stream, line)?;
        }
        if !args.follow {
            return Ok(0);
        }
        after = seen.or(after);
    }
    let end = follow_output(&api, &id, after, args.follow, None, &mut print_chunk).await?;
    Ok(if args.follow { exit_code(&end) } else { 0 })
}

async fn input(
    conn: &Conn,
    given: &str,
    data: Option<String>,
    runtime: Option<&str>,
) -> Result<u8, ClientError> {
    let api = connect(conn)?;
    let worker = resolve::worker(&api, given, runtime).await?;
    let path = format!(
        "/v1/workers/{}/input",
        segment(worker["id"].as_str().unwrap_or_default())
    );
    if let Some(text) = data.filter(|d| d != "-") {
        api.call(
            Method::POST,
            &path,
            Some(&json!({ "data": format!("{text}\n") })),
        )
        .await?;
        return Ok(0);
    }
    // This terminal's stdin, a line (or at most INPUT_CHUNK bytes) at a time, as it comes.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<String, String>>(4);
    std::thread::spawn(move || read_stdin_chunks(&tx));
    while let Some(chunk) = rx.recv().await {
        let chunk = chunk.map_err(ClientError::Usage)?;
        api.call(Method::POST, &path, Some(&json!({ "data": chunk })))
            .await?;
    }
    Ok(0)
}

/// Reads stdin to its end, sending text chunks that end at a newline (or hold
/// [`INPUT_CHUNK`] bytes, never splitting a character).
fn read_stdin_chunks(tx: &tokio::sync::mpsc::Sender<Result<String, String>>) {
    let stdin = std::io::stdin();
    let mut reader = std::io::BufReader::new(stdin.lock());
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let mut buf = Vec::new();
        let limit = (INPUT_CHUNK - pending.len()) as u64;
        let n = match std::io::BufRead::read_until(&mut (&mut reader).take(limit), b'\n', &mut buf)
        {
            Ok(n) => n,
            Err(e) => {
                let _ = tx.blocking_send(Err(format!("reading stdin: {e}")));
                return;
            }
        };
        pending.extend_from_slice(&buf);
        let at_end = n == 0;
        if pending.is_empty() {
            return;
        }
        let text = match std::str::from_utf8(&pending) {
            Ok(t) => t.to_string(),
            // An incomplete character at the end waits for its other bytes.
            Err(e) if e.error_len().is_none() && !at_end => {
                let valid = e.valid_up_to();
                let t = String::from_utf8_lossy(&pending[..valid]).into_owned();
                pending.drain(..valid);
                if t.is_empty() {
                    continue;
                }
                if tx.blocking_send(Ok(t)).is_err() {
                    return;
                }
                continue;
            }
            Err(_) => {
                let _ =
                    tx.blocking_send(Err("stdin is not UTF-8 text (input is sent as text)".into()));
                return;
            }
        };
        pending.clear();
        if tx.blocking_send(Ok(text)).is_err() || at_end {
            return;
        }
    }
}

/// Resolves each worker and does `action` to it, printing `done` and the id (or the
/// answer's JSON); a failure is reported and the others still go on. The exit code is the
/// first failure's.
async fn each_worker<F, Fut>(
    conn: &Conn,
    workers: &[String],
    runtime: Option<&str>,
    done: &str,
    action: F,
) -> Result<u8, ClientError>
where
    F: Fn(Api, String) -> Fut,
    Fut: std::future::Future<Output = Result<Value, ClientError>>,
{
    let api = connect(conn)?;
    let mut code = 0;
    for given in workers {
        let result = async {
            let worker = resolve::worker(&api, given, runtime).await?;
            let id = worker["id"].as_str().unwrap_or_default().to_string();
            let answer = action(api.clone(), id.clone()).await?;
            Ok::<_, ClientError>((worker, id, answer))
        }
        .await;
        match result {
            Ok((worker, id, answer)) => {
                if conn.json() {
                    out_json(if answer.is_null() { &worker } else { &answer })?;
                } else {
                    out_line(&format!("{done} {id} ({})", format::name(&worker)))?;
                }
            }
            // The server is gone: the others will not do better.
            Err(e @ ClientError::Unreachable { .. }) => return Err(e),
            Err(e) => {
                if code == 0 {
                    code = e.exit_code();
                }
                e.report();
            }
        }
    }
    Ok(code)
}

/// One line for an event: what changed, briefly.
fn event_summary(kind: &str, data: &Value, now: OffsetDateTime) -> String {
    match kind {
        "snapshot" => format!(
            "{} runtimes, {} workers",
            data["runtimes"].as_array().map_or(0, Vec::len),
            data["workers"].as_array().map_or(0, Vec::len)
        ),
        "runtime.updated" => {
            let r = &data["runtime"];
            format!(
                "{}  {}  {}  workers: {}",
                r["id"].as_str().unwrap_or_default(),
                r["kind"].as_str().unwrap_or_default(),
                r["health"]["status"].as_str().unwrap_or_default(),
                format::counts(&r["workers"])
            )
        }
        "worker.upserted" => format::worker_line(&data["worker"], now),
        "worker.removed" => format!(
            "{}  {}",
            data["worker_id"].as_str().unwrap_or_default(),
            data["runtime_id"].as_str().unwrap_or_default()
        ),
        "runtime.removed" => data["runtime_id"].as_str().unwrap_or_default().to_string(),
        "reset" => format!(
            "{}; a fresh snapshot follows",
            data["reason"].as_str().unwrap_or("unknown reason")
        ),
        _ => data.to_string(),
    }
}

/// `POST /v1/admin/reload`; prints what changed, one line per kind of change.
async fn reload(conn: &Conn) -> Result<u8, ClientError> {
    let api = connect(conn)?;
    let outcome = api
        .call(Method::POST, "/v1/admin/reload", Some(&json!({})))
        .await?;
    if conn.json() {
        out_json(&outcome)?;
    } else {
        out_line(&reload_summary(&outcome))?;
    }
    Ok(0)
}

/// `added: b, c` and so on, a line for each list that is not empty; "nothing changed" when
/// all are.
fn reload_summary(outcome: &Value) -> String {
    let list = |key: &str| -> Vec<String> {
        outcome[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    };
    let replaced = list("replaced");
    let changed: Vec<String> = list("changed")
        .into_iter()
        .map(|id| {
            let how = if replaced.contains(&id) {
                "replaced"
            } else {
                "in place"
            };
            format!("{id} ({how})")
        })
        .collect();
    let mut lines = Vec::new();
    for (label, items) in [
        ("added", list("added")),
        ("removed", list("removed")),
        ("changed", changed),
        ("applied", list("applied")),
        ("needs a restart", list("needs_restart")),
    ] {
        if !items.is_empty() {
            lines.push(format!("{label}: {}", items.join(", ")));
        }
    }
    if lines.is_empty() {
        lines.push("nothing changed".to_string());
    }
    let unchanged = list("unchanged");
    if !unchanged.is_empty() {
        lines.push(format!("unchanged: {}", unchanged.join(", ")));
    }
    lines.join("\n")
}

async fn events(
    conn: &Conn,
    runtime: Option<&str>,
    cursor: Option<String>,
) -> Result<u8, ClientError> {
    let api = connect(conn)?;
    let path = format!("/v1/events{}", query(runtime.map(|r| ("runtime", r))));
    let mut stream = api.follow(path, cursor, false);
    while let Some(event) = stream.next().await? {
        let data: Value =
            serde_json::from_str(&event.data).unwrap_or_else(|_| Value::String(event.data.clone()));
        if conn.json() {
            out_json(&json!({ "cursor": event.id, "event": event.event, "data": data }))?;
        } else {
            let now = OffsetDateTime::now_utc();
            out_line(&format!(
                "{:02}:{:02}:{:02}  {:<16} {}",
                now.hour(),
                now.minute(),
                now.second(),
                event.event,
                event_summary(&event.event, &data, now)
            ))?;
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_summary_names_each_change_and_how() {
        let outcome = json!({
            "added": ["b"], "removed": ["c"], "changed": ["a", "d"], "replaced": ["d"],
            "unchanged": ["local"], "applied": [], "needs_restart": ["server.listen"]
        });
        assert_eq!(
            reload_summary(&outcome),
            "added: b\nremoved: c\nchanged: a (in place), d (replaced)\n\
             needs a restart: server.listen\nunchanged: local"
        );
        let nothing = json!({"added": [], "removed": [], "changed": [], "replaced": [],
                             "unchanged": ["local"], "applied": [], "needs_restart": []});
        assert_eq!(
            reload_summary(&nothing),
            "nothing changed\nunchanged: local"
        );
    }

    #[test]
    fn exit_codes_follow_the_worker() {
        assert_eq!(exit_code(&json!({"state": "exited", "exit_code": 0})), 0);
        assert_eq!(exit_code(&json!({"state": "exited", "exit_code": 3})), 3);
        assert_eq!(exit_code(&json!({"state": "stopped"})), 143);
        assert_eq!(
            exit_code(&json!({"state": "failed", "reason": "killed"})),
            137
        );
        assert_eq!(
            exit_code(&json!({"state": "failed", "reason": "spawn_failed"})),
            127
        );
        assert_eq!(exit_code(&json!({"state": "failed", "reason": "lost"})), 1);
    }

    #[test]
    fn tail_keeps_the_last_lines_across_chunks() {
        let mut tail = Tail {
            lines: VecDeque::new(),
            keep: 2,
        };
        tail.push("stdout", "one\ntw");
        tail.push("stdout", "o\nthree\n");
        tail.push("stderr", "oops\n");
        let lines: Vec<&str> = tail.lines.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(lines, ["three\n", "oops\n"]);
        assert_eq!(tail.lines[1].0, "stderr");
    }
}
