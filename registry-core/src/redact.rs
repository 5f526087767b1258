//! Redaction in `Debug`: one wrapper for a value that is kept and used but never shown, so
//! a type holding internal authority (a path, a secret, a remote name) can derive `Debug`
//! and a new field is never shown by accident.

use std::fmt;
use std::ops::{Deref, DerefMut};

use serde::{Deserialize, Deserializer};

/// What [`Redacted`]'s `Debug` prints in place of the value.
pub const DEBUG_PLACEHOLDER: &str = "<redacted>";

/// A value whose `Debug` prints `<redacted>` and nothing of the value: not its length, not
/// whether an `Option` inside is set. It is neither `Display` nor `Serialize`, so it
/// can't reach a response or a log line by formatting either.
///
/// It reads as the value it holds (`Deref`), deserializes as that value, and compares
/// with it, so a config field or a struct field changes only its type.
///
/// ```
/// use registry_core::Redacted;
///
/// #[derive(Debug)]
/// struct Link {
///     name: String,
///     url: Redacted<String>,
/// }
///
/// let link = Link { name: "gpu-box".into(), url: Redacted("http://10.0.0.7:7411".into()) };
/// assert_eq!(format!("{link:?}"), r#"Link { name: "gpu-box", url: <redacted> }"#);
/// assert!(link.url.starts_with("http://"));
/// ```
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Redacted<T>(pub T);

impl<T> Redacted<T> {
    /// The value.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> fmt::Debug for Redacted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(DEBUG_PLACEHOLDER)
    }
}

impl<T> Deref for Redacted<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> DerefMut for Redacted<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T: AsRef<U>, U: ?Sized> AsRef<U> for Redacted<T> {
    fn as_ref(&self) -> &U {
        self.0.as_ref()
    }
}

impl<T> From<T> for Redacted<T> {
    fn from(value: T) -> Self {
        Redacted(value)
    }
}

impl From<&str> for Redacted<String> {
    fn from(value: &str) -> Self {
        Redacted(value.to_string())
    }
}

impl From<&str> for Redacted<std::path::PathBuf> {
    fn from(value: &str) -> Self {
        Redacted(value.into())
    }
}

impl<T: PartialEq> PartialEq<T> for Redacted<T> {
    fn eq(&self, other: &T) -> bool {
        self.0 == *other
    }
}

impl PartialEq<&str> for Redacted<String> {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<Redacted<String>> for &str {
    fn eq(&self, other: &Redacted<String>) -> bool {
        *self == other.0
    }
}

impl PartialEq<Redacted<String>> for String {
    fn eq(&self, other: &Redacted<String>) -> bool {
        *self == other.0
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Redacted<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(d).map(Redacted)
    }
}

/// Serializes an optional [`Redacted`] value as the value itself, for the one field that must
/// cross a wire on purpose (`#[serde(serialize_with = "…")]`): [`Redacted`] is not
/// `Serialize`, so nothing else writes it out by accident.
pub fn serialize_revealed<T: serde::Serialize, S: serde::Serializer>(
    value: &Option<Redacted<T>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    serde::Serialize::serialize(&value.as_ref().map(|v| &v.0), s)
}

/// A map whose `Debug` shows its keys and hides its values: for an environment or a config
/// table, where which keys are set helps a reader and what they hold may be a secret or a
/// path. It reads, deserializes, serializes and compares as the map it holds.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RedactedValues<M>(pub M);

impl<K: fmt::Debug, V> fmt::Debug for RedactedValues<std::collections::BTreeMap<K, V>> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, Redacted(()))))
            .finish()
    }
}

impl fmt::Debug for RedactedValues<toml::Table> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, Redacted(()))))
            .finish()
    }
}

impl<M> Deref for RedactedValues<M> {
    type Target = M;
    fn deref(&self) -> &M {
        &self.0
    }
}

impl<M> DerefMut for RedactedValues<M> {
    fn deref_mut(&mut self) -> &mut M {
        &mut self.0
    }
}

impl<'a, M> IntoIterator for &'a RedactedValues<M>
where
    &'a M: IntoIterator,
{
    type Item = <&'a M as IntoIterator>::Item;
    type IntoIter = <&'a M as IntoIterator>::IntoIter;
    fn into_iter(self) -> Self::IntoIter {
        (&self.0).into_iter()
    }
}

impl<M: std::str::FromStr> std::str::FromStr for RedactedValues<M> {
    type Err = M::Err;
    fn from_str(text: &str) -> Result<Self, M::Err> {
        text.parse().map(RedactedValues)
    }
}

impl<M> From<M> for RedactedValues<M> {
    fn from(value: M) -> Self {
        RedactedValues(value)
    }
}

impl<M: PartialEq> PartialEq<M> for RedactedValues<M> {
    fn eq(&self, other: &M) -> bool {
        self.0 == *other
    }
}

impl<'de, M: Deserialize<'de>> Deserialize<'de> for RedactedValues<M> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        M::deserialize(d).map(RedactedValues)
    }
}

impl<M: serde::Serialize> serde::Serialize for RedactedValues<M> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_nothing_of_the_value() {
        let secret = Redacted("hunter2-0123456789".to_string());
        assert_eq!(format!("{secret:?}"), "<redacted>");
        assert_eq!(format!("{secret:#?}"), "<redacted>");
        let none: Redacted<Option<String>> = Redacted(None);
        let some = Redacted(Some("x".to_string()));
        assert_eq!(format!("{none:?}"), format!("{some:?}"));
    }

    #[test]
    fn it_reads_deserializes_and_compares_as_its_value() {
        #[derive(Deserialize, Debug)]
        struct File {
            path: Redacted<String>,
            #[serde(default)]
            other: Redacted<Option<String>>,
        }
        let file: File = toml::from_str("path = \"/srv/hidden\"").unwrap();
        assert_eq!(file.path, "/srv/hidden");
        assert_eq!(file.path.len(), 11);
        assert!(file.other.is_none());
        assert!(!format!("{file:?}").contains("hidden"));
    }

    #[test]
    fn a_map_shows_its_keys_and_never_its_values() {
        let env: RedactedValues<std::collections::BTreeMap<String, String>> =
            std::collections::BTreeMap::from([("TOKEN".to_string(), "s3cr3t".to_string())]).into();
        let debug = format!("{env:?}");
        assert!(
            debug.contains("TOKEN") && !debug.contains("s3cr3t"),
            "{debug}"
        );
        let table: RedactedValues<toml::Table> =
            toml::from_str("url = \"http://10.0.0.7:7411\"").unwrap();
        let debug = format!("{table:?}");
        assert!(
            debug.contains("url") && !debug.contains("10.0.0.7"),
            "{debug}"
        );
        assert_eq!(
            table.get("url").and_then(|v| v.as_str()),
            Some("http://10.0.0.7:7411")
        );
    }
}
