//! What the conformance suite does not cover: the tmux side of things (sessions on the named
//! server, bytes in and out exactly, exit codes, clean-up of what an earlier run left), the
//! config, and that nothing internal leaks. Every test runs a real tmux on a server of its
//! own, killed when the test ends.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use registry_core::{
    FailReason, OutputEvent, OutputRequest, RegistryError, RuntimeId, RuntimeSource, SourceConfig,
    SourceEvent, SourceFactories, SourceKey, SourceWorker, SpawnRequest, WorkerState,
};
use source_tmux::{Profile, TmuxConfig, TmuxSource, KIND};

use common::{process_exists, wait_until, Server, WAIT};

fn shell(script: &str) -> SpawnRequest {
    SpawnRequest {
        profile: Some("shell".into()),
        args: vec![script.to_string()],
        ..Default::default()
    }
}

async fn wait_state(
    source: &TmuxSource,
    key: &SourceKey,
    what: &str,
    pred: impl Fn(&SourceWorker) -> bool,
) -> SourceWorker {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let w = source.get(key).await.expect("get");
        if pred(&w) {
            return w;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker is not {what} in time: {w:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_terminal(source: &TmuxSource, key: &SourceKey) -> SourceWorker {
    wait_state(source, key, "terminal", |w| w.state.is_terminal()).await
}

/// Reads a worker's whole output (following, until the stream closes): the bytes, and
/// whether `End` came last.
async fn read_output(source: &TmuxSource, key: &SourceKey) -> (Vec<u8>, bool) {
    let mut rx = source
        .output(
            key,
            OutputRequest {
                after: 0,
                follow: true,
            },
        )
        .await
        .expect("output");
    let mut bytes = Vec::new();
    let mut ended = false;
    while let Some(event) = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("the output stream ends in time")
    {
        assert!(!ended, "nothing comes after End");
        match event {
            OutputEvent::Chunk(c) => bytes.extend_from_slice(&c.data),
            OutputEvent::Gap { from, to } => panic!("unexpected gap {from}..={to}"),
            OutputEvent::End => ended = true,
        }
    }
    (bytes, ended)
}

/// Waits until a worker's output holds `needle` (so that what printed it has run).
async fn await_output(source: &TmuxSource, key: &SourceKey, needle: &[u8]) {
    let mut rx = source
        .output(
            key,
            OutputRequest {
                after: 0,
                follow: true,
            },
        )
        .await
        .expect("output");
    let mut seen = Vec::new();
    while !seen.windows(needle.len()).any(|w| w == needle) {
        match tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("output in time")
        {
            Some(OutputEvent::Chunk(c)) => seen.extend_from_slice(&c.data),
            other => panic!("unexpected {other:?} before {needle:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_worker_is_one_session_on_its_server_and_gone_after_stop() {
    let server = Server::new();
    let source = server.source();
    assert!(server.sessions().is_empty());
    let worker = source
        .spawn(shell("echo ready; while :; do sleep 0.1; done"))
        .await
        .unwrap();
    assert_eq!(worker.state, WorkerState::Running);
    let sessions = server.sessions();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let pane = server.pane_pids()[0];
    assert!(process_exists(pane));
    let has = server.tmux(&["has-session", "-t", &format!("={}", sessions[0])]);
    assert!(has.status.success());

    await_output(&source, &worker.key, b"ready\n").await;
    source
        .stop(&worker.key, Some(Duration::from_secs(5)))
        .await
        .unwrap();
    let ended = wait_terminal(&source, &worker.key).await;
    assert_eq!(ended.state, WorkerState::Stopped, "{ended:?}");
    assert!(ended.ended_at.is_some());
    wait_until("the session is gone", || server.sessions().is_empty()).await;
    wait_until("the worker's process is gone", || !process_exists(pane)).await;
    // The worker's output and nothing else: no word of the wrapper about the signal.
    let (output, end) = read_output(&source, &worker.key).await;
    assert_eq!(
        (String::from_utf8_lossy(&output).as_ref(), end),
        ("ready\n", true)
    );
    source.shutdown(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_bytes_arrive_exactly_and_are_not_echoed() {
    let server = Server::new();
    let source = server.source();
    // Non-ASCII, quotes of both kinds, a CR, a tab, a trailing `;` and a tmux format: each
    // would be changed by some way of passing keys to tmux.
    let first = "héllo wörld ✓ 'single' \"double\" \r\tend;".as_bytes();
    let second = "#{pane_pid} ~ $HOME `x` ; \\;\n".as_bytes();
    let total = first.len() + second.len();
    let received = server.state.path().join("received");
    let script = format!("head -c {total} > '{}'", received.display());
    let worker = source.spawn(shell(&script)).await.unwrap();
    source
        .input(&worker.key, Bytes::copy_from_slice(first))
        .await
        .unwrap();
    source
        .input(&worker.key, Bytes::copy_from_slice(second))
        .await
        .unwrap();
    let ended = wait_terminal(&source, &worker.key).await;
    assert_eq!(
        (ended.state, ended.exit_code),
        (WorkerState::Exited, Some(0))
    );
    let got = std::fs::read(&received).unwrap();
    assert_eq!(got, [first, second].concat());
    let (output, end) = read_output(&source, &worker.key).await;
    assert!(end);
    assert!(
        output.is_empty(),
        "the tty echoed the input: {:?}",
        String::from_utf8_lossy(&output)
    );
    assert!(matches!(
        source.input(&worker.key, Bytes::from_static(b"late")).await,
        Err(RegistryError::Conflict(_))
    ));
    source.shutdown(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_and_arguments_with_quotes_hashes_and_semicolons_pass_unchanged() {
    let server = Server::new();
    let odd = server.state.path().join("it's #{odd}; $x ~");
    std::fs::create_dir_all(&odd).unwrap();
    let mut config = server.config();
    config.profiles.insert(
        "here".into(),
        Profile {
            command: vec![
                "/bin/sh".into(),
                "-c".into(),
                "pwd; printf '%s|' \"$@\"".into(),
                "sh".into(),
            ],
            cwd: Some(odd.clone().into()),
            ..Default::default()
        },
    );
    let source = TmuxSource::new(config, odd.join("state #1;")).unwrap();
    let args = ["a;", ";", "\\;", "#{pane_pid}", "'", "", "-t"];
    let worker = source
        .spawn(SpawnRequest {
            profile: Some("here".into()),
            args: args.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        })
        .await
        .unwrap();
    let (output, end) = read_output(&source, &worker.key).await;
    assert!(end);
    let want = format!("{}\n{}|", odd.display(), args.join("|"));
    assert_eq!(String::from_utf8_lossy(&output), want);
    source.shutdown(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_and_signals_are_reported() {
    let server = Server::new();
    let source = server.source();
    let code = source.spawn(shell("echo bye; exit 42")).await.unwrap();
    let killed = source.spawn(shell("kill -KILL $$")).await.unwrap();
    let ok = source.spawn(shell("true")).await.unwrap();

    let code = wait_terminal(&source, &code.key).await;
    assert_eq!(
        (code.state, code.exit_code, code.reason),
        (WorkerState::Exited, Some(42), None)
    );
    assert!(code.ended_at.is_some() && code.started_at.is_some());
    let (output, end) = read_output(&source, &code.key).await;
    assert_eq!((output.as_slice(), end), (&b"bye\n"[..], true));

    let killed = wait_terminal(&source, &killed.key).await;
    assert_eq!(
        (killed.state, killed.exit_code, killed.reason),
        (WorkerState::Failed, None, Some(FailReason::Killed))
    );
    let (output, end) = read_output(&source, &killed.key).await;
    assert!(
        output.is_empty() && end,
        "{:?}",
        String::from_utf8_lossy(&output)
    );
    let ok = wait_terminal(&source, &ok.key).await;
    assert_eq!((ok.state, ok.exit_code), (WorkerState::Exited, Some(0)));
    source.shutdown(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_with_stdin_writes_it_first() {
    let server = Server::new();
    let source = server.source();
    let worker = source
        .spawn(SpawnRequest {
            stdin: Some("first line ✓\n".into()),
            ..shell("read a; read b; echo \"got:$a|$b\"")
        })
        .await
        .unwrap();
    source
        .input(&worker.key, Bytes::from_static(b"second\n"))
        .await
        .unwrap();
    let (output, end) = read_output(&source, &worker.key).await;
    assert!(end);
    assert_eq!(
        String::from_utf8_lossy(&output),
        "got:first line ✓|second\n"
    );
    source.shutdown(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_is_complete_when_workers_write_a_lot_and_exit_at_once() {
    let server = Server::new();
    let source = server.source_with(TmuxConfig {
        output_retention: 8 << 20,
        ..server.config()
    });
    // Several at once, so that the machine is busy as each one exits.
    let sizes = [
        1_000_000usize,
        2_500_000,
        333_333,
        524_288,
        524_288,
        524_288,
        524_288,
        65_537,
    ];
    let mut workers = Vec::new();
    for size in sizes {
        let script = format!("yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c {size}");
        workers.push(source.spawn(shell(&script)).await.unwrap());
    }
    for (worker, size) in workers.iter().zip(sizes) {
        let (output, end) = read_output(&source, &worker.key).await;
        assert!(end);
        let want: Vec<u8> = b"0123456789abcdefghijklmnopqrstuvwxyz\n"
            .iter()
            .copied()
            .cycle()
            .take(size)
            .collect();
        assert_eq!(output.len(), size);
        assert!(output == want, "the output differs from what was written");
        let ended = source.get(&worker.key).await.unwrap();
        assert_eq!(ended.exit_code, Some(0));
    }
    source.shutdown(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_is_the_profiles_and_the_requests_and_not_the_servers() {
    let server = Server::new();
    let mut config = server.config();
    config.profiles.insert(
        "env".into(),
        Profile {
            command: vec!["/bin/sh".into(), "-c".into(), "env".into()],
            env: BTreeMap::from([
                ("FROM_PROFILE".to_string(), "p 'q' \"r\" $x".to_string()),
                ("BOTH".to_string(), "profile".to_string()),
            ])
            .into(),
            ..Default::default()
        },
    );
    let source = server.source_with(config);
    let worker = source
        .spawn(SpawnRequest {
            profile: Some("env".into()),
            env: BTreeMap::from([
                ("BOTH".to_string(), "request".to_string()),
                ("MULTI".to_string(), "line1\nline2".to_string()),
            ])
            .into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let (output, _) = read_output(&source, &worker.key).await;
    let env = String::from_utf8_lossy(&output).into_owned();
    assert!(env.contains("FROM_PROFILE=p 'q' \"r\" $x\n"), "{env}");
    assert!(env.contains("BOTH=request\n"), "{env}");
    assert!(env.contains("MULTI=line1\nline2\n"), "{env}");
    // Of this process's environment only what the tmux clients pass on; then what tmux
    // and the shell set, and the profile's and the request's.
    let allowed = [
        "PATH",
        "HOME",
        "LANG",
        "LC_ALL",
        "LC_CTYPE",
        "TMUX_TMPDIR",
        "TERM",
        "TERM_PROGRAM",
        "TERM_PROGRAM_VERSION",
        "COLORTERM",
        "SHELL",
        "PWD",
        "OLDPWD",
        "SHLVL",
        "_",
        "FROM_PROFILE",
        "BOTH",
        "MULTI",
    ];
    let names: Vec<&str> = env
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .filter(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .collect();
    for name in &names {
        assert!(allowed.contains(name), "{name} reached the worker: {env}");
    }
    // This process has more (cargo's, the user's), which must not have passed.
    let ours: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| !allowed.contains(&k.as_str()))
        .collect();
    assert!(
        !ours.is_empty(),
        "the test needs a variable of its own to mean anything"
    );
    assert!(
        !names.contains(&"TMUX") && !names.contains(&"TMUX_PANE"),
        "{env}"
    );
    // The file that carried it is gone.
    let leftover: Vec<_> = std::fs::read_dir(server.state_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(leftover.is_empty(), "{leftover:?}");

    let err = source
        .spawn(SpawnRequest {
            env: BTreeMap::from([("NOT-A-NAME".to_string(), "x".to_string())]).into(),
            ..shell("true")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), "invalid_request");
    assert!(err.to_string().contains("`env`"), "{err}");
    source.shutdown(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_that_cannot_run_is_spawn_failed() {
    let server = Server::new();
    let source = server.source_with(TmuxConfig {
        allow_commands: true,
        ..server.config()
    });
    let not_executable = server.state.path().join("data.txt");
    std::fs::write(&not_executable, "echo no\n").unwrap();
    let mut bad_cwd = server.config();
    bad_cwd.profiles.insert(
        "nowhere".into(),
        Profile {
            command: vec!["/bin/sh".into(), "-c".into(), "true".into()],
            cwd: Some(server.state.path().join("missing-dir").into()),
            ..Default::default()
        },
    );
    for command in [
        vec!["/nonexistent/program".to_string()],
        vec!["no-such-program-on-path".to_string()],
        vec![not_executable.to_string_lossy().into_owned()],
    ] {
        let worker = source
            .spawn(SpawnRequest {
                command: Some(command.clone()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            (worker.state, worker.reason),
            (WorkerState::Failed, Some(FailReason::SpawnFailed)),
            "{command:?}"
        );
        assert!(worker.ended_at.is_some());
        let (output, end) = read_output(&source, &worker.key).await;
        assert!(output.is_empty() && end);
    }
    assert!(server.sessions().is_empty(), "{:?}", server.sessions());
    source.shutdown(None).await;

    let source = server.source_with(bad_cwd);
    let worker = source
        .spawn(SpawnRequest {
            profile: Some("nowhere".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        (worker.state, worker.reason),
        (WorkerState::Failed, Some(FailReason::SpawnFailed))
    );
    source.shutdown(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_checked_against_the_config() {
    let server = Server::new();
    let source = server.source_with(TmuxConfig {
        max_workers: 1,
        ..server.config()
    });
    let err = source
        .spawn(SpawnRequest {
            profile: Some("nope".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), "invalid_request");
    assert!(err.to_string().contains("shell"), "names the known: {err}");
    let err = source
        .spawn(SpawnRequest {
            command: Some(vec!["/bin/true".into()]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), "forbidden");

    let long = source
        .spawn(shell("while :; do sleep 0.1; done"))
        .await
        .unwrap();
    let err = source.spawn(shell("true")).await.unwrap_err();
    assert_eq!(err.code(), "capacity_exceeded");
    assert!(err.is_retryable());
    let err = source.remove(&long.key).await.unwrap_err();
    assert_eq!(err.code(), "conflict");
    source.stop(&long.key, None).await.unwrap();
    wait_terminal(&source, &long.key).await;
    // A slot is free again.
    let next = source.spawn(shell("true")).await.unwrap();
    wait_terminal(&source, &next.key).await;
    source.shutdown(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_records_are_removed_after_retain_finished_and_beyond_max_finished() {
    let server = Server::new();
    let source = server.source_with(TmuxConfig {
        retain_finished: Duration::from_millis(300),
        ..server.config()
    });
    let mut events = source.events().await.unwrap();
    let worker = source.spawn(shell("echo x")).await.unwrap();
    wait_terminal(&source, &worker.key).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("a Removed event in time")
            .expect("the stream stays open");
        if matches!(&event, SourceEvent::Removed(k) if *k == worker.key) {
            break;
        }
    }
    assert_eq!(
        source.get(&worker.key).await.unwrap_err().code(),
        "worker_not_found"
    );
    source.shutdown(None).await;

    let source = server.source_with(TmuxConfig {
        max_finished: 2,
        ..server.config()
    });
    let mut keys = Vec::new();
    for i in 0..4 {
        let w = source.spawn(shell(&format!("exit {i}"))).await.unwrap();
        wait_terminal(&source, &w.key).await;
        keys.push(w.key);
    }
    let list = source.list().await.unwrap();
    let listed: Vec<&SourceKey> = list.iter().map(|w| &w.key).collect();
    assert_eq!(listed, [&keys[2], &keys[3]], "the newest two are kept");
    source.shutdown(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_session_is_killed_from_outside_is_lost() {
    let server = Server::new();
    let source = server.source();
    let worker = source
        .spawn(shell(
            "trap '' HUP; echo ready; while :; do sleep 0.1; done",
        ))
        .await
        .unwrap();
    await_output(&source, &worker.key, b"ready\n").await;
    let pane = server.pane_pids()[0];
    let session = server.sessions()[0].clone();
    let (mut events, _) = (source.events().await.unwrap(), ());
    assert!(server
        .tmux(&["kill-session", "-t", &format!("={session}")])
        .status
        .success());
    let ended = wait_terminal(&source, &worker.key).await;
    assert_eq!(
        (ended.state, ended.reason),
        (WorkerState::Failed, Some(FailReason::Lost))
    );
    // Its process ignored the hangup; the source killed its group.
    wait_until("the lost worker's process is gone", || {
        !process_exists(pane)
    })
    .await;
    // The change was reported.
    let mut saw = false;
    while let Ok(Some(event)) =
        tokio::time::timeout(Duration::from_millis(500), events.recv()).await
    {
        if let SourceEvent::Upsert(w) = event {
            saw |= w.key == worker.key && w.state == WorkerState::Failed;
        }
    }
    assert!(saw, "no Upsert of the lost worker");
    source.shutdown(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_kills_a_worker_that_ignores_term_and_hup_and_its_children() {
    let server = Server::new();
    let source = server.source();
    let worker = source
        .spawn(shell(
            "trap '' TERM HUP; sleep 300 & echo ready; while :; do sleep 0.1; done",
        ))
        .await
        .unwrap();
    await_output(&source, &worker.key, b"ready\n").await;
    let pane = server.pane_pids()[0];
    source
        .stop(&worker.key, Some(Duration::from_millis(300)))
        .await
        .unwrap();
    assert_eq!(
        source.get(&worker.key).await.unwrap().state,
        WorkerState::Stopping
    );
    let ended = wait_terminal(&source, &worker.key).await;
    assert_eq!(ended.state, WorkerState::Stopped);
    wait_until("the process group is gone", || {
        // No process of the worker's group is left (the background `sleep 300` included).
        let out = Command::new("pgrep")
            .args(["-g", &pane.to_string()])
            .output()
            .expect("pgrep runs");
        out.stdout.is_empty()
    })
    .await;
    wait_until("the session is gone", || server.sessions().is_empty()).await;
    source.shutdown(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_every_live_worker_and_dropping_kills_what_is_left() {
    let server = Server::new();
    let source = server.source();
    let a = source.spawn(shell("sleep 300")).await.unwrap();
    let b = source
        .spawn(shell(
            "trap 'exit 3' TERM; echo trapped; while :; do sleep 0.1; done",
        ))
        .await
        .unwrap();
    assert_eq!(server.sessions().len(), 2);
    // Its trap is set once it says so.
    await_output(&source, &b.key, b"trapped\n").await;
    source.shutdown(Some(Duration::from_secs(5))).await;
    let a = source.get(&a.key).await.unwrap();
    let b = source.get(&b.key).await.unwrap();
    assert_eq!(a.state, WorkerState::Stopped);
    assert_eq!((b.state, b.exit_code), (WorkerState::Stopped, Some(3)));
    assert!(server.sessions().is_empty());
    let err = source.spawn(shell("true")).await.unwrap_err();
    assert_eq!(err.code(), "conflict");
    drop(source);

    // Dropped without a shutdown: its sessions go with it.
    let source = server.source();
    source.spawn(shell("trap '' HUP; sleep 300")).await.unwrap();
    let pane = server.pane_pids()[0];
    drop(source);
    assert!(server.sessions().is_empty(), "{:?}", server.sessions());
    wait_until("the dropped source's worker is gone", || {
        !process_exists(pane)
    })
    .await;
}

/// The helper of the next test, run in a child process: starts a source and a worker that
/// ignores SIGHUP, says `READY`, and waits to be killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by leftover_sessions_of_an_earlier_run_are_killed_at_start in a child process"]
async fn leftover_helper() {
    let (Some(socket), Some(state)) = (
        std::env::var_os("ROSTER_TMUX_TEST_SOCKET"),
        std::env::var_os("ROSTER_TMUX_TEST_STATE"),
    ) else {
        return;
    };
    let config = TmuxConfig {
        socket_name: Some(socket.into_string().unwrap().into()),
        profiles: BTreeMap::from([(
            "shell".to_string(),
            Profile {
                command: vec!["/bin/sh".into(), "-c".into()],
                ..Default::default()
            },
        )]),
        ..Default::default()
    };
    let source = TmuxSource::new(config, PathBuf::from(state)).unwrap();
    let worker = source
        .spawn(shell("trap '' HUP; while :; do sleep 0.1; done"))
        .await
        .unwrap();
    assert_eq!(worker.state, WorkerState::Running);
    println!("READY");
    std::io::Write::flush(&mut std::io::stdout()).unwrap();
    // Killed by the parent; `forget` so that nothing would clean up even if it were not.
    std::mem::forget(source);
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftover_sessions_of_an_earlier_run_are_killed_at_start() {
    let server = Server::new();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "leftover_helper", "--ignored", "--nocapture"])
        .env("ROSTER_TMUX_TEST_SOCKET", &server.socket)
        .env("ROSTER_TMUX_TEST_STATE", server.state_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.trim() == "READY" {
                let _ = tx.send(());
            }
        }
    });
    let ready = rx.recv_timeout(WAIT);
    if ready.is_err() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the helper did not start its worker");
    }
    // The earlier run ends the hard way: its sessions stay on the server.
    child.kill().unwrap();
    child.wait().unwrap();
    let sessions = server.sessions();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let pane = server.pane_pids()[0];
    assert!(process_exists(pane));

    // A source that runs now on the same server: its own worker must survive the next
    // source's clean-up.
    let live = server.source();
    let kept = live
        .spawn(shell("while :; do sleep 0.1; done"))
        .await
        .unwrap();
    wait_until("the first source's clean-up killed the leftover", || {
        !server.sessions().contains(&sessions[0])
    })
    .await;
    wait_until("the leftover worker's process is gone", || {
        !process_exists(pane)
    })
    .await;

    // A session named for an owner that no longer runs tells when the next source's
    // clean-up has run.
    let mut dead = Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    let marker = format!("roster-w{dead_pid}-0-1-1");
    assert!(server
        .tmux(&["new-session", "-d", "-s", &marker, "sleep", "300"])
        .status
        .success());
    let next = server.source();
    wait_until("the second clean-up killed the marker", || {
        !server.sessions().contains(&marker)
    })
    .await;
    assert_eq!(server.sessions().len(), 1, "{:?}", server.sessions());
    assert_eq!(
        live.get(&kept.key).await.unwrap().state,
        WorkerState::Running
    );
    assert!(next.list().await.unwrap().is_empty());
    live.shutdown(None).await;
    next.shutdown(None).await;
}

fn factories() -> SourceFactories {
    let mut factories = SourceFactories::new();
    factories.add::<source_tmux::TmuxSource>().unwrap();
    factories
}

fn table(runtime: &str, text: &str, state: PathBuf) -> SourceConfig {
    SourceConfig {
        runtime_id: RuntimeId::new(runtime).unwrap(),
        table: text.parse().expect("test TOML parses"),
        state_dir: state.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_factory_builds_a_working_source_with_a_default_socket_name() {
    let mut factories = factories();
    assert_eq!(factories.kinds(), [KIND]);
    assert_eq!(
        factories
            .add::<source_tmux::TmuxSource>()
            .unwrap_err()
            .code(),
        "conflict"
    );
    let runtime = format!("t{}-{}", std::process::id(), line!());
    let state = tempfile::tempdir().unwrap();
    // What the factory defaults `socket_name` to; the guard kills that server.
    let server = Server {
        socket: format!("roster-{runtime}"),
        state: tempfile::tempdir().unwrap(),
    };
    let source = factories
        .build(
            KIND,
            table(
                &runtime,
                "output_retention = \"64KiB\"\n[profiles.shell]\ncommand = [\"/bin/sh\", \"-c\"]",
                state.path().join("rt"),
            ),
        )
        .unwrap();
    let worker = source.spawn(shell("echo built; read x")).await.unwrap();
    assert_eq!(
        server.sessions().len(),
        1,
        "the session is on roster-{runtime}"
    );
    let mut rx = source
        .output(
            &worker.key,
            OutputRequest {
                after: 0,
                follow: true,
            },
        )
        .await
        .unwrap();
    source
        .input(&worker.key, Bytes::from_static(b"\n"))
        .await
        .unwrap();
    let mut text = Vec::new();
    while let Some(event) = tokio::time::timeout(WAIT, rx.recv()).await.unwrap() {
        if let OutputEvent::Chunk(c) = event {
            text.extend_from_slice(&c.data);
        }
    }
    assert_eq!(text, b"built\n");
    source.shutdown(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_errors_name_the_key() {
    common::require_tmux();
    let factories = factories();
    let state = tempfile::tempdir().unwrap();
    for (text, key) in [
        ("socket_nmae = \"x\"", "socket_nmae"),
        ("socket_name = \"a b\"", "socket_name"),
        ("max_workers = 0", "max_workers"),
        ("grace = \"soon\"", "grace"),
        ("output_retention = \"lots\"", "output_retention"),
        ("[profiles.x]\ncommand = []", "profiles.x.command"),
        ("[profiles.x]\ncommnd = [\"sh\"]", "commnd"),
        (
            "[profiles.x]\ncommand = [\"sh\"]\nenv = { \"A-B\" = \"1\" }",
            "profiles.x.env",
        ),
        ("tmux = \"/nonexistent/bin/tmux\"", "`tmux`"),
        ("tmux = \"no-such-tmux-program\"", "`tmux`"),
        ("tmux = \"/bin/false\"", "`tmux`"),
    ] {
        let err = match factories.build(KIND, table("cfg", text, state.path().join("x"))) {
            Ok(source) => {
                source.shutdown(None).await;
                panic!("{text} is accepted");
            }
            Err(err) => err,
        };
        assert!(err.message.contains(key), "{text}: {err}");
        assert_eq!(err.runtime, "cfg");
        for secret in ["/nonexistent", "no-such-tmux-program"] {
            assert!(!err.message.contains(secret), "{text}: {err}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_session_socket_or_path_leaks_in_errors_events_or_debug() {
    let server = Server::new();
    let source = server.source_with(TmuxConfig {
        max_workers: 1,
        ..server.config()
    });
    let mut events = source.events().await.unwrap();
    let mut texts: Vec<String> = Vec::new();
    let mut error = |e: RegistryError| texts.push(format!("{e} / {e:?}"));

    let live = source
        .spawn(SpawnRequest {
            request_id: Some("r1".into()),
            ..shell("while :; do sleep 0.1; done")
        })
        .await
        .unwrap();
    let session = server.sessions()[0].clone();
    for request in [
        SpawnRequest {
            profile: Some("nope".into()),
            ..Default::default()
        },
        SpawnRequest {
            command: Some(vec!["x".into()]),
            ..Default::default()
        },
        shell("true"),
        SpawnRequest {
            request_id: Some("r1".into()),
            ..shell("other")
        },
    ] {
        error(source.spawn(request).await.unwrap_err());
    }
    error(source.remove(&live.key).await.unwrap_err());
    error(
        source
            .output(
                &live.key,
                OutputRequest {
                    after: 99,
                    follow: false,
                },
            )
            .await
            .unwrap_err(),
    );
    for key in [
        SourceKey::new(format!("{}#x", live.key.as_str())),
        SourceKey::new("nothing"),
    ] {
        error(source.get(&key).await.unwrap_err());
        error(source.stop(&key, None).await.unwrap_err());
        error(
            source
                .input(&key, Bytes::from_static(b"x"))
                .await
                .unwrap_err(),
        );
    }
    source.stop(&live.key, None).await.unwrap();
    wait_terminal(&source, &live.key).await;
    error(
        source
            .input(&live.key, Bytes::from_static(b"x"))
            .await
            .unwrap_err(),
    );
    texts.push(format!("{source:?}"));
    texts.push(format!("{:?}", source.health().await));
    texts.push(format!("{:?}", server.config()));
    while let Ok(Some(event)) =
        tokio::time::timeout(Duration::from_millis(200), events.recv()).await
    {
        // Keys are internal authority the registry never shows; everything else of an
        // event is public.
        let public = match event {
            SourceEvent::Upsert(w) => format!(
                "{:?}",
                SourceWorker {
                    key: SourceKey::new(""),
                    ..w
                }
            ),
            SourceEvent::Resync(list) => format!(
                "{:?}",
                list.into_iter()
                    .map(|w| SourceWorker {
                        key: SourceKey::new(""),
                        ..w
                    })
                    .collect::<Vec<_>>()
            ),
            SourceEvent::Removed(_) => String::new(),
            SourceEvent::Health(h) => format!("{h:?}"),
        };
        texts.push(public);
    }
    let state = server.state.path().to_string_lossy().into_owned();
    for text in &texts {
        for secret in [&*session, &*server.socket, &*state, "roster-w", "/tmp"] {
            assert!(!text.contains(secret), "{secret} leaks in {text}");
        }
    }
    assert!(texts.len() > 15);
    source.shutdown(None).await;
}

/// Input posted right after the spawn's answer reaches the command, also on a loaded machine
/// where the command starts reading late: input accepted is delivered once the worker reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_right_after_spawn_is_delivered_under_load() {
    const ROUNDS: usize = 40;
    let server = Server::new();
    let source = server.source();
    // Load: busy threads on every core, for as long as the test runs (bounded by a flag).
    let busy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let spinners: Vec<_> = (0..2)
        .map(|_| {
            let busy = std::sync::Arc::clone(&busy);
            std::thread::spawn(move || {
                let mut n = 0u64;
                while busy.load(std::sync::atomic::Ordering::Relaxed) {
                    n = n.wrapping_add(1);
                    std::hint::black_box(n);
                }
            })
        })
        .collect();
    let source = std::sync::Arc::new(source);
    let rounds = (0..ROUNDS).map(|round| {
        let source = std::sync::Arc::clone(&source);
        async move {
            // Half of the commands start reading only after a moment, as a slow program would.
            let script = if round % 2 == 0 {
                "read line; echo \"got:$line\""
            } else {
                "sleep 0.2; read line; echo \"got:$line\""
            };
            let worker = source.spawn(shell(script)).await.unwrap();
            let line = format!("ping-{round}\n");
            source
                .input(&worker.key, Bytes::from(line.clone()))
                .await
                .unwrap();
            let ended = wait_terminal(&source, &worker.key).await;
            let (output, _) = read_output(&source, &worker.key).await;
            let output = String::from_utf8_lossy(&output).into_owned();
            (ended.exit_code != Some(0) || output != format!("got:{line}")).then_some((
                round,
                ended.state,
                output,
            ))
        }
    });
    // A few at once, so that the machine is busy starting panes too.
    let mut lost = Vec::new();
    let rounds: Vec<_> = rounds.collect();
    let mut rounds = rounds.into_iter();
    loop {
        let batch: Vec<_> = rounds.by_ref().take(8).collect();
        if batch.is_empty() {
            break;
        }
        let tasks: Vec<_> = batch.into_iter().map(tokio::spawn).collect();
        for task in tasks {
            lost.extend(task.await.unwrap());
        }
    }
    busy.store(false, std::sync::atomic::Ordering::Relaxed);
    for spinner in spinners {
        spinner.join().unwrap();
    }
    assert!(
        lost.is_empty(),
        "input lost in {} of {ROUNDS}: {lost:?}",
        lost.len()
    );
    source.shutdown(None).await;
}
