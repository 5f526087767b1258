//! Connection hygiene under attack, through the real server on real sockets: slowloris
//! (trickled heads, reconnecting when cut) from one address and from many, with and
//! without tokens; thousands of open event streams; header floods; a second `Host` or
//! `Authorization`; the stream caps; the idle and header timeouts. Every refusal is a
//! clear answer, counted on `/metrics` by limit, and names no peer, token or path.
//!
//! The attacks need many sockets: the test raises its own `RLIMIT_NOFILE` soft limit to
//! the hard limit and scales the counts down (saying so) where the hard limit is too low.
//! Every loop is bounded by a stop flag and a deadline; the figures printed (a normal
//! client's latency during an attack) are for the report, never asserted.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::Value;
use server_bin::config::{LoadedToken, Scope};
use server_bin::ServeOptions;
use testkit::{connect_from, eventually, send_request_on, TestResponse, TestServer, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

const READ_SECRET: &str = "limits-read-secret-0123456789";
const OTHER_SECRET: &str = "limits-other-secret-0123456789";
const OPERATE_SECRET: &str = "limits-operate-secret-0123456789";

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit; returns the soft limit
/// now in force.
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// `wanted` sockets' worth of a count, scaled down to what the descriptor limit holds:
/// each connection costs two descriptors here (the server runs in this process), and
/// `reserve` are kept for everything else.
fn scaled(wanted: usize, per_unit: u64, reserve: u64, test: &str) -> usize {
    let limit = raise_nofile();
    let fits = usize::try_from(limit.saturating_sub(reserve) / per_unit).unwrap_or(usize::MAX);
    if fits < wanted {
        eprintln!(
            "{test}: RLIMIT_NOFILE is {limit}: {fits} instead of {wanted} (the hard limit is \
             too low for the full count)"
        );
        fits.max(1)
    } else {
        wanted
    }
}

fn ip(a: u8, b: u8, c: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, a, b, c))
}

fn token(name: &str, secret: &str) -> LoadedToken {
    LoadedToken {
        name: name.into(),
        scope: Scope::Read,
        secret: secret.to_string().into(),
    }
}

/// One GET from `local` on a fresh connection, with `headers`, read to its end.
async fn get_from(
    local: IpAddr,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<TestResponse> {
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header("host", format!("127.0.0.1:{}", addr.port()));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::new()))?;
    let stream = connect_from(local, addr).await?;
    TestResponse::read(send_request_on(stream, req).await?).await
}

/// Writes `bytes` on a fresh connection from `local` and reads until the server closes
/// it (or `WAIT` passes). A reset after some bytes counts as the end.
async fn raw_exchange(local: IpAddr, addr: SocketAddr, bytes: &[u8]) -> Result<Vec<u8>> {
    let mut stream = connect_from(local, addr).await?;
    // The server may answer and close before all of it is written (a refusal, a head past
    // hyper's own limits): what it answered is what counts.
    let _ = stream.write_all(bytes).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.context("the server neither answered nor closed the connection")?;
    Ok(got)
}

/// A raw answer split into its status, its head and its body.
fn parse_raw(bytes: &[u8]) -> Result<(u16, String, String)> {
    let text = String::from_utf8_lossy(bytes).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("not an HTTP answer: {text:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status: {head:?}"))?;
    Ok((status, head.to_ascii_lowercase(), body.to_string()))
}

/// The value of `roster_limit_refusals_total{limit="key"}` on `/metrics`, and the page.
async fn refusals(
    server: &TestServer,
    key: &str,
    headers: &[(&str, &str)],
) -> Result<(u64, String)> {
    let page = get_from(ip(0, 0, 1), server.addr, "/metrics", headers).await?;
    server.seen().record_response(&page);
    let text = page.text();
    let line = format!("roster_limit_refusals_total{{limit=\"{key}\"}} ");
    let n = text
        .lines()
        .find_map(|l| l.strip_prefix(&line))
        .with_context(|| format!("no {line:?} on /metrics: {text}"))?
        .trim()
        .parse()?;
    Ok((n, text))
}

/// Waits until `roster_limit_refusals_total{limit="key"}` is at least `min`: a connection
/// closed at a timeout is counted just after it closes.
async fn refusals_reach(server: &TestServer, key: &str, min: u64) -> Result<()> {
    eventually(
        &format!("{key} to count {min} closed connections"),
        WAIT,
        || async {
            let (n, _) = refusals(server, key, &[]).await?;
            Ok((n >= min).then_some(()))
        },
    )
    .await
}

/// What a flock of slow clients did.
#[derive(Default)]
struct Flock {
    stop: AtomicBool,
    /// Connections open now (accepted and not yet cut).
    open: AtomicU64,
    connects: AtomicU64,
    /// Connections the server cut or refused.
    cut: AtomicU64,
    /// Answers `429` (refused at a connection limit) with a JSON `capacity_exceeded`.
    refused_429: AtomicU64,
    /// Every answer the server gave them, for the search of what it may never say.
    answers: std::sync::Mutex<Vec<u8>>,
}

/// One slowloris client from `local`: sends a request line and then one header byte every
/// `every`, never ending the head; reconnects when the server cuts or refuses it, until
/// `flock.stop` (or the deadline).
/// `pause` between a cut and the next connection keeps the churn of the test within what
/// the machine it shares can take.
async fn slowloris(
    flock: Arc<Flock>,
    local: IpAddr,
    addr: SocketAddr,
    every: Duration,
    pause: Duration,
) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !flock.stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let Ok(mut stream) = connect_from(local, addr).await else {
            // Out of ports or descriptors for a moment: pace the retry.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        flock.connects.fetch_add(1, Ordering::Relaxed);
        flock.open.fetch_add(1, Ordering::Relaxed);
        let head = format!(
            "GET /v1/runtimes HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nX-Slow: ",
            addr.port()
        );
        let mut alive = stream.write_all(head.as_bytes()).await.is_ok();
        let mut tick = tokio::time::interval(every);
        let mut buf = [0u8; 2048];
        let mut answer = Vec::new();
        while alive && !flock.stop.load(Ordering::Relaxed) {
            tokio::select! {
                read = stream.read(&mut buf) => match read {
                    Ok(n) if n > 0 => answer.extend_from_slice(&buf[..n]),
                    _ => alive = false,
                },
                _ = tick.tick() => {
                    alive = stream.write_all(b"a").await.is_ok();
                }
            }
        }
        flock.open.fetch_sub(1, Ordering::Relaxed);
        if !flock.stop.load(Ordering::Relaxed) {
            flock.cut.fetch_add(1, Ordering::Relaxed);
        }
        if answer.starts_with(b"HTTP/1.1 429 ")
            && answer.windows(17).any(|w| w == b"capacity_exceeded")
        {
            flock.refused_429.fetch_add(1, Ordering::Relaxed);
        }
        if !answer.is_empty() {
            let mut all = flock.answers.lock().unwrap_or_else(|e| e.into_inner());
            if all.len() < 1 << 20 {
                all.extend_from_slice(&answer);
            }
        }
        tokio::time::sleep(pause).await;
    }
}

/// Starts `per_address` slowloris clients from each of `addresses`.
fn flock(
    addresses: &[IpAddr],
    per_address: usize,
    addr: SocketAddr,
    every: Duration,
    pause: Duration,
) -> (Arc<Flock>, JoinSet<()>) {
    let flock = Arc::new(Flock::default());
    let mut set = JoinSet::new();
    for &local in addresses {
        for _ in 0..per_address {
            set.spawn(slowloris(flock.clone(), local, addr, every, pause));
        }
    }
    (flock, set)
}

async fn stop_flock(flock: &Flock, mut set: JoinSet<()>) -> Result<()> {
    flock.stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(60), async {
        while set.join_next().await.is_some() {}
    })
    .await
    .context("the slow clients did not stop")
}

/// `n` normal requests from `local`, each on a new connection, retried (up to 5 times)
/// when the connection is cut before its answer; all must be served. Returns each one's
/// latency and how many needed a retry.
async fn normal_client(
    server: &TestServer,
    local: IpAddr,
    headers: &[(&str, &str)],
    n: usize,
) -> Result<(Vec<Duration>, usize)> {
    let mut latencies = Vec::new();
    let mut retried = 0;
    for _ in 0..n {
        let started = Instant::now();
        let mut attempt = 0;
        let resp = loop {
            attempt += 1;
            match get_from(local, server.addr, "/v1/runtimes", headers).await {
                Ok(resp) => break resp,
                Err(e) if attempt < 5 => {
                    eprintln!("a normal request was cut ({e:#}); retrying");
                }
                Err(e) => return Err(e.context("a normal client was never served")),
            }
        };
        latencies.push(started.elapsed());
        retried += usize::from(attempt > 1);
        server.seen().record_response(&resp);
        assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
        assert!(resp.json()?["runtimes"].is_array(), "{}", resp.text());
    }
    Ok((latencies, retried))
}

fn report(test: &str, mut latencies: Vec<Duration>, retried: usize) {
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    eprintln!(
        "{test}: a normal client's request during the attack: p50 {:?}, p90 {:?}, max {:?} \
         over {} requests ({retried} retried)",
        at(0.5),
        at(0.9),
        at(1.0),
        latencies.len()
    );
}

/// Fails when a client got a peer address, a token or the state directory.
fn assert_nothing_leaked(server: &TestServer, extra: &[u8], needles: &[String]) -> Result<()> {
    server.seen().record(extra);
    let mut all = needles.to_vec();
    all.extend([
        READ_SECRET.to_string(),
        OTHER_SECRET.to_string(),
        OPERATE_SECRET.to_string(),
        server.dir.path().display().to_string(),
    ]);
    server.seen().assert_free_of(&all)
}

/// Fails when an answer to the flock or to the harness named an address of the flock, a
/// token or the state directory; then stops the server.
async fn flock_leaked_nothing(
    server: TestServer,
    flock: &Flock,
    addresses: &[IpAddr],
) -> Result<()> {
    let answers = flock
        .answers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let needles: Vec<String> = addresses.iter().map(IpAddr::to_string).collect();
    assert_nothing_leaked(&server, &answers, &needles)?;
    server.stop().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Slowloris
// ---------------------------------------------------------------------------------------

/// 500 connections that trickle their heads (and come back when cut by the header
/// timeout) hold 500 tasks, not the server: a normal client is served all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_of_500_connections_does_not_stop_a_normal_client() -> Result<()> {
    let n = scaled(500, 2, 400, "slowloris");
    let options = ServeOptions {
        // Short, so that the attack is cut and comes back during the test.
        header_read_timeout: Duration::from_secs(4),
        ..Default::default()
    };
    let server = TestServer::start_with(testkit::config(""), options).await?;
    // Ten addresses of 50 each: below the per-peer limit, so the server holds them all.
    let addresses: Vec<IpAddr> = (10..20).map(|c| ip(0, 0, c)).collect();
    let (flock, set) = flock(
        &addresses,
        n.div_ceil(10),
        server.addr,
        Duration::from_millis(200),
        Duration::from_millis(20),
    );
    let f = flock.clone();
    eventually("the slow clients to be connected", WAIT, || {
        let f = f.clone();
        // All of them connected once, and (allowing for the few being cut and coming back
        // on a slow machine) nearly all open at the same time.
        async move {
            let all = f.connects.load(Ordering::Relaxed) >= n as u64;
            Ok((all && f.open.load(Ordering::Relaxed) >= (n * 19 / 20) as u64).then_some(()))
        }
    })
    .await?;
    let (latencies, retried) = normal_client(&server, ip(0, 0, 1), &[], 30).await?;
    // The header timeout cuts them; they come back; the server still serves.
    let f = flock.clone();
    eventually("the header timeout to cut slow clients", WAIT, || {
        let f = f.clone();
        async move { Ok((f.cut.load(Ordering::Relaxed) > 0).then_some(())) }
    })
    .await?;
    let (more, more_retried) = normal_client(&server, ip(0, 0, 1), &[], 10).await?;
    refusals_reach(&server, "header_read_timeout", 1).await?;
    stop_flock(&flock, set).await?;
    report(
        "slowloris of 500",
        [latencies, more].concat(),
        retried + more_retried,
    );
    flock_leaked_nothing(server, &flock, &addresses).await
}

/// ~1,150 trickling connections from one address fill that address's share
/// (`max_connections_per_peer`), not the server: the rest are refused at once with `429`,
/// and a client from another address is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_trickling_1150_connections_cannot_lock_out_another() -> Result<()> {
    let n = scaled(1150, 2, 400, "one peer");
    let server = TestServer::start().await?;
    let attacker = ip(0, 0, 3);
    let (flock, set) = flock(
        &[attacker],
        n,
        server.addr,
        Duration::from_millis(500),
        Duration::from_millis(500),
    );
    let f = flock.clone();
    eventually(
        "the address's share to be full and refusals answered",
        WAIT,
        || {
            let f = f.clone();
            async move {
                Ok((f.open.load(Ordering::Relaxed) >= 200
                    && f.refused_429.load(Ordering::Relaxed) > 0)
                    .then_some(()))
            }
        },
    )
    .await?;
    let (latencies, retried) = normal_client(&server, ip(0, 0, 2), &[], 30).await?;
    let (per_peer, page) = refusals(&server, "max_connections_per_peer", &[]).await?;
    assert!(per_peer > 0, "no refusal counted: {page}");
    assert!(!page.contains("127.0.0.3"), "/metrics names the peer");
    stop_flock(&flock, set).await?;
    report("1,150 from one address", latencies, retried);
    let text = String::from_utf8_lossy(&flock.answers.lock().unwrap()).into_owned();
    assert!(
        text.contains("Retry-After: 1") || text.contains("retry-after: 1"),
        "{text:.400}"
    );
    flock_leaked_nothing(server, &flock, &[attacker]).await
}

/// With tokens, ~1,150 trickling connections from many addresses, none with a token, hold
/// at most `max_unauthenticated_connections` slots (a newer one closes the oldest), so a
/// client with a token gets a slot and is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_connections_without_a_token_cannot_lock_out_a_client_with_one() -> Result<()> {
    let n = scaled(1150, 2, 400, "no token");
    let options = ServeOptions {
        tokens: vec![token("reader", READ_SECRET)],
        ..Default::default()
    };
    let server = TestServer::start_with(testkit::config(""), options).await?;
    let addresses: Vec<IpAddr> = (0..23).map(|c| ip(0, 1, c + 1)).collect();
    let (flock, set) = flock(
        &addresses,
        n.div_ceil(23),
        server.addr,
        Duration::from_millis(500),
        Duration::from_millis(500),
    );
    let bearer = format!("Bearer {READ_SECRET}");
    let auth = [("authorization", bearer.as_str())];
    let f = flock.clone();
    eventually("the unauthenticated slots to be full", WAIT, || {
        let f = f.clone();
        async move { Ok((f.cut.load(Ordering::Relaxed) > 0).then_some(())) }
    })
    .await?;
    let (latencies, retried) = normal_client(&server, ip(0, 0, 1), &auth, 30).await?;
    let (evicted, page) = refusals(&server, "max_unauthenticated_connections", &auth).await?;
    assert!(
        evicted > 0,
        "no unauthenticated connection was closed for a newer one: {page}"
    );
    // The attackers never got more than their share of the server.
    let (over_all, _) = refusals(&server, "max_connections", &auth).await?;
    assert_eq!(
        over_all, 0,
        "the unauthenticated connections filled the server"
    );
    stop_flock(&flock, set).await?;
    report("1,150 without a token", latencies, retried);
    flock_leaked_nothing(server, &flock, &addresses).await
}

// ---------------------------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------------------------

/// 3,000 open event streams are 3,000 tasks: the server goes on accepting and answering;
/// one past `max_streams` is a `429` with `Retry-After`, and a closed stream gives its slot
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_thousand_open_streams_do_not_stop_the_server_accepting() -> Result<()> {
    let n = scaled(3000, 2, 600, "3,000 streams");
    let options = ServeOptions {
        max_connections: n + 200,
        max_connections_per_peer: n + 200,
        max_streams: n,
        max_streams_per_token: n,
        ..Default::default()
    };
    let server = Arc::new(TestServer::start_with(testkit::config(""), options).await?);
    let mut streams = Vec::with_capacity(n);
    let mut batch = JoinSet::new();
    for i in 0..n {
        let server = server.clone();
        // Spread over addresses the way many clients would be.
        let local = ip(0, 2, (i % 200) as u8 + 1);
        batch.spawn(async move {
            let req = Request::builder()
                .uri("/v1/events")
                .header("host", format!("127.0.0.1:{}", server.addr.port()))
                .body(Full::new(Bytes::new()))?;
            let resp = send_request_on(connect_from(local, server.addr).await?, req).await?;
            if resp.status() != StatusCode::OK {
                bail!("stream {i} answered {}", resp.status());
            }
            Ok(resp)
        });
        if batch.len() >= 100 || i + 1 == n {
            while let Some(opened) = batch.join_next().await {
                streams.push(opened??);
            }
        }
    }
    assert_eq!(streams.len(), n);
    let (latencies, retried) = normal_client(&server, ip(0, 0, 1), &[], 20).await?;
    report("3,000 open streams", latencies, retried);
    let over = server.get("/v1/events").await?;
    assert_eq!(
        over.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        over.text()
    );
    assert_eq!(over.code(), "capacity_exceeded", "{}", over.text());
    assert_eq!(over.headers["retry-after"], "1");
    assert!(over.text().contains("max_streams"), "{}", over.text());
    assert_eq!(over.json()?["error"]["retryable"], true);
    // A stream that ends gives its slot back.
    streams.truncate(n - 5);
    eventually("a closed stream's slot to come back", WAIT, || async {
        let resp = server.send(Method::GET, "/v1/events", &[], None).await?;
        Ok((resp.status() == StatusCode::OK).then_some(()))
    })
    .await?;
    drop(streams);
    let server = Arc::into_inner(server).context("the server is still shared")?;
    server.stop().await?;
    Ok(())
}

/// One token can hold `max_streams_per_token` streams and the server `max_streams`:
/// past either, `429 capacity_exceeded` with `Retry-After`, naming the limit and not the
/// token; a token under its share gets a stream while another is at its own.
#[tokio::test]
async fn stream_caps_per_token_and_overall_answer_429_with_retry_after() -> Result<()> {
    let options = ServeOptions {
        tokens: vec![
            token("reader", READ_SECRET),
            token("other", OTHER_SECRET),
            LoadedToken {
                scope: Scope::Operate,
                ..token("operator", OPERATE_SECRET)
            },
        ],
        max_streams: 3,
        max_streams_per_token: 2,
        ..Default::default()
    };
    let server = TestServer::start_with(testkit::config(""), options).await?;
    let a = format!("Bearer {READ_SECRET}");
    let b = format!("Bearer {OTHER_SECRET}");
    let (a, b) = (
        [("authorization", a.as_str())],
        [("authorization", b.as_str())],
    );
    let a1 = server.sse("/v1/events", &a).await?;
    let a2 = server.sse("/v1/events", &a).await?;
    let refused = server.request(Method::GET, "/v1/events", &a, None).await?;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        refused.text()
    );
    assert_eq!(refused.code(), "capacity_exceeded");
    assert_eq!(refused.headers["retry-after"], "1");
    assert!(
        refused.text().contains("max_streams_per_token"),
        "{}",
        refused.text()
    );
    assert!(!refused.text().contains("reader"), "{}", refused.text());
    // The other token is under its share; the server then is at its cap.
    let b1 = server.sse("/v1/events", &b).await?;
    let refused = server.request(Method::GET, "/v1/events", &b, None).await?;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        refused.text()
    );
    assert!(
        refused.text().contains("`max_streams`"),
        "{}",
        refused.text()
    );
    // Output streams count too.
    let op = format!("Bearer {OPERATE_SECRET}");
    let body = serde_json::json!({ "profile": "shell", "args": ["echo hi"] }).to_string();
    let id = server
        .request(
            Method::POST,
            "/v1/runtimes/local/workers",
            &[("authorization", op.as_str())],
            Some(&body),
        )
        .await?
        .created_id()?;
    let out = server
        .request(Method::GET, &format!("/v1/workers/{id}/output"), &b, None)
        .await?;
    assert_eq!(out.status, StatusCode::TOO_MANY_REQUESTS, "{}", out.text());
    drop((a1, b1));
    eventually("closed streams to give their slots back", WAIT, || async {
        let resp = server.send(Method::GET, "/v1/events", &b, None).await?;
        Ok((resp.status() == StatusCode::OK).then_some(()))
    })
    .await?;
    let auth = [("authorization", a[0].1)];
    let (per_token, page) = refusals(&server, "max_streams_per_token", &auth).await?;
    let (overall, _) = refusals(&server, "max_streams", &auth).await?;
    assert!(per_token >= 1 && overall >= 2, "{page}");
    drop(a2);
    assert_nothing_leaked(&server, &[], &[])?;
    server.stop().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Request heads
// ---------------------------------------------------------------------------------------

fn head_with(port: u16, extra: &str) -> Vec<u8> {
    format!(
        "GET /v1/runtimes HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n{extra}\r\n"
    )
    .into_bytes()
}

/// Too many header lines and one huge header are `431` with the error body; past twice
/// the limits hyper answers `431` itself (no body) and closes; the server keeps serving.
#[tokio::test]
async fn header_floods_get_431_and_the_server_keeps_serving() -> Result<()> {
    let server = TestServer::start().await?;
    let (addr, port, me) = (server.addr, server.addr.port(), ip(0, 0, 1));
    let many: String = (0..150).map(|i| format!("X-Flood-{i}: {i}\r\n")).collect();
    let huge = format!("X-Huge: {}\r\n", "a".repeat(80 << 10));
    for (what, extra, says) in [
        ("150 headers", &many, "max_headers"),
        ("an 80 KiB header", &huge, "max_header_bytes"),
    ] {
        let answer = raw_exchange(me, addr, &head_with(port, extra)).await?;
        server.seen().record(&answer);
        let (status, head, body) = parse_raw(&answer)?;
        assert_eq!(status, 431, "{what}: {head}");
        assert!(
            head.contains("content-type: application/json"),
            "{what}: {head}"
        );
        let v: Value = serde_json::from_str(&body).with_context(|| format!("{what}: {body}"))?;
        assert_eq!(v["error"]["code"], "headers_too_large", "{what}: {body}");
        assert_eq!(v["error"]["retryable"], false, "{what}: {body}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{what}: {message}");
        assert!(!message.contains("  "), "{what}: {message}");
    }
    // Past hyper's own ceiling (twice the limits): a bare 431, then the connection closes.
    let flood: String = (0..400).map(|i| format!("X-Flood-{i}: {i}\r\n")).collect();
    let answer = raw_exchange(me, addr, &head_with(port, &flood)).await?;
    server.seen().record(&answer);
    let (status, _, body) = parse_raw(&answer)?;
    assert_eq!(status, 431);
    assert!(body.is_empty(), "{body}");
    let giant = format!("X-Huge: {}\r\n", "a".repeat(300 << 10));
    let answer = raw_exchange(me, addr, &head_with(port, &giant)).await?;
    // The server closes while the rest is still arriving: a 431, or a reset that lost it.
    if !answer.is_empty() {
        assert_eq!(parse_raw(&answer)?.0, 431);
    }
    let ok = server.get("/healthz").await?;
    assert_eq!(ok.status, StatusCode::OK);
    let (n, _) = refusals(&server, "max_headers", &[]).await?;
    assert!(n >= 1);
    let (n, _) = refusals(&server, "max_header_bytes", &[]).await?;
    assert!(n >= 1);
    server.stop().await?;
    Ok(())
}

/// A second `Host` or `Authorization` line is `400 invalid_request` saying so, never
/// judged by its first line.
#[tokio::test]
async fn a_second_host_or_authorization_header_is_400() -> Result<()> {
    let options = ServeOptions {
        tokens: vec![token("reader", READ_SECRET)],
        ..Default::default()
    };
    let server = TestServer::start_with(testkit::config(""), options).await?;
    let (addr, port, me) = (server.addr, server.addr.port(), ip(0, 0, 1));
    let one = format!("Authorization: Bearer {READ_SECRET}\r\n");
    let cases = [
        ("Host", format!("{one}Host: 127.0.0.1:{port}\r\n")),
        ("Host", format!("{one}Host: evil.example\r\n")),
        (
            "Authorization",
            format!("{one}Authorization: Bearer nope\r\n"),
        ),
        (
            "Authorization",
            format!("Authorization: Bearer nope\r\n{one}"),
        ),
        ("Authorization", format!("{one}{one}")),
    ];
    for (what, extra) in cases {
        let answer = raw_exchange(me, addr, &head_with(port, &extra)).await?;
        server.seen().record(&answer);
        let (status, head, body) = parse_raw(&answer)?;
        assert_eq!(status, 400, "two {what}: {head}\n{body}");
        let v: Value = serde_json::from_str(&body)?;
        assert_eq!(v["error"]["code"], "invalid_request", "{body}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(&format!("more than one {what} header")),
            "{message}"
        );
    }
    let answer = raw_exchange(me, addr, &head_with(port, &one)).await?;
    assert_eq!(parse_raw(&answer)?.0, 200);
    assert_nothing_leaked(&server, &[], &[])?;
    server.stop().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Connection limits and timeouts
// ---------------------------------------------------------------------------------------

/// Past `max_connections_per_peer` or `max_connections` a connection is answered at once
/// with `429 capacity_exceeded`, `Retry-After` and `Connection: close` — not left waiting
/// in the kernel's queue — and the answer names no address.
#[tokio::test]
async fn over_a_connection_limit_a_client_is_refused_at_once_with_429() -> Result<()> {
    let options = ServeOptions {
        max_connections: 4,
        max_connections_per_peer: 2,
        ..Default::default()
    };
    let server = TestServer::start_with(testkit::config(""), options).await?;
    let addr = server.addr;
    let peer = ip(0, 5, 1);
    let held: Vec<TcpStream> = vec![
        connect_from(peer, addr).await?,
        connect_from(peer, addr).await?,
    ];
    let request = head_with(addr.port(), "");
    // The two held connections are accepted in order; the third from the address is over.
    let answer = eventually(
        "a refusal of the address's third connection",
        WAIT,
        || async {
            let answer = raw_exchange(peer, addr, &request).await?;
            Ok(answer.starts_with(b"HTTP/1.1 429").then_some(answer))
        },
    )
    .await?;
    server.seen().record(&answer);
    let (_, head, body) = parse_raw(&answer)?;
    assert!(head.contains("retry-after: 1"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let v: Value = serde_json::from_str(&body)?;
    assert_eq!(v["error"]["code"], "capacity_exceeded");
    assert_eq!(v["error"]["retryable"], true);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("from this address"),
        "{body}"
    );
    // Another address is served, up to the server's own cap.
    let other = ip(0, 5, 2);
    let answer = raw_exchange(other, addr, &request).await?;
    assert_eq!(parse_raw(&answer)?.0, 200);
    let more: Vec<TcpStream> = vec![
        connect_from(ip(0, 5, 3), addr).await?,
        connect_from(ip(0, 5, 4), addr).await?,
    ];
    let answer = eventually("a refusal at the server's cap", WAIT, || async {
        let answer = raw_exchange(ip(0, 5, 5), addr, &request).await?;
        Ok(answer.starts_with(b"HTTP/1.1 429").then_some(answer))
    })
    .await?;
    server.seen().record(&answer);
    let (_, _, body) = parse_raw(&answer)?;
    assert!(body.contains("too many connections open"), "{body}");
    drop((held, more));
    // The slots come back when the connections close.
    eventually("the slots to come back", WAIT, || async {
        let answer = raw_exchange(peer, addr, &request).await?;
        Ok(answer.starts_with(b"HTTP/1.1 200").then_some(()))
    })
    .await?;
    let (per_peer, page) = refusals(&server, "max_connections_per_peer", &[]).await?;
    let (overall, _) = refusals(&server, "max_connections", &[]).await?;
    assert!(per_peer >= 1 && overall >= 1, "{page}");
    assert!(page.contains("roster_connections "), "{page}");
    assert_nothing_leaked(&server, &[], &["127.0.5.".into()])?;
    server.stop().await?;
    Ok(())
}

/// Reads from `stream` until the server closes it; `Ok(true)` when it did within `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// A keep-alive connection idle past `keep_alive_idle_timeout` is closed, and one that
/// sends no (or half a) head within `header_read_timeout`; an event stream, which is a
/// request in flight, is not idle however quiet it is.
#[tokio::test]
async fn idle_connections_and_slow_heads_are_closed_but_quiet_streams_are_not() -> Result<()> {
    let options = ServeOptions {
        header_read_timeout: Duration::from_millis(300),
        keep_alive_idle_timeout: Duration::from_millis(600),
        sse_ping: Duration::from_secs(3600),
        ..Default::default()
    };
    let server = TestServer::start_with(testkit::config(""), options).await?;
    let addr = server.addr;
    let mut stream = server.sse("/v1/events", &[]).await?;
    let snapshot = stream.next_event().await?;
    assert_eq!(snapshot.event, "snapshot");
    // A keep-alive connection: one request answered, then nothing.
    let mut idle = connect_from(ip(0, 0, 1), addr).await?;
    let req = format!(
        "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\r\n",
        addr.port()
    );
    idle.write_all(req.as_bytes()).await?;
    let mut buf = [0u8; 1024];
    let n = idle.read(&mut buf).await?;
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    // A connection that says nothing, and one that sends half a head.
    let mut silent = connect_from(ip(0, 0, 1), addr).await?;
    let mut half = connect_from(ip(0, 0, 1), addr).await?;
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127")
        .await?;
    assert!(
        closed_within(&mut silent, WAIT).await,
        "a silent connection was kept"
    );
    assert!(closed_within(&mut half, WAIT).await, "a half head was kept");
    assert!(
        closed_within(&mut idle, WAIT).await,
        "an idle keep-alive connection was kept"
    );
    // The stream outlived all three: it still carries events.
    server.spawn_shell("true").await?;
    let next = stream.next_event().await?;
    assert_eq!(next.event, "worker.upserted", "{next:?}");
    refusals_reach(&server, "header_read_timeout", 2).await?;
    refusals_reach(&server, "keep_alive_idle_timeout", 1).await?;
    drop(stream);
    server.stop().await?;
    Ok(())
}
