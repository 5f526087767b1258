//! Property tests for the SSE parser that reads a remote roster's streams: it never panics on
//! any bytes, its answer does not depend on where the chunks are split, its buffers stay
//! within `max_event_bytes`, and events written the way roster writes them parse back whole.

use proptest::prelude::*;
use source_remote::{SseEvent, SseItem, SseParser};

/// Bytes that look like an event stream often enough to reach every branch: field names,
/// colons, CR, LF, a byte order mark, split UTF-8, and any byte.
fn stream_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"data: ".to_vec()),
        Just(b"data".to_vec()),
        Just(b"event: ".to_vec()),
        Just(b"id: ".to_vec()),
        Just(b"id: a\0b".to_vec()),
        Just(b"retry: ".to_vec()),
        Just(b": ping".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\n\n".to_vec()),
        Just(b"\xEF\xBB\xBF".to_vec()),
        Just("¡€😀".as_bytes().to_vec()),
        Just(b"\xE2\x82".to_vec()),
        "[0-9]{1,25}".prop_map(String::into_bytes),
        "[a-z {}\":,]{1,12}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 1..8),
    ];
    prop::collection::vec(piece, 0..40).prop_map(|p| p.concat())
}

/// Splits `bytes` at the given cut points (taken modulo the length).
fn split(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    if bytes.is_empty() {
        return vec![Vec::new()];
    }
    let mut at: Vec<usize> = cuts.iter().map(|c| c % bytes.len()).collect();
    at.sort_unstable();
    at.dedup();
    let mut out = Vec::new();
    let mut start = 0;
    for cut in at {
        out.push(bytes[start..cut].to_vec());
        start = cut;
    }
    out.push(bytes[start..].to_vec());
    out
}

/// Feeds the chunks; the items, and whether the limit was hit.
fn parse(chunks: &[Vec<u8>], max: usize) -> (Vec<SseItem>, bool) {
    let mut parser = SseParser::new(max);
    let mut out = Vec::new();
    for chunk in chunks {
        if parser.feed(chunk, &mut out).is_err() {
            // Once failed, it stays failed.
            assert!(parser.feed(b"data: x\n\n", &mut Vec::new()).is_err());
            return (out, true);
        }
    }
    parser.finish();
    (out, false)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 768, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_split_anywhere_give_the_same_items(
        bytes in stream_bytes(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let (whole, whole_failed) = parse(std::slice::from_ref(&bytes), 1 << 20);
        let (chunked, chunked_failed) = parse(&split(&bytes, &cuts), 1 << 20);
        prop_assert!(!whole_failed && !chunked_failed);
        prop_assert_eq!(chunked, whole);
    }

    #[test]
    fn byte_at_a_time_is_the_same_as_whole(bytes in stream_bytes()) {
        let singles: Vec<Vec<u8>> = bytes.iter().map(|b| vec![*b]).collect();
        prop_assert_eq!(parse(&singles, 1 << 20), parse(&[bytes], 1 << 20));
    }

    #[test]
    fn the_limit_holds_and_never_panics(bytes in stream_bytes(), max in 0usize..64) {
        let (items, _) = parse(&[bytes], max);
        for item in items {
            if let SseItem::Event(e) = item {
                // What one event held stayed within the cap: its data (the buffer less its
                // last LF) and, unless it is the default `message`, its type.
                prop_assert!(e.data.len() <= max, "{:?} over {}", e, max);
                prop_assert!(
                    e.event == "message" || e.event.len() + e.data.len() <= max,
                    "{:?} over {}",
                    e,
                    max
                );
            }
        }
    }

    #[test]
    fn events_written_as_roster_writes_them_parse_back(
        events in prop::collection::vec(
            ("[a-z.]{1,16}", "[0-9a-f]{16}-[0-9]{1,6}", any::<String>()),
            1..6,
        ),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        // roster's frames: `id`, `event`, then one `data` line per line of the payload.
        let mut bytes = b"retry: 1000\n\n: ping\n\n".to_vec();
        let mut want = vec![SseItem::Retry(1000), SseItem::Comment(" ping".into())];
        for (event, id, data) in &events {
            let data = data.replace(['\r', '\n'], " ");
            bytes.extend_from_slice(format!("id: {id}\nevent: {event}\n").as_bytes());
            bytes.extend_from_slice(format!("data: {data}\n\n").as_bytes());
            want.push(SseItem::Event(SseEvent {
                event: event.clone(),
                data,
                id: id.clone(),
            }));
        }
        let (items, failed) = parse(&split(&bytes, &cuts), 1 << 20);
        prop_assert!(!failed);
        prop_assert_eq!(items, want);
    }
}
