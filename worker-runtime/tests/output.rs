//! Output capture: retention, gaps, raw bytes, character boundaries, non-following readers.

mod common;

use anyhow::Result;
use common::*;
use worker_runtime::{OutputItem, Runtime, RuntimeConfig, RuntimeError, State, Stream};

#[tokio::test(flavor = "multi_thread")]
async fn retention_stays_bounded_under_ten_megabytes_of_output() -> Result<()> {
    const RETENTION: u64 = 64 * 1024;
    let rt = Runtime::new(RuntimeConfig {
        output_retention: RETENTION,
        ..config()
    })?;
    let w = rt.spawn(sh("head -c 10000000 /dev/zero")).await?;
    // A following reader that never reads holds nothing back.
    let _idle_reader = rt.output(w.id, 0, true)?;
    let info = terminal(&rt, w.id).await?;
    assert_eq!((info.state, info.exit_code), (State::Exited, Some(0)));
    let retained = rt.retained_output_bytes(w.id)?;
    assert!(
        (RETENTION..=2 * RETENTION).contains(&retained),
        "retained {retained} bytes"
    );

    let items = read_to_end(&rt, w.id).await?;
    let OutputItem::Gap { from, to } = items[0] else {
        panic!("expected a gap first, got {:?}", items[0]);
    };
    assert_eq!(from, 1);
    let mut bytes = 0u64;
    for (expected, item) in (to + 1..).zip(&items[1..items.len() - 1]) {
        let OutputItem::Chunk { seq, stream, data } = item else {
            panic!("expected only chunks after the gap, got {item:?}");
        };
        assert_eq!(*seq, expected, "seq has a hole");
        assert_eq!(*stream, Stream::Stdout);
        assert!(data.len() <= 64 * 1024);
        bytes += data.len() as u64;
    }
    assert_eq!(bytes, retained);
    assert_eq!(items.last(), Some(&OutputItem::End));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reader_that_starts_late_gets_a_gap_then_the_retained_chunks() -> Result<()> {
    let rt = Runtime::new(RuntimeConfig {
        output_retention: 10,
        ..config()
    })?;
    // Five separate reads of 6 bytes each: only the last two chunks fit in 10 bytes.
    let w = rt
        .spawn(sh("for i in 1 2 3 4 5; do echo line$i; sleep 0.05; done"))
        .await?;
    terminal(&rt, w.id).await?;
    let items = read_to_end(&rt, w.id).await?;
    let OutputItem::Gap { from: 1, to } = items[0] else {
        panic!("expected a gap from 1 first, got {:?}", items[0]);
    };
    let mut text = String::new();
    for (expected, item) in (to + 1..).zip(&items[1..items.len() - 1]) {
        let OutputItem::Chunk { seq, data, .. } = item else {
            panic!("expected chunks, got {item:?}");
        };
        assert_eq!(*seq, expected);
        text.push_str(std::str::from_utf8(data)?);
    }
    assert_eq!(items.last(), Some(&OutputItem::End));
    let all = "line1\nline2\nline3\nline4\nline5\n";
    assert!(all.ends_with(&text), "{text:?}");
    assert!(text.len() >= 10 && text.len() < all.len(), "{text:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_utf8_bytes_are_kept_raw() -> Result<()> {
    let rt = runtime();
    let w = rt.spawn(sh(r"printf 'a\377\376b\200'")).await?;
    let items = read_to_end(&rt, w.id).await?;
    assert_eq!(
        stream_bytes(&items, Stream::Stdout),
        b"a\xff\xfeb\x80".to_vec()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_character_written_in_two_parts_is_not_split_across_chunks() -> Result<()> {
    let rt = runtime();
    // U+1F600 is F0 9F 98 80; the pause makes the two halves separate reads.
    let w = rt
        .spawn(sh(r"printf 'x\360\237'; sleep 0.3; printf '\230\200y'"))
        .await?;
    let items = read_to_end(&rt, w.id).await?;
    let mut all = Vec::new();
    for item in &items {
        if let OutputItem::Chunk { data, .. } = item {
            assert!(
                std::str::from_utf8(data).is_ok(),
                "a chunk splits a character: {data:?}"
            );
            all.extend_from_slice(data);
        }
    }
    assert_eq!(all, "x😀y".as_bytes());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_incomplete_character_at_end_of_output_is_flushed() -> Result<()> {
    let rt = runtime();
    let w = rt.spawn(sh(r"printf 'ab\360\237'")).await?;
    let items = read_to_end(&rt, w.id).await?;
    assert_eq!(stream_bytes(&items, Stream::Stdout), b"ab\xf0\x9f".to_vec());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_non_following_reader_stops_at_the_retained_output() -> Result<()> {
    let rt = runtime();
    let w = rt.spawn(sh("echo first; read x; echo second")).await?;
    wait_for_output(&rt, w.id, "first").await?;

    // While running: what is retained, then the reader ends without `End`.
    let mut reader = rt.output(w.id, 0, false)?;
    let first = within("the first chunk", reader.next()).await?;
    assert!(matches!(first, Some(OutputItem::Chunk { seq: 1, .. })));
    assert_eq!(within("the reader's end", reader.next()).await?, None);

    rt.close_input(w.id)?;
    terminal(&rt, w.id).await?;
    // Once terminal: everything after the cursor, then `End`.
    let mut reader = rt.output(w.id, 1, false)?;
    let second = within("the second chunk", reader.next()).await?;
    assert!(matches!(second, Some(OutputItem::Chunk { seq: 2, .. })));
    assert_eq!(within("end", reader.next()).await?, Some(OutputItem::End));
    assert_eq!(within("none", reader.next()).await?, None);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn output_stays_readable_after_exit_until_the_record_is_removed() -> Result<()> {
    let rt = runtime();
    let w = rt.spawn(sh("echo kept")).await?;
    terminal(&rt, w.id).await?;
    let items = read_to_end(&rt, w.id).await?;
    assert_eq!(stream_bytes(&items, Stream::Stdout), b"kept\n");
    rt.remove(w.id)?;
    assert!(rt.output(w.id, 0, false).is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn output_after_the_last_seq_is_an_invalid_request() -> Result<()> {
    let rt = runtime();
    let w = rt.spawn(sh("echo one")).await?;
    terminal(&rt, w.id).await?;
    for follow in [true, false] {
        // From the last seq: nothing but `End`.
        let mut reader = rt.output(w.id, 1, follow)?;
        assert_eq!(within("end", reader.next()).await?, Some(OutputItem::End));
        for after in [2, u64::MAX] {
            match rt.output(w.id, after, follow) {
                Err(RuntimeError::InvalidRequest(message)) => {
                    assert!(message.contains("`after`"), "{message}")
                }
                other => panic!("after {after}: expected InvalidRequest, got {other:?}"),
            }
        }
    }
    // A live worker that wrote nothing yet: only 0 is a cursor of it.
    let live = rt.spawn(sh("read x")).await?;
    assert!(rt.output(live.id, 0, true).is_ok());
    assert!(matches!(
        rt.output(live.id, 1, true),
        Err(RuntimeError::InvalidRequest(_))
    ));
    rt.close_input(live.id)?;
    terminal(&rt, live.id).await?;
    Ok(())
}
