//! The descriptor file an older launcher writes for each worker, and how it is read.

use std::path::{Path, PathBuf};

use registry_core::limits::MAX_SHORT_TEXT;
use registry_core::Redacted;
use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The longest `socket` or `log` path accepted (the kernel's `PATH_MAX`).
const MAX_PATH_BYTES: usize = 4096;

/// A worker as its descriptor describes it. Holds a pid and paths: not `Serialize`, and they
/// are [`Redacted`] so the derived `Debug` never shows them.
#[derive(Clone, PartialEq, Eq, Debug)]
pub(crate) struct Descriptor {
    /// The process.
    pub(crate) pid: Redacted<i32>,
    /// When the process started, as the launcher saw it (to the second).
    pub(crate) started_at: OffsetDateTime,
    /// A name for people.
    pub(crate) name: Option<String>,
    /// A Unix socket that takes input lines (relative: from the spool directory).
    pub(crate) socket: Option<Redacted<PathBuf>>,
    /// The file the output goes to (relative: from the spool directory).
    pub(crate) log: Option<Redacted<PathBuf>>,
}

impl Descriptor {
    /// Parses a descriptor. Other fields than the known ones are ignored (an older launcher
    /// may write more). The error says which field is wrong and how, never what it holds:
    /// a value may be a path.
    pub(crate) fn parse(bytes: &[u8]) -> Result<Descriptor, String> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            // serde_json's syntax messages name a position, not content.
            match e.classify() {
                serde_json::error::Category::Eof => {
                    "it is not complete JSON (it ends too early)".to_string()
                }
                _ => format!(
                    "it is not valid JSON (line {}, column {})",
                    e.line(),
                    e.column()
                ),
            }
        })?;
        let Value::Object(map) = value else {
            return Err(format!(
                "it is {} where a JSON object is expected",
                kind_of(&value)
            ));
        };
        let pid = match map.get("pid") {
            None | Some(Value::Null) => return Err("field `pid` is missing".into()),
            Some(Value::Number(n)) => match n.as_i64() {
                Some(p) if p >= 1 && p <= i64::from(i32::MAX) => p as i32,
                _ => return Err("field `pid` must be a whole number from 1 to 2147483647".into()),
            },
            Some(other) => {
                return Err(format!(
                    "field `pid` must be a whole number, it is {}",
                    kind_of(other)
                ))
            }
        };
        let started_at = match map.get("started_at") {
            None | Some(Value::Null) => return Err("field `started_at` is missing".into()),
            Some(Value::String(s)) => OffsetDateTime::parse(s, &Rfc3339).map_err(|_| {
                "field `started_at` must be an RFC 3339 time such as \"2024-05-01T12:00:00Z\""
                    .to_string()
            })?,
            Some(other) => {
                return Err(format!(
                    "field `started_at` must be an RFC 3339 time string, it is {}",
                    kind_of(other)
                ))
            }
        };
        let name = text_field(&map, "name", MAX_SHORT_TEXT)?;
        let socket = text_field(&map, "socket", MAX_PATH_BYTES)?.map(PathBuf::from);
        let log = text_field(&map, "log", MAX_PATH_BYTES)?.map(PathBuf::from);
        Ok(Descriptor {
            pid: Redacted(pid),
            started_at,
            name,
            socket: socket.map(Redacted),
            log: log.map(Redacted),
        })
    }

    /// The start time in whole seconds since the epoch (what the key and the liveness check
    /// use).
    pub(crate) fn started_secs(&self) -> i64 {
        self.started_at.unix_timestamp()
    }

    /// Makes relative `socket` and `log` paths relative to `spool_dir`.
    pub(crate) fn resolve(mut self, spool_dir: &Path) -> Descriptor {
        let resolve = |p: Redacted<PathBuf>| {
            if p.is_absolute() {
                p
            } else {
                Redacted(spool_dir.join(p.into_inner()))
            }
        };
        self.socket = self.socket.map(resolve);
        self.log = self.log.map(resolve);
        self
    }
}

/// An optional string field: absent or `null` is `None`; an empty string, a NUL or more
/// than `max` bytes is an error.
fn text_field(map: &Map<String, Value>, field: &str, max: usize) -> Result<Option<String>, String> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => {
            Err(format!("field `{field}` is empty (leave it out instead)"))
        }
        Some(Value::String(s)) if s.len() > max => {
            Err(format!("field `{field}` is longer than {max} bytes"))
        }
        Some(Value::String(s)) if s.contains('\0') => {
            Err(format!("field `{field}` holds a NUL character"))
        }
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!(
            "field `{field}` must be a string, it is {}",
            kind_of(other)
        )),
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Descriptor, String> {
        Descriptor::parse(text.as_bytes())
    }

    #[test]
    fn a_full_descriptor_parses() {
        let d = parse(
            r#"{"pid": 4242, "started_at": "2024-05-01T12:00:00Z", "name": "build",
                "socket": "/run/legacy/w1.sock", "log": "w1.log"}"#,
        )
        .unwrap();
        assert_eq!(d.pid, 4242);
        assert_eq!(d.started_secs(), 1_714_564_800);
        assert_eq!(d.name.as_deref(), Some("build"));
        assert_eq!(
            d.socket.as_deref(),
            Some(&PathBuf::from("/run/legacy/w1.sock"))
        );
        let d = d.resolve(Path::new("/spool"));
        assert_eq!(d.log.as_deref(), Some(&PathBuf::from("/spool/w1.log")));
        assert_eq!(
            d.socket.as_deref(),
            Some(&PathBuf::from("/run/legacy/w1.sock"))
        );
    }

    #[test]
    fn optional_fields_may_be_absent_or_null_and_extra_fields_are_ignored() {
        let d = parse(
            r#"{"pid": 7, "started_at": "2024-05-01T14:00:00+02:00", "name": null,
                "launcher_version": 3, "env": {"A": "B"}, "argv": ["sh"]}"#,
        )
        .unwrap();
        assert_eq!(d.pid, 7);
        assert_eq!(d.started_secs(), 1_714_564_800);
        assert_eq!((d.name, d.socket, d.log), (None, None, None));
        // Fractions of a second are accepted and cut to the second.
        let d = parse(r#"{"pid": 7, "started_at": "2024-05-01T12:00:00.9Z"}"#).unwrap();
        assert_eq!(d.started_secs(), 1_714_564_800);
    }

    #[test]
    fn malformed_descriptors_say_which_field_and_not_what_it_holds() {
        let cases = [
            ("", "not complete JSON"),
            ("{\"pid\": 1,", "not complete JSON"),
            ("pid=1", "not valid JSON"),
            ("[1, 2]", "an array where a JSON object"),
            (
                r#"{"started_at": "2024-05-01T12:00:00Z"}"#,
                "`pid` is missing",
            ),
            (
                r#"{"pid": "/secret/1", "started_at": "2024-05-01T12:00:00Z"}"#,
                "`pid` must be a whole number, it is a string",
            ),
            (
                r#"{"pid": 1.5, "started_at": "2024-05-01T12:00:00Z"}"#,
                "`pid` must be a whole number from 1",
            ),
            (
                r#"{"pid": 0, "started_at": "2024-05-01T12:00:00Z"}"#,
                "`pid` must be a whole number from 1",
            ),
            (
                r#"{"pid": 99999999999, "started_at": "2024-05-01T12:00:00Z"}"#,
                "`pid`",
            ),
            (r#"{"pid": 1}"#, "`started_at` is missing"),
            (
                r#"{"pid": 1, "started_at": "/secret/yesterday"}"#,
                "`started_at` must be an RFC 3339 time",
            ),
            (
                r#"{"pid": 1, "started_at": 1714564800}"#,
                "`started_at` must be an RFC 3339 time string, it is a number",
            ),
            (
                r#"{"pid": 1, "started_at": "2024-05-01T12:00:00Z", "name": 5}"#,
                "`name` must be a string",
            ),
            (
                r#"{"pid": 1, "started_at": "2024-05-01T12:00:00Z", "socket": ["/secret/s"]}"#,
                "`socket` must be a string, it is an array",
            ),
            (
                r#"{"pid": 1, "started_at": "2024-05-01T12:00:00Z", "log": ""}"#,
                "`log` is empty",
            ),
            (
                r#"{"pid": 1, "started_at": "2024-05-01T12:00:00Z", "log": "a\u0000b"}"#,
                "`log` holds a NUL",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text).expect_err(text);
            assert!(err.contains(want), "{text}: {err}");
            assert!(!err.contains("secret"), "{text}: {err}");
        }
        let long_name = format!(
            r#"{{"pid": 1, "started_at": "2024-05-01T12:00:00Z", "name": "{}"}}"#,
            "n".repeat(MAX_SHORT_TEXT + 1)
        );
        assert!(parse(&long_name).unwrap_err().contains("`name` is longer"));
    }

    #[test]
    fn debug_redacts_pid_and_paths() {
        let d = parse(
            r#"{"pid": 31337, "started_at": "2024-05-01T12:00:00Z",
                "socket": "/srv/hidden.sock", "log": "/srv/hidden.log"}"#,
        )
        .unwrap();
        let text = format!("{d:?}");
        assert!(
            !text.contains("31337") && !text.contains("hidden"),
            "{text}"
        );
    }
}

/// Property tests: a descriptor file holds whatever an older launcher (or a broken disk)
/// wrote, so parsing never panics, and what a launcher writes reads back.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    /// A JSON object with the known fields, each sometimes of the wrong type, missing or
    /// out of range, plus unknown fields.
    fn near_descriptor() -> impl Strategy<Value = String> {
        let value = prop_oneof![
            Just("null".to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|n| format!("{n:?}")),
            any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
            Just("\"2024-05-01T12:00:00Z\"".to_string()),
            Just("\"2024-13-01T12:00:00Z\"".to_string()),
            Just("[1, 2]".to_string()),
            Just("{\"a\": 1}".to_string()),
            Just("true".to_string()),
        ];
        let field = prop_oneof![
            Just("pid"),
            Just("started_at"),
            Just("name"),
            Just("socket"),
            Just("log"),
            Just("argv"),
        ];
        prop::collection::vec((field, value), 0..7).prop_map(|fields| {
            let body: Vec<String> = fields.iter().map(|(k, v)| format!("{k:?}: {v}")).collect();
            format!("{{{}}}", body.join(", "))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn any_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            if let Err(why) = Descriptor::parse(&bytes) {
                prop_assert!(!why.is_empty());
            }
        }

        #[test]
        fn near_misses_never_panic_and_never_quote_a_value(text in near_descriptor()) {
            match Descriptor::parse(text.as_bytes()) {
                Ok(d) => prop_assert!(*d.pid >= 1),
                // The reason names a field or a position, never a value (it may be a path).
                Err(why) => prop_assert!(!why.contains('"'), "{}", why),
            }
        }

        #[test]
        fn truncated_descriptors_never_panic(cut in 0usize..120) {
            let full = br#"{"pid": 4242, "started_at": "2024-05-01T12:00:00Z", "name": "b", "socket": "s", "log": "l"}"#;
            let cut = cut.min(full.len());
            let parsed = Descriptor::parse(&full[..cut]);
            prop_assert_eq!(parsed.is_ok(), cut == full.len());
        }

        #[test]
        fn what_a_launcher_writes_reads_back(
            pid in 1i32..=i32::MAX,
            secs in 0i64..4_000_000_000,
            name in proptest::option::of("[a-zA-Z0-9 ._-]{1,40}"),
            socket in proptest::option::of("[a-z0-9/._-]{1,60}"),
            log in proptest::option::of("[a-z0-9/._-]{1,60}"),
        ) {
            let started_at = OffsetDateTime::from_unix_timestamp(secs).unwrap();
            let mut map = serde_json::Map::new();
            map.insert("pid".into(), pid.into());
            map.insert("started_at".into(), started_at.format(&Rfc3339).unwrap().into());
            for (key, v) in [("name", &name), ("socket", &socket), ("log", &log)] {
                if let Some(v) = v {
                    map.insert(key.into(), v.clone().into());
                }
            }
            let bytes = serde_json::to_vec(&map).unwrap();
            let d = Descriptor::parse(&bytes).unwrap();
            prop_assert_eq!(*d.pid, pid);
            prop_assert_eq!(d.started_secs(), secs);
            prop_assert_eq!(d.name, name);
            prop_assert_eq!(d.socket.map(|s| s.into_inner()), socket.map(PathBuf::from));
            prop_assert_eq!(d.log.map(|s| s.into_inner()), log.map(PathBuf::from));
        }
    }
}
