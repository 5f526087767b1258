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

/// Every error of a config file, in file order (those without a line last), each on a
/// line of its own when displayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigFileError>);

impl ConfigErrors {
    /// `errors` sorted by line (stable, so errors of one line keep their order), each
    /// message once.
    pub fn in_file_order(mut errors: Vec<ConfigFileError>) -> ConfigErrors {
        errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
        let mut seen = std::collections::HashSet::new();
        errors.retain(|e| seen.insert(e.message.clone()));
        ConfigErrors(errors)
    }

    /// The first error of the file, if any.
    pub fn into_first(self) -> Option<ConfigFileError> {
        self.0.into_iter().next()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

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
    /// For a key whose value is no table: the line its value ends on.
    pub(super) value_end: Option<usize>,
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

    /// How many keys and elements the file has.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The lines a key with a plain value (no table) spans, from the key to the value's
    /// end.
    pub(super) fn lines_of_value(&self, path: &str) -> Option<(usize, usize)> {
        let entry = self.entries.iter().find(|k| k.is_key && k.path == path)?;
        Some((entry.line, entry.value_end?))
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
        let is_table = matches!(value.get_ref(), DeValue::Table(_));
        out.push(KeyLine {
            path: path.clone(),
            is_key: true,
            line: line_of(text, key.span().start),
            value_end: (!is_table)
                .then(|| line_of(text, value.span().end.saturating_sub(1)))
                .filter(|&end| end >= line_of(text, key.span().start)),
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
                    value_end: None,
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
    let message = plain_words(inner.message().trim());
    let message = message.as_str();
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

/// serde's wording in plain words: `invalid type: integer `5`, expected usize` becomes
/// `invalid type: expected a whole number, found 5`; an unknown key gets the nearest
/// known one as the likely fix. A trailing ``in `table` `` is kept; other messages (a
/// source's own, "missing field …") are left as they are.
pub(super) fn plain_words(message: &str) -> String {
    let (head, context) = match split_context(message) {
        Some((head, context)) => (head.to_string(), Some(context)),
        None => (message.to_string(), None),
    };
    let head = head.replace('\n', " ");
    let rewritten = rewrite(head.trim()).unwrap_or(head);
    match context {
        Some(context) => format!("{rewritten} in `{context}`"),
        None => rewritten,
    }
}

fn rewrite(head: &str) -> Option<String> {
    for kind in ["invalid type", "invalid value"] {
        if let Some(rest) = head.strip_prefix(kind).and_then(|r| r.strip_prefix(": ")) {
            let (found, expected) = rest.rsplit_once(", expected ")?;
            return Some(format!(
                "{kind}: expected {}, found {}",
                expected_words(expected),
                found_words(found)
            ));
        }
    }
    if let Some(rest) = head.strip_prefix("unknown field ") {
        let (name, known) = match rest.split_once(", expected ") {
            Some((name, known)) => (name, Some(known)),
            None => (rest.split(',').next().unwrap_or(rest), None),
        };
        let name = name.trim_matches('`');
        let known: Vec<&str> = known.map(backticked).into_iter().flatten().collect();
        let mut out = format!("unknown field `{name}`");
        if let Some(near) = nearest(name, &known) {
            out.push_str(&format!("; did you mean `{near}`?"));
        }
        if !known.is_empty() {
            let list: Vec<String> = known.iter().map(|k| format!("`{k}`")).collect();
            out.push_str(&format!(" (the keys here: {})", list.join(", ")));
        } else if rest.contains("there are no fields") {
            out.push_str(" (this table takes no keys)");
        }
        return Some(out);
    }
    if let Some(rest) = head.strip_prefix("unknown variant ") {
        let (name, known) = rest.split_once(", expected ")?;
        let known: Vec<&str> = backticked(known).collect();
        let list: Vec<String> = known.iter().map(|k| format!("\"{k}\"")).collect();
        return Some(format!(
            "{} is not one of {}",
            name.replace('`', "\""),
            list.join(", ")
        ));
    }
    None
}

/// What serde's "expected …" means, for a person.
fn expected_words(expected: &str) -> String {
    let e = expected.trim();
    let words = match e {
        "usize" | "u8" | "u16" | "u32" | "u64" | "u128" | "an integer" | "integer" => {
            "a whole number (0 or more)"
        }
        "isize" | "i8" | "i16" | "i32" | "i64" | "i128" => "a whole number",
        "f32" | "f64" | "a float" => "a number",
        "a boolean" | "bool" => "true or false",
        "a string" | "a borrowed string" | "a string or path" | "path string" => {
            "a string in quotes"
        }
        "a sequence" => "a list, like [\"a\", \"b\"]",
        "a map" => "a table",
        "socket address" => "an address with a port, like \"127.0.0.1:7411\"",
        "IP address" => "an IP address, like \"127.0.0.1\"",
        "a character" | "char" => "one character",
        _ if e.starts_with("struct ") || e.starts_with("a map") => "a table",
        _ => return e.to_string(),
    };
    words.to_string()
}

/// What serde's "found …" (its `Unexpected`) means, for a person.
fn found_words(found: &str) -> String {
    let f = found.trim();
    let quoted = |prefix: &str| {
        f.strip_prefix(prefix)
            .map(|v| v.trim_matches('`').to_string())
    };
    if let Some(v) = quoted("integer ").or_else(|| quoted("floating point ")) {
        return v;
    }
    if let Some(v) = quoted("boolean ") {
        return v;
    }
    if let Some(v) = f.strip_prefix("string ") {
        return format!("the string {v}");
    }
    match f {
        "sequence" => "a list".into(),
        "map" => "a table".into(),
        "unit value" => "nothing".into(),
        other => other.to_string(),
    }
}

/// The known key nearest to `name` (a typo's likely fix): at most two edits away, or a
/// spelling without `_`.
fn nearest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    let squash = |s: &str| s.replace(['_', '-'], "").to_ascii_lowercase();
    known
        .iter()
        .map(|k| {
            let d = if squash(k) == squash(name) {
                0
            } else {
                edits(name, k)
            };
            (d, *k)
        })
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// The Levenshtein distance of two short strings.
fn edits(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(row[j]).min(row[j + 1])
            };
            prev = cur;
        }
    }
    row[b.len()]
}
