//! Locating lines: where in the file each key stands, and the error that names the line.
//!
//! The file is indexed once by key path (`server.tokens[0].scope`: map keys joined with
//! dots, array elements as `[i]`). An error of serde comes with the same path from
//! `serde_path_to_error`, so its line is looked up by the path, never read out of the
//! message.

use std::fmt;

use serde_path_to_error::{Path, Segment};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// An error in the config, for the operator: it names the key at fault and, when known,
/// the 1-based line. It never holds a token's secret.
///
/// Displays as `line N: message`, or `message` when the line is unknown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", LinePrefix(*line))]
pub struct ConfigFileError {
    /// The 1-based line in the file, when the error has one.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl ConfigFileError {
    pub(super) fn new(line: Option<usize>, message: impl Into<String>) -> Self {
        ConfigFileError {
            line,
            message: message.into(),
        }
    }
}

/// Displays `line N: ` for a known line, nothing otherwise.
struct LinePrefix(Option<usize>);

impl fmt::Display for LinePrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(line) => write!(f, "line {line}: "),
            None => Ok(()),
        }
    }
}

/// A key, or an element of an array, and the line it starts on.
pub(super) struct KeyLine {
    /// The full path, e.g. `runtimes[0].profiles.shell.command` or `server.tokens[1]`.
    pub(super) path: String,
    /// A key (else an array element).
    pub(super) is_key: bool,
    /// The 1-based line of the key (of an element: of the element, or its `[[…]]` header).
    pub(super) line: usize,
}

/// Every key and array element of a file, in file order, with its line.
pub(super) struct KeyIndex {
    entries: Vec<KeyLine>,
}

impl KeyIndex {
    /// The index of `doc`, parsed from `text`.
    pub(super) fn new(text: &str, doc: &DeTable<'_>) -> KeyIndex {
        let mut entries = Vec::new();
        index_table(text, doc, "", &mut entries);
        entries.sort_by_key(|k| k.line);
        KeyIndex { entries }
    }

    /// The line of the key or element at exactly `path`.
    pub(super) fn line(&self, path: &str) -> Option<usize> {
        self.entries.iter().find(|k| k.path == path).map(|k| k.line)
    }

    /// The keys (not elements) below `prefix` (which ends with `.`), in file order.
    pub(super) fn keys_under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a KeyLine> {
        self.entries
            .iter()
            .filter(move |k| k.is_key && k.path.starts_with(prefix))
    }
}

fn index_table(text: &str, table: &DeTable<'_>, prefix: &str, out: &mut Vec<KeyLine>) {
    for (key, value) in table.iter() {
        let leaf = key.get_ref();
        let path = if prefix.is_empty() {
            leaf.to_string()
        } else {
            format!("{prefix}.{leaf}")
        };
        out.push(KeyLine {
            path: path.clone(),
            is_key: true,
            line: line_of(text, key.span().start),
        });
        index_value(text, value, &path, out);
    }
}

fn index_value(text: &str, value: &Spanned<DeValue<'_>>, path: &str, out: &mut Vec<KeyLine>) {
    match value.get_ref() {
        DeValue::Table(table) => index_table(text, table, path, out),
        DeValue::Array(array) => {
            for (i, element) in array.iter().enumerate() {
                let path = format!("{path}[{i}]");
                out.push(KeyLine {
                    path: path.clone(),
                    is_key: false,
                    line: line_of(text, element.span().start),
                });
                index_value(text, element, &path, out);
            }
        }
        _ => {}
    }
}

/// `path` as the index writes it: `a.b[0].c`.
pub(super) fn path_text(path: &Path) -> String {
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
    out
}

/// `path` without its array indices, as an operator names the key: `server.tokens.scope`.
pub(super) fn plain(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => in_index = true,
            ']' => in_index = false,
            _ if !in_index => out.push(c),
            _ => {}
        }
    }
    out
}

/// A TOML syntax error, at its line.
pub(super) fn syntax_error(text: &str, err: &toml::de::Error) -> ConfigFileError {
    let message = err.message().trim();
    let Some(span) = err.span() else {
        return ConfigFileError::new(None, format!("invalid TOML: {message}"));
    };
    let found = text
        .get(span.clone())
        .filter(|s| !s.is_empty() && s.len() <= 64 && !s.contains('\n'));
    let message = match found {
        Some(found) if message == "duplicate key" => format!("duplicate key `{found}`"),
        _ => format!("invalid TOML: {message}"),
    };
    ConfigFileError::new(Some(line_of(text, span.start)), message)
}

/// An error of serde on the parsed file, at the line of the key path it carries, naming
/// the key: ``in `server`: unknown field `lisen` `` when serde's message names the key
/// itself, else `` `server.listen`: invalid socket address ``.
pub(super) fn value_error(
    text: &str,
    index: &KeyIndex,
    err: &serde_path_to_error::Error<toml::de::Error>,
) -> ConfigFileError {
    let inner = err.inner();
    let message = inner.message().trim();
    let path = path_text(err.path());
    // The key's own line; for a path the file does not hold (a default filled in), the
    // place toml reports.
    let line = index
        .line(&path)
        .or_else(|| inner.span().map(|span| line_of(text, span.start)));
    if path.is_empty() {
        return ConfigFileError::new(line, message);
    }
    let named = plain(&path);
    let ends_with_key = !path.ends_with(']');
    let leaf = named.rsplit('.').next().unwrap_or(&named);
    let message = if message.contains(&format!("`{leaf}`")) {
        match parent(&named) {
            Some(parent) if ends_with_key => format!("in `{parent}`: {message}"),
            _ => message.to_string(),
        }
    } else {
        format!("`{named}`: {message}")
    };
    ConfigFileError::new(line, message)
}

/// The 1-based line of byte `at` in `text`.
pub(super) fn line_of(text: &str, at: usize) -> usize {
    let end = at.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// `Some(line)` for a line from a file, `None` for 0.
pub(super) fn known_line(line: usize) -> Option<usize> {
    (line > 0).then_some(line)
}

/// The path without its last part, if it has more than one.
pub(super) fn parent(path: &str) -> Option<&str> {
    path.rsplit_once('.').map(|(parent, _)| parent)
}

/// `message` split before its trailing ``in `P` `` (the table or key it is about, as toml
/// ends its messages): the text before it and `P`. `None` when it does not end so.
pub(super) fn split_context(message: &str) -> Option<(&str, &str)> {
    let body = message.strip_suffix('`')?;
    let open = body.rfind('`')?;
    let context = &body[open + 1..];
    let head = body[..open].strip_suffix("in ")?;
    let separated = head.is_empty() || head.ends_with(char::is_whitespace);
    (separated && !context.is_empty()).then_some((head.trim_end(), context))
}

/// The `backtick-quoted` parts of `message`, in order.
pub(super) fn backticked(message: &str) -> impl Iterator<Item = &str> {
    message.split('`').skip(1).step_by(2)
}
