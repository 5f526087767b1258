//! Source kinds by name: the one shape a source crate registers in ([`SourceKind`],
//! [`SourceFactories::add`]), and the config helpers every source crate shares.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use crate::{Redacted, RedactedValues, RegistryError, RuntimeId, RuntimeSource};

/// What a factory gets to build one runtime's source. `Debug` shows the table's keys, not
/// its values (they may be URLs and paths), and hides the state directory.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// The runtime's id (its `name` in the config).
    pub runtime_id: RuntimeId,
    /// The runtime's table with `name` and `source` taken out.
    pub table: RedactedValues<toml::Table>,
    /// A directory this runtime may keep state in (created on demand by the source).
    pub state_dir: Redacted<PathBuf>,
}

impl SourceConfig {
    /// Parses the table into the source's own config type (which should use
    /// `#[serde(deny_unknown_fields)]`). The error carries the key path of the value at
    /// fault ([`ConfigError::path`], e.g. `profiles.shell.grace`; for a missing key, the
    /// table that lacks it; for an unknown key, the table it is in).
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        serde_path_to_error::deserialize(toml::Value::Table(self.table.0.clone())).map_err(
            |e: serde_path_to_error::Error<toml::de::Error>| {
                let path = key_path(e.path());
                // The whole text: toml ends it with the key path too ("in `profiles.shell`"),
                // which `message()` alone drops, so the message names the key by itself.
                let message = e.inner().to_string().trim().replace('\n', " ");
                let error = ConfigError::new(self.runtime_id.as_str(), message);
                match path {
                    Some(path) => error.at(path),
                    None => error,
                }
            },
        )
    }
}

impl SourceConfig {
    /// The config error of this runtime for a source that could not be built from a
    /// parsed config: the operator's message is the error's own, and for an internal
    /// error its detail (which a source writes for the log, naming no secret).
    pub fn build_error(&self, error: RegistryError) -> ConfigError {
        ConfigError::new(
            self.runtime_id.as_str(),
            error
                .internal_detail()
                .map_or_else(|| error.to_string(), str::to_string),
        )
    }
}

/// `a.b[0].c` for a serde path; `None` for the root.
fn key_path(path: &serde_path_to_error::Path) -> Option<String> {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {}
        }
    }
    (!out.is_empty()).then_some(out)
}

/// A config error of one runtime. Meant for the operator, so it may name keys.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("runtime {runtime:?}: {message}")]
pub struct ConfigError {
    /// The runtime whose table is at fault.
    pub runtime: String,
    /// What is wrong, naming the key.
    pub message: String,
    /// The key path of the value at fault within the runtime's table, as `a.b[0].c`
    /// (`profiles.shell.grace`, `command[1]`): the server places the error at that key's
    /// line. `None` when the error is about no one key (a source that could not start).
    pub path: Option<String>,
}

impl ConfigError {
    /// An error of runtime `runtime` about no particular key.
    pub fn new(runtime: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            runtime: runtime.into(),
            message: message.into(),
            path: None,
        }
    }

    /// The same error, about the value at key path `path` (see [`ConfigError::path`]).
    pub fn at(mut self, path: impl Into<String>) -> Self {
        self.path = Some(path.into());
        self
    }
}

/// A kind of source, as a server learns it: its name in configs and how one runtime's
/// source is built from its table. Each source crate implements it on its source type,
/// and a server adds the kind with [`SourceFactories::add`]:
///
/// ```
/// # use registry_core::{SourceFactories, SourceKind};
/// # fn demo<MySource: SourceKind>() -> Result<(), registry_core::RegistryError> {
/// let mut factories = SourceFactories::new();
/// factories.add::<MySource>()?;
/// # Ok(()) }
/// ```
pub trait SourceKind: RuntimeSource + Sized {
    /// The kind's name: `source = "<KIND>"` in a `[[runtimes]]` table.
    const KIND: &'static str;

    /// Builds one runtime's source from its config: parse the table (with
    /// [`SourceConfig::parse`], so an unknown key is an error naming it), check what can be
    /// checked, and start. It runs when the registry is built (at start and by
    /// `check-config`), inside a tokio runtime; it should not wait on the network or on
    /// workers.
    fn from_config(config: &SourceConfig) -> Result<Self, ConfigError>;
}

/// Builds a source from its config.
pub type SourceFactory =
    Arc<dyn Fn(SourceConfig) -> Result<Arc<dyn RuntimeSource>, ConfigError> + Send + Sync>;

/// Source kinds by name. Each source crate adds its own with its `register` function.
#[derive(Default, Clone)]
pub struct SourceFactories {
    kinds: BTreeMap<String, SourceFactory>,
}

impl SourceFactories {
    /// No kinds.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the kind `S`, built by [`SourceKind::from_config`]. A kind added twice is
    /// refused (`conflict`), as with [`register`](Self::register).
    pub fn add<S: SourceKind>(&mut self) -> Result<(), RegistryError> {
        self.register(S::KIND, |config: SourceConfig| {
            Ok(Arc::new(S::from_config(&config)?) as Arc<dyn RuntimeSource>)
        })
    }

    /// Adds a kind built by a closure, for a kind that is no type of its own (a test's
    /// probe, a kind made at run time). A kind registered twice is refused, so two crates
    /// can't silently shadow each other.
    pub fn register<F>(&mut self, kind: &str, factory: F) -> Result<(), RegistryError>
    where
        F: Fn(SourceConfig) -> Result<Arc<dyn RuntimeSource>, ConfigError> + Send + Sync + 'static,
    {
        if self.kinds.contains_key(kind) {
            return Err(RegistryError::Conflict(format!(
                "source kind {kind:?} is registered twice"
            )));
        }
        self.kinds.insert(kind.to_string(), Arc::new(factory));
        Ok(())
    }

    /// The known kinds, sorted.
    pub fn kinds(&self) -> Vec<&str> {
        self.kinds.keys().map(String::as_str).collect()
    }

    /// Builds a source of `kind`. An unknown kind names the known ones.
    pub fn build(
        &self,
        kind: &str,
        config: SourceConfig,
    ) -> Result<Arc<dyn RuntimeSource>, ConfigError> {
        match self.kinds.get(kind) {
            Some(factory) => factory(config),
            None => Err(ConfigError::new(
                config.runtime_id.as_str(),
                format!(
                    "unknown source kind {kind:?}; known kinds: {}",
                    self.kinds().join(", ")
                ),
            )),
        }
    }
}

impl fmt::Debug for SourceFactories {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceFactories")
            .field("kinds", &self.kinds())
            .finish()
    }
}

/// Serde helpers for config values.
pub mod de {
    use super::*;

    /// A duration written as `"10s"`, `"500ms"`, `"1h"` (humantime syntax).
    pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration ({e}); write e.g. \"10s\", \"500ms\", \"1h\""
            ))
        })
    }

    /// An optional duration, as [`duration`]; `null` (in JSON) is the same as not given.
    pub fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(text) => {
                duration(serde::de::value::StrDeserializer::<D::Error>::new(&text)).map(Some)
            }
        }
    }

    /// A field whose `null` (in JSON) is the same as not given: the type's default.
    pub fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: Default + Deserialize<'de>,
    {
        Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
    }

    /// An optional table read only from a map (or `null`, as not given). serde's derive
    /// also reads a struct from a sequence, fields by position (`[null, "1s"]`); a request
    /// that writes a table as a list is refused instead.
    pub fn opt_table<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        struct Table<T>(std::marker::PhantomData<T>);

        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Table<T> {
            type Value = Option<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }

            fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }

            fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }

            fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
                d.deserialize_map(self)
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Some)
            }
        }

        d.deserialize_option(Table(std::marker::PhantomData))
    }

    /// A size in bytes: an integer, or a string such as `"1MiB"`, `"512KiB"`, `"64kB"`.
    pub fn byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(SizeVisitor)
    }

    /// Reads a size from an integer or a string, and says what a size is otherwise.
    struct SizeVisitor;

    impl serde::de::Visitor<'_> for SizeVisitor {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a size: bytes as a whole number, or a string such as \"1MiB\"")
        }

        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<u64, E> {
            Ok(n)
        }

        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<u64, E> {
            u64::try_from(n)
                .map_err(|_| E::custom(format!("{n} is not a size: a size is not negative")))
        }

        fn visit_str<E: serde::de::Error>(self, t: &str) -> Result<u64, E> {
            parse_byte_size(t).ok_or_else(|| {
                E::custom(format!(
                    "{t:?} is not a size; write bytes as a number, or e.g. \"1MiB\", \"512KiB\""
                ))
            })
        }
    }

    /// An optional size, as [`byte_size`].
    pub fn opt_byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        byte_size(d).map(Some)
    }

    /// Parses `"1MiB"`-style sizes (B, kB, KiB, MB, MiB, GB, GiB; case-insensitive).
    pub fn parse_byte_size(text: &str) -> Option<u64> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().ok()?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1_000,
            "kib" => 1 << 10,
            "mb" => 1_000_000,
            "mib" => 1 << 20,
            "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            _ => return None,
        };
        n.checked_mul(mult)
    }
}

#[cfg(test)]
mod tests {
    use super::de::*;
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Demo {
        #[serde(deserialize_with = "duration")]
        grace: Duration,
        #[serde(deserialize_with = "byte_size")]
        retention: u64,
    }

    fn cfg(text: &str) -> SourceConfig {
        SourceConfig {
            runtime_id: RuntimeId::new("demo").unwrap(),
            table: text.parse().unwrap(),
            state_dir: PathBuf::from("/nonexistent").into(),
        }
    }

    #[test]
    fn parse_reads_durations_and_sizes() {
        let d: Demo = cfg("grace = \"1500ms\"\nretention = \"2MiB\"")
            .parse()
            .unwrap();
        assert_eq!(d.grace, Duration::from_millis(1500));
        assert_eq!(d.retention, 2 << 20);
        let d: Demo = cfg("grace = \"1h\"\nretention = 4096").parse().unwrap();
        assert_eq!(d.grace, Duration::from_secs(3600));
        assert_eq!(d.retention, 4096);
    }

    #[test]
    fn parse_errors_name_the_key() {
        let err = cfg("grace = \"1s\"\nretention = 1\nretension = 2")
            .parse::<Demo>()
            .unwrap_err();
        assert!(err.message.contains("retension"), "{err}");
        assert!(err.to_string().contains("demo"), "{err}");
        let err = cfg("grace = \"soon\"\nretention = 1")
            .parse::<Demo>()
            .unwrap_err();
        assert!(err.message.contains("not a duration"), "{err}");
        assert_eq!(err.path.as_deref(), Some("grace"), "{err:?}");
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Profile {
        #[serde(deserialize_with = "duration")]
        grace: Duration,
        command: Vec<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Nested {
        profiles: BTreeMap<String, Profile>,
    }

    #[test]
    fn parse_errors_carry_the_key_path_of_the_value_at_fault() {
        let path = |text: &str| cfg(text).parse::<Nested>().unwrap_err().path;
        let ok = "command = [\"/bin/sh\"]\ngrace = \"1s\"";
        assert_eq!(
            path(&format!(
                "[profiles.a]\n{ok}\n[profiles.shell]\ncommand = [\"x\"]\ngrace = \"soon\""
            )),
            Some("profiles.shell.grace".into())
        );
        assert_eq!(
            path("[profiles.a]\ncommand = [\"/bin/sh\", 5]\ngrace = \"1s\""),
            Some("profiles.a.command[1]".into())
        );
        // A missing key: the table that lacks it.
        assert_eq!(
            path("[profiles.b]\ngrace = \"1s\""),
            Some("profiles.b".into())
        );
    }

    #[test]
    fn byte_sizes_parse_with_units() {
        assert_eq!(parse_byte_size("10"), Some(10));
        assert_eq!(parse_byte_size("64kB"), Some(64_000));
        assert_eq!(parse_byte_size("1 MiB"), Some(1 << 20));
        assert_eq!(parse_byte_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_byte_size("1.5MiB"), None);
        assert_eq!(parse_byte_size("MiB"), None);
        assert_eq!(parse_byte_size("99999999999999GiB"), None);
    }
}
