//! Property tests for the core's parsers of outside text: event cursors (`Last-Event-ID`),
//! worker ids, sizes and durations from config files, and the message scrubber. Each never
//! panics on any input, and round-trips where a round trip exists.

use std::str::FromStr;
use std::time::Duration;

use proptest::prelude::*;
use registry_core::{de, sanitize_message, Cursor, IdIssuer, RuntimeId, SourceKey, WorkerId};

/// Text that is mostly the characters these parsers care about, with any character mixed in.
fn near_miss_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9a-fA-F_w\\-: .]{0,48}",
        "w_[0-9A-Za-z]{24,28}",
        "[0-9a-f]{14,18}-[0-9]{0,22}",
    ]
}

/// Words a source's message may hold: paths, URLs, addresses, plain words, punctuation and
/// characters wider than one byte at any edge.
fn message() -> impl Strategy<Value = String> {
    let word = prop_oneof![
        "[a-z]{1,8}",
        "/[a-z]{1,6}(/[a-z.]{1,6}){0,3}",
        "https?://[a-z]{1,6}(:[0-9]{1,5})?(/[a-z]{0,4})?",
        "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}(:[0-9]{1,5})?",
        "[a-z]{1,5}@[a-z]{1,5}",
        "[\"'`(\\[{<]?[a-z¡é€😀]{0,4}[\"'`)\\]}>,;.!?¡]?",
        any::<String>(),
    ];
    prop::collection::vec(word, 0..12).prop_map(|w| w.join(" "))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn cursors_never_panic_and_round_trip(text in near_miss_text()) {
        if let Some(cursor) = Cursor::parse(&text) {
            let shown = cursor.to_string();
            let again = Cursor::parse(&shown);
            prop_assert_eq!(again, Some(cursor));
            prop_assert_eq!(again.map(|c| c.to_string()), Some(shown));
        }
    }

    #[test]
    fn every_cursor_a_registry_writes_parses_back(epoch in any::<u64>(), seq in any::<u64>()) {
        let text = format!("{epoch:016x}-{seq}");
        let cursor = Cursor::parse(&text).expect("a cursor of the written shape");
        prop_assert_eq!(cursor.seq(), seq);
        prop_assert_eq!(cursor.to_string(), text);
    }

    #[test]
    fn worker_ids_never_panic_and_round_trip(text in near_miss_text()) {
        match WorkerId::from_str(&text) {
            Ok(id) => {
                prop_assert!(WorkerId::has_shape(&text));
                prop_assert_eq!(id.as_str(), text.as_str());
            }
            Err(e) => {
                prop_assert!(!WorkerId::has_shape(&text));
                prop_assert_eq!(e.code(), "worker_not_found");
                // The message quotes at most 40 characters of what it was given.
                prop_assert!(e.to_string().chars().count() < 200, "{}", e);
            }
        }
    }

    #[test]
    fn issued_worker_ids_have_the_shape_and_parse(
        key in any::<String>(),
        other in any::<String>(),
        seed in any::<[u8; 32]>(),
    ) {
        let issuer = IdIssuer::from_key(seed);
        let runtime = RuntimeId::new("local").unwrap();
        let id = issuer.worker_id(&runtime, &SourceKey::new(key.clone()));
        prop_assert!(WorkerId::has_shape(id.as_str()));
        prop_assert_eq!(WorkerId::from_str(id.as_str()).unwrap(), id.clone());
        // The same key gives the same id, another key another id.
        prop_assert_eq!(issuer.worker_id(&runtime, &SourceKey::new(key.clone())), id.clone());
        if other != key {
            prop_assert_ne!(issuer.worker_id(&runtime, &SourceKey::new(other)), id);
        }
    }

    #[test]
    fn sizes_never_panic_and_round_trip(
        text in prop_oneof![any::<String>(), "[ 0-9]{0,22}[ kKmMgGiIbB]{0,4}"],
        n in any::<u64>(),
        unit in prop::sample::select(vec![
            ("", 1u64), ("B", 1), ("kB", 1_000), ("KiB", 1 << 10), ("MB", 1_000_000),
            ("MiB", 1 << 20), ("GB", 1_000_000_000), ("GiB", 1 << 30), ("mib", 1 << 20),
        ]),
    ) {
        let _ = de::parse_byte_size(&text);
        let written = format!("{n}{}", unit.0);
        prop_assert_eq!(de::parse_byte_size(&written), n.checked_mul(unit.1));
    }

    #[test]
    fn durations_never_panic_and_round_trip(text in any::<String>(), millis in 0u64..10_000_000_000) {
        let _ = de::duration(serde_json::Value::String(text));
        let d = Duration::from_millis(millis);
        let written = humantime::format_duration(d).to_string();
        let back = de::duration(serde_json::Value::String(written.clone()));
        prop_assert_eq!(back.ok(), Some(d), "{}", written);
    }

    #[test]
    fn the_scrubber_never_panics_and_leaves_no_path_or_url(msg in message()) {
        let out = sanitize_message(&msg);
        prop_assert!(out.chars().count() <= 513, "{}", out);
        prop_assert!(!out.chars().any(char::is_control), "{:?}", out);
        for word in out.split(' ') {
            prop_assert!(!word.contains("://"), "{:?} from {:?}", out, msg);
            let core = word.trim_matches(|c: char| "\"'`()[]{}<>,;.!?".contains(c));
            prop_assert!(
                !(core.starts_with('/') && core.len() > 1 && core[1..].contains('/')),
                "{:?} from {:?}", out, msg
            );
        }
        // Scrubbing what was scrubbed changes nothing more.
        prop_assert_eq!(sanitize_message(&out), out);
    }
}
