//! Every error of a file at once: reading past the first wrong value, and
//! [`Config::check_file`], what `roster check-config` and a failed start report.
//!
//! serde stops at the first wrong value. To find the next, the lines of the key at fault
//! are blanked in a copy of the file (every other line keeps its number) and the copy is
//! read again, until it reads (or an error names no key that can be stepped over, such as
//! a missing one). Each runtime's table is built again without the key path its source's
//! error carries, the same way. Errors are then sorted by line.

use std::path::Path;
use std::time::Duration;

use registry_core::SourceFactories;
use toml::de::DeTable;

use super::lines::{line_of, path_text, syntax_error, value_error, ConfigFileError, KeyIndex};
use super::runtimes::{default_runtime, every_runtime};
use super::{Config, ConfigErrors, RawFile};

/// Reads `text` as far as it can: the config (with the keys at fault left at their
/// defaults) unless the file could not be read at all, and every error found.
pub(super) fn parse_every(text: &str) -> (Option<Config>, Vec<ConfigFileError>) {
    let doc = match DeTable::parse(text) {
        Ok(doc) => doc,
        Err(e) => return (None, vec![syntax_error(text, &e)]),
    };
    let index = KeyIndex::new(text, doc.get_ref());
    drop(doc);
    let mut errors = Vec::new();
    let Some((raw, text)) = read_past_errors(text, &index, &mut errors) else {
        return (None, errors);
    };
    // The checks of `[server]` look at what serde read: after a key was blanked they would
    // report what blanking it caused (a token left without its secret's source).
    if errors.is_empty() {
        errors.extend(raw.server.problems(&index));
    }
    let runtimes = if raw.runtimes.is_empty() {
        vec![default_runtime()]
    } else {
        let raws = raw
            .runtimes
            .into_iter()
            .map(|r| (line_of(&text, r.span().start), r.into_inner()))
            .collect();
        let (runtimes, more) = every_runtime(raws, &index);
        errors.extend(more);
        runtimes
    };
    (
        Some(Config {
            server: raw.server,
            runtimes,
        }),
        errors,
    )
}

/// Reads the file, and on an error reads it again with the lines of the key at fault
/// blanked (so every other line keeps its number), collecting the errors, until it reads;
/// the file as it finally reads and the text it was read from. `None` when an error can't
/// be stepped over (a missing key, a table, a key sharing its line with another).
fn read_past_errors(
    text: &str,
    index: &KeyIndex,
    errors: &mut Vec<ConfigFileError>,
) -> Option<(RawFile, String)> {
    let mut text = text.to_string();
    // Each round blanks a key, so there are no more rounds than keys.
    for round in 0..=index.len() {
        let doc = DeTable::parse(&text).ok()?;
        match serde_path_to_error::deserialize::<_, RawFile>(toml::Deserializer::from(doc)) {
            Ok(raw) => return Some((raw, text)),
            Err(e) => {
                // A key missing once another was blanked is what the blanking caused.
                if round > 0 && e.inner().message().starts_with("missing field") {
                    return None;
                }
                errors.push(value_error(&text, index, &e));
                let path = path_text(e.path());
                let culprit = culprit(&path, e.inner().message())?;
                let (from, to) = index.lines_of_value(&culprit)?;
                text = blank_lines(&text, from, to);
            }
        }
    }
    None
}

/// `text` with lines `from..=to` (1-based) emptied, their line breaks kept.
fn blank_lines(text: &str, from: usize, to: usize) -> String {
    text.split_inclusive('\n')
        .enumerate()
        .map(|(i, line)| {
            if (from..=to).contains(&(i + 1)) {
                if line.ends_with('\n') {
                    "\n"
                } else {
                    ""
                }
            } else {
                line
            }
        })
        .collect()
}

/// The key an error at `path` with `message` is about, to take out: the unknown key
/// itself, the key holding a wrong value (a whole array for a wrong element). `None` for
/// an error no removal fixes (a missing key).
pub(super) fn culprit(path: &str, message: &str) -> Option<String> {
    if message.starts_with("missing field") {
        return None;
    }
    let mut path = path.to_string();
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let name = rest.split('`').next().unwrap_or("");
        let last = path.rsplit(['.', ']']).next().unwrap_or("");
        if !name.is_empty() && last != name {
            path = if path.is_empty() {
                name.to_string()
            } else {
                format!("{path}.{name}")
            };
        }
    }
    while path.ends_with(']') {
        path.truncate(path.rfind('[')?);
    }
    (!path.is_empty()).then_some(path)
}

/// One step of a key path: a key of a table, or an element of an array.
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

fn steps(path: &str) -> Option<Vec<Step<'_>>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = part.split_at(part.find('[').unwrap_or(part.len()));
        if !key.is_empty() {
            out.push(Step::Key(key));
        }
        while let Some(r) = rest.strip_prefix('[') {
            let (n, after) = r.split_once(']')?;
            out.push(Step::Index(n.parse().ok()?));
            rest = after;
        }
    }
    Some(out)
}

/// Takes the key at `path` (which ends with a key) out of `table`; whether it was there.
pub(super) fn remove(table: &mut toml::Table, path: &str) -> bool {
    let Some(steps) = steps(path) else {
        return false;
    };
    let mut root = toml::Value::Table(std::mem::take(table));
    let removed = remove_in(&mut root, &steps);
    if let toml::Value::Table(t) = root {
        *table = t;
    }
    removed
}

fn remove_in(value: &mut toml::Value, steps: &[Step<'_>]) -> bool {
    match (value, steps) {
        (toml::Value::Table(t), [Step::Key(k)]) => t.remove(*k).is_some(),
        (toml::Value::Table(t), [Step::Key(k), rest @ ..]) => {
            t.get_mut(*k).is_some_and(|v| remove_in(v, rest))
        }
        (toml::Value::Array(a), [Step::Index(i), rest @ ..]) => {
            a.get_mut(*i).is_some_and(|v| remove_in(v, rest))
        }
        _ => false,
    }
}

/// What a valid config holds, for `roster check-config`'s answer.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// Each runtime's id and kind, in file order.
    pub runtimes: Vec<(String, String)>,
    /// How many tokens are configured.
    pub tokens: usize,
}

impl Config {
    /// Checks the file at `path` as `roster serve` would use it, reporting every error in
    /// file order: the syntax (a syntax error stops the reading), every key and value, the
    /// tokens' secrets, the listen address, and every runtime's source, each built (then
    /// shut down at once) from its table. Call it inside a Tokio runtime.
    pub async fn check_file(
        path: &Path,
        factories: &SourceFactories,
    ) -> Result<CheckReport, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigFileError::new(
                None,
                format!("cannot read the config file {}: {e}", path.display()),
            )])
        })?;
        let (config, mut errors) = parse_every(&text);
        let mut report = None;
        if let Some(config) = config {
            let tokens = match config.load_tokens() {
                Ok(tokens) => {
                    if let Err(e) = config.check_listen(&tokens) {
                        errors.push(e);
                    }
                    tokens.len()
                }
                Err(e) => {
                    errors.push(e);
                    0
                }
            };
            let (built, more) = config.build_every(factories);
            for b in &built {
                b.source.shutdown(Some(Duration::ZERO)).await;
            }
            errors.extend(more);
            report = Some(CheckReport {
                runtimes: config
                    .runtimes
                    .iter()
                    .map(|r| (r.id.to_string(), r.kind.clone()))
                    .collect(),
                tokens,
            });
        }
        match report {
            Some(report) if errors.is_empty() => Ok(report),
            _ => Err(ConfigErrors::in_file_order(errors)),
        }
    }
}
