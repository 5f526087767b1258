//! output: a worker writes a lot to stdout and one SSE client reads it, beside the same
//! command writing into a raw pipe; and one line stdin → stdout → SSE client, timed per
//! line, on an embedded runtime and through one `remote` hop.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use http::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

use crate::common::{embedded_config, progress, spawn_worker, Client, Roster, SseStream, WAIT};
use crate::report::{Better, Row};
use crate::Opts;

/// The echo worker of the latency rows.
const ECHO: &str = r#"while read l; do echo "$l"; done"#;

/// Runs the scenario.
pub async fn run(opts: &Opts, dir: &Path) -> Result<Vec<Row>> {
    let mb = opts
        .output_mb
        .unwrap_or(if opts.tiny { 1 } else { 200 })
        .max(1);
    let lines = opts
        .lines
        .unwrap_or(if opts.tiny { 10 } else { 1000 })
        .max(1);
    let rounds = opts.rounds as usize;
    let upstream = Roster::start(
        dir,
        "upstream",
        &embedded_config(&dir.join("up-state"), "127.0.0.1:0".parse()?, 64),
    )
    .await?;
    let down_config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nstate_dir = \"{}\"\nshutdown_grace = \"2s\"\n\
         [[runtimes]]\nname = \"local\"\nsource = \"remote\"\nurl = \"http://{}\"\nremote_runtime = \"local\"\n",
        dir.join("down-state").display(),
        upstream.addr
    );
    let downstream = Roster::start(dir, "downstream", &down_config).await?;

    let bytes = mb * 1_000_000;
    let metric = format!("{mb} MB stdout -> one reader");
    let (mut sse, mut pipe) = (Vec::new(), Vec::new());
    let (mut delivered, mut gaps) = (0u64, 0u64);
    for round in 0..rounds {
        progress(&format!(
            "output round {}/{rounds}: roster throughput",
            round + 1
        ));
        let (secs, got, g) = roster_throughput(upstream.addr, bytes).await?;
        sse.push(got as f64 / 1e6 / secs);
        delivered += got;
        gaps += g;
        progress(&format!("output round {}/{rounds}: raw pipe", round + 1));
        let (secs, got) = pipe_throughput(bytes).await?;
        ensure!(got == bytes, "the pipe carried {got} of {bytes} bytes");
        pipe.push(got as f64 / 1e6 / secs);
    }
    let base = Row::new("output", &metric, "raw pipe", "MB/s", Better::Higher, pipe)
        .count("bytes", bytes * rounds as u64);
    let mut row = Row::new("output", &metric, "roster", "MB/s", Better::Higher, sse)
        .count("bytes_written", bytes * rounds as u64)
        .count("bytes_delivered", delivered)
        .count("gaps", gaps);
    row.against(&base, Some(0.5));
    let mut rows = vec![row, base];

    // Line latency: one echo worker per path.
    let mut up = upstream.client().await?;
    let mut down = downstream.client().await?;
    let up_id = spawn_worker(
        &mut up,
        "local",
        &json!({"profile": "shell", "args": [ECHO]}),
    )
    .await?;
    let down_id = spawn_worker(
        &mut down,
        "local",
        &json!({"profile": "shell", "args": [ECHO]}),
    )
    .await?;
    let mut up_stream = LineStream::open(upstream.addr, &up_id).await?;
    let mut down_stream = LineStream::open(downstream.addr, &down_id).await?;
    let (mut e50, mut e99, mut r50, mut r99, mut added) = (vec![], vec![], vec![], vec![], vec![]);
    let mut echoed = 0u64;
    for round in 0..rounds {
        progress(&format!(
            "output round {}/{rounds}: line latency",
            round + 1
        ));
        let mut e = Vec::with_capacity(lines);
        let mut r = Vec::with_capacity(lines);
        for i in 0..lines {
            let token = format!("r{round}l{i}z");
            e.push(up_stream.round_trip(&mut up, &up_id, &token).await?);
            r.push(down_stream.round_trip(&mut down, &down_id, &token).await?);
            echoed += 2;
        }
        e.sort_by(f64::total_cmp);
        r.sort_by(f64::total_cmp);
        e50.push(pct(&e, 50.0));
        e99.push(pct(&e, 99.0));
        r50.push(pct(&r, 50.0));
        r99.push(pct(&r, 99.0));
        added.push(pct(&r, 99.0) - pct(&e, 99.0));
    }
    let lm = format!("1 line stdin -> SSE, {lines} lines");
    let mut p99 = Row::new("output", &lm, "roster p99", "ms", Better::Lower, e99)
        .count("lines_echoed", echoed);
    p99.limit(2.0, "p99 ≤ 2 ms embedded");
    let mut hop = Row::new("output", &lm, "+1 hop p99", "ms", Better::Lower, added);
    hop.limit(1.0, "≤ +1 ms per remote hop");
    rows.push(Row::new(
        "output",
        &lm,
        "roster p50",
        "ms",
        Better::Lower,
        e50,
    ));
    rows.push(p99);
    rows.push(Row::new(
        "output",
        &lm,
        "remote p50",
        "ms",
        Better::Lower,
        r50,
    ));
    rows.push(Row::new(
        "output",
        &lm,
        "remote p99",
        "ms",
        Better::Lower,
        r99,
    ));
    rows.push(hop);
    for (c, id) in [(&mut down, &down_id), (&mut up, &up_id)] {
        let _ = c
            .json(
                Method::POST,
                &format!("/v1/workers/{id}/stop"),
                Some(r#"{"grace_ms": 500}"#),
            )
            .await;
    }
    drop((up_stream, down_stream));
    let (mut upstream, mut downstream) = (upstream, downstream);
    downstream.daemon.stop().await?;
    upstream.daemon.stop().await?;
    Ok(rows)
}

/// Spawns `read x; yes | head -c BYTES` with its output stream open, sends the line that
/// lets it write, and reads until `end`. Returns seconds from the input to `end`, the
/// output bytes delivered and the `gap` events.
async fn roster_throughput(addr: SocketAddr, bytes: u64) -> Result<(f64, u64, u64)> {
    let mut c = Client::connect(addr).await?;
    let cmd = format!("read x; yes | head -c {bytes}");
    let id = spawn_worker(&mut c, "local", &json!({"profile": "shell", "args": [cmd]})).await?;
    let mut stream = SseStream::open(addr, &format!("/v1/workers/{id}/output"), &[]).await?;
    let start = Instant::now();
    let (status, _) = c
        .json(
            Method::POST,
            &format!("/v1/workers/{id}/input"),
            Some(r#"{"data": "go\n"}"#),
        )
        .await?;
    ensure!(status == StatusCode::ACCEPTED, "input answered {status}");
    let deadline = Instant::now() + Duration::from_secs(300);
    let (mut got, mut gaps) = (0u64, 0u64);
    loop {
        let Some((ev, at)) = stream.next(deadline).await? else {
            bail!("the output stream ended without `end`");
        };
        match ev.event.as_str() {
            "output" => got += data_len(&ev.data)?,
            "gap" => gaps += 1,
            "end" => return Ok((at.duration_since(start).as_secs_f64(), got, gaps)),
            _ => {}
        }
    }
}

/// The length in bytes of the `data` string of an `output` event's JSON, as decoded, found
/// without decoding it: the reader of 200 MB must not be what the row measures (with
/// `serde_json` building every string it took as much CPU as the server). The fields before
/// `data` are numbers and a stream name, so the first `"data":"` is the field; its escapes are
/// counted as the bytes they stand for.
fn data_len(json: &str) -> Result<u64> {
    const KEY: &str = "\"data\":\"";
    let at = json.find(KEY).context("an output event without data")?;
    let text = &json.as_bytes()[at + KEY.len()..];
    // The data string is the last field: when it holds no `\u` and no escaped backslash,
    // every escape is two bytes standing for one, and three passes that vectorize count it.
    if let Some(inner) = text.strip_suffix(b"\"}") {
        let simple = memchr::memmem::find(inner, b"\\u").is_none()
            && memchr::memmem::find(inner, b"\\\\").is_none();
        if simple && memchr::memchr(b'"', inner).is_none() {
            let escapes = inner.iter().filter(|b| **b == b'\\').count();
            return Ok((inner.len() - escapes) as u64);
        }
    }
    let mut len = 0u64;
    let mut i = 0;
    loop {
        // Plain bytes up to the next quote or backslash count as they are.
        let Some(skip) = memchr::memchr2(b'"', b'\\', &text[i..]) else {
            bail!("an unterminated data string");
        };
        len += skip as u64;
        i += skip;
        if text[i] == b'"' {
            return Ok(len);
        }
        match text.get(i + 1) {
            Some(b'u') => {
                let hex = |at: usize| -> Result<u32> {
                    let digits = text.get(at..at + 4).context("a short \\u escape")?;
                    Ok(u32::from_str_radix(std::str::from_utf8(digits)?, 16)?)
                };
                let unit = hex(i + 2)?;
                if (0xD800..0xDC00).contains(&unit) && text.get(i + 6..i + 8) == Some(b"\\u") {
                    // A surrogate pair: one character of four bytes.
                    len += 4;
                    i += 12;
                } else {
                    len += char::from_u32(unit).map_or(3, |c| c.len_utf8() as u64);
                    i += 6;
                }
            }
            Some(_) => {
                len += 1;
                i += 2;
            }
            None => bail!("an unterminated escape"),
        }
    }
}

/// The same command writing into a pipe this process drains.
async fn pipe_throughput(bytes: u64) -> Result<(f64, u64)> {
    let start = Instant::now();
    let mut child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("yes | head -c {bytes}"))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    loop {
        let n = tokio::time::timeout(WAIT, out.read(&mut buf))
            .await
            .context("the pipe stalled")??;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    child.wait().await?;
    Ok((start.elapsed().as_secs_f64(), got))
}

/// An echo worker's output stream.
struct LineStream {
    stream: SseStream,
    text: String,
}

impl LineStream {
    async fn open(addr: SocketAddr, id: &str) -> Result<LineStream> {
        let stream = SseStream::open(addr, &format!("/v1/workers/{id}/output"), &[]).await?;
        Ok(LineStream {
            stream,
            text: String::new(),
        })
    }

    /// Posts `token` as one input line and waits until it comes back; milliseconds.
    async fn round_trip(&mut self, c: &mut Client, id: &str, token: &str) -> Result<f64> {
        let body = json!({ "data": format!("{token}\n") }).to_string();
        let sent = Instant::now();
        let (status, answer) = c
            .json(
                Method::POST,
                &format!("/v1/workers/{id}/input"),
                Some(&body),
            )
            .await?;
        ensure!(
            status == StatusCode::ACCEPTED,
            "input answered {status}: {}",
            String::from_utf8_lossy(&answer)
        );
        let deadline = Instant::now() + WAIT;
        loop {
            let (ev, at) = self
                .stream
                .next(deadline)
                .await?
                .context("the output stream ended")?;
            match ev.event.as_str() {
                "output" => {
                    let v: Value = serde_json::from_str(&ev.data)?;
                    self.text += v["data"].as_str().unwrap_or_default();
                    if let Some(i) = self.text.find(token) {
                        self.text.drain(..i + token.len());
                        return Ok(at.duration_since(sent).as_secs_f64() * 1e3);
                    }
                }
                "state" => {}
                other => bail!("unexpected {other} on the output stream: {}", ev.data),
            }
        }
    }
}

/// The nearest-rank percentile of sorted, non-empty samples.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_length_is_that_of_the_decoded_string() {
        let texts = [
            String::new(),
            "y\n".repeat(1000),
            "plain".into(),
            "tab\tquote\"back\\slash\u{1}\u{1f}".into(),
            "caf\u{e9} \u{20ac} \u{1f600} \u{2028}\u{7f}".into(),
            String::from_utf8_lossy(&(0..=255u8).collect::<Vec<_>>()).into_owned(),
        ];
        for text in texts {
            let json = json!({"seq": 3, "stream": "stdout", "data": text}).to_string();
            assert_eq!(data_len(&json).unwrap(), text.len() as u64, "{json}");
            // The escaped form of a character above U+FFFF: a surrogate pair.
            let pair = r#"{"seq":1,"stream":"stderr","data":"a\ud83d\ude00\u00e9"}"#;
            assert_eq!(data_len(pair).unwrap(), "a\u{1f600}\u{e9}".len() as u64);
        }
        assert!(data_len(r#"{"seq":1,"data":"open"#).is_err());
    }
}
