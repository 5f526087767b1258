//! `/v1/openapi.json` describes what the server really sends. A real server is driven through
//! a scenario — every route with its success answers, an error of every status SPEC §6 names,
//! both event streams up to shutdown — and every answer is checked against the schema the document gives for its
//! path, method and status; every SSE event against the schema the document names for its
//! type (`x-events`). The reverse is checked too: every property a response schema declares
//! was sent at least once (with a value, where it is nullable), every schema a response can
//! hold was met, every event type the document lists was seen, and every response header it
//! documents was sent.
//!
//! The checker knows the part of OpenAPI 3.0's schema language the document uses. A keyword
//! it does not know fails the test, so that it never accepts anything silently.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use common::{shell_source, Fake, SseClient, SseEvent, TestResponse, TestServer, WAIT};
use http::header::CONTENT_TYPE;
use http::{HeaderMap, Method, StatusCode};
use registry_core::{Diagnostic, HealthStatus, RegistryError, RuntimeId, SourceHealth};
use serde_json::{json, Value};
use server_bin::config::{LoadedToken, Scope};
use server_bin::ServeOptions;
use source_embedded::{EmbeddedConfig, EmbeddedSource};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------------------
// Schemas
// ---------------------------------------------------------------------------------------

/// The schema keywords the checker applies. Any other keyword fails the test.
const KEYWORDS: &[&str] = &[
    "$ref",
    "type",
    "nullable",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "pattern",
    "format",
    "allOf",
    "oneOf",
    "anyOf",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
];

/// Keywords that only annotate.
const ANNOTATIONS: &[&str] = &["description", "example", "default", "title"];

/// Nullable properties no answer of the scenario can give a value: `last_seen_at` is set for
/// `unknown` workers only, and a runtime in this process never loses contact with its own.
const ALWAYS_NULL: &[(&str, &str)] = &[("#/components/schemas/Worker", "last_seen_at")];

/// What checking met, for the reverse checks.
#[derive(Default, Clone, Debug)]
struct Seen {
    /// Per object schema with `properties` (by its place in the document).
    objects: BTreeMap<String, ObjectSeen>,
    /// The `$ref`s that held a value.
    refs: BTreeSet<String>,
}

#[derive(Default, Clone, Debug)]
struct ObjectSeen {
    declared: BTreeSet<String>,
    nullable: BTreeSet<String>,
    /// Sent at all.
    present: BTreeSet<String>,
    /// Sent with a value other than `null`.
    valued: BTreeSet<String>,
}

impl Seen {
    fn merge(&mut self, other: Seen) {
        self.refs.extend(other.refs);
        for (at, o) in other.objects {
            let mine = self.objects.entry(at).or_default();
            mine.declared.extend(o.declared);
            mine.nullable.extend(o.nullable);
            mine.present.extend(o.present);
            mine.valued.extend(o.valued);
        }
    }
}

/// One check of a value against a schema: the mismatches, each with its JSON path, and what
/// was met.
struct Walk<'d> {
    doc: &'d Value,
    problems: Vec<String>,
    seen: Seen,
}

impl<'d> Walk<'d> {
    fn new(doc: &'d Value) -> Self {
        Walk {
            doc,
            problems: Vec::new(),
            seen: Seen::default(),
        }
    }

    fn fail(&mut self, path: &str, message: impl Display) {
        self.problems.push(format!("{path}: {message}"));
    }

    fn is_nullable(&self, schema: &Value) -> bool {
        let schema = match schema.get("$ref").and_then(Value::as_str) {
            Some(r) => resolve(self.doc, r).unwrap_or(schema),
            None => schema,
        };
        schema.get("nullable") == Some(&Value::Bool(true))
    }

    /// Checks `value` (at JSON path `path`) against `schema` (at `at` in the document).
    fn check(&mut self, schema: &'d Value, at: &str, value: &Value, path: &str) {
        let Some(s) = schema.as_object() else {
            self.fail(path, format!("the schema at {at} is not an object"));
            return;
        };
        for key in s.keys() {
            if !KEYWORDS.contains(&key.as_str()) && !ANNOTATIONS.contains(&key.as_str()) {
                self.fail(path, format!("unknown schema keyword `{key}` at {at}"));
            }
        }
        if let Some(reference) = s.get("$ref") {
            let beside: Vec<&String> = s
                .keys()
                .filter(|k| *k != "$ref" && !ANNOTATIONS.contains(&k.as_str()))
                .collect();
            if !beside.is_empty() {
                self.fail(
                    path,
                    format!("{at}: {beside:?} beside `$ref` (OpenAPI 3.0 ignores them)"),
                );
            }
            let Some(reference) = reference.as_str() else {
                self.fail(path, format!("{at}: `$ref` is not a string"));
                return;
            };
            let Some(target) = resolve(self.doc, reference) else {
                self.fail(path, format!("{at}: `{reference}` does not resolve"));
                return;
            };
            self.seen.refs.insert(reference.to_string());
            self.check(target, reference, value, path);
            return;
        }
        if value.is_null() && s.get("nullable") == Some(&Value::Bool(true)) {
            return;
        }
        if let Some(nullable) = s.get("nullable") {
            if !nullable.is_boolean() {
                self.fail(path, format!("{at}: `nullable` is not a boolean"));
            }
        }
        if let Some(t) = s.get("type") {
            let Some(ok) = t.as_str().and_then(|t| type_matches(t, value)) else {
                self.fail(path, format!("{at}: unknown type {t}"));
                return;
            };
            if !ok {
                self.fail(path, format!("{} is not of type {t} ({at})", brief(value)));
                return;
            }
        }
        if let Some(list) = s.get("enum") {
            match list.as_array() {
                Some(list) if list.contains(value) => {}
                Some(_) => self.fail(path, format!("{} is not in the enum of {at}", brief(value))),
                None => self.fail(path, format!("{at}: `enum` is not an array")),
            }
        }
        if let Some(format) = s.get("format") {
            self.check_format(format, at, value, path);
        }
        self.check_bounds(s, at, value, path);
        match value {
            Value::String(text) => self.check_string(s, at, text, path),
            Value::Array(items) => {
                if let Some(item) = s.get("items") {
                    let item_at = format!("{at}/items");
                    for (i, v) in items.iter().enumerate() {
                        self.check(item, &item_at, v, &format!("{path}[{i}]"));
                    }
                }
            }
            Value::Object(map) => self.check_object(s, at, map, path),
            _ => {}
        }
        for (i, branch) in s
            .get("allOf")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            self.check(branch, &format!("{at}/allOf/{i}"), value, path);
        }
        for keyword in ["anyOf", "oneOf"] {
            if let Some(branches) = s.get(keyword).and_then(Value::as_array) {
                self.check_alternatives(keyword, branches, at, value, path);
            }
        }
        for keyword in ["allOf", "anyOf", "oneOf"] {
            if s.get(keyword).is_some_and(|b| !b.is_array()) {
                self.fail(path, format!("{at}: `{keyword}` is not an array"));
            }
        }
    }

    fn check_alternatives(
        &mut self,
        keyword: &str,
        branches: &'d [Value],
        at: &str,
        value: &Value,
        path: &str,
    ) {
        let mut passed = Vec::new();
        let mut failures = Vec::new();
        for (i, branch) in branches.iter().enumerate() {
            let mut walk = Walk::new(self.doc);
            walk.check(branch, &format!("{at}/{keyword}/{i}"), value, path);
            if walk.problems.is_empty() {
                passed.push(walk.seen);
            } else {
                failures.extend(walk.problems);
            }
        }
        let ok = match keyword {
            "oneOf" => passed.len() == 1,
            _ => !passed.is_empty(),
        };
        if ok {
            if let Some(seen) = passed.into_iter().next() {
                self.seen.merge(seen);
            }
        } else {
            self.fail(
                path,
                format!(
                    "{} of the {} branches of `{keyword}` at {at} match: {failures:?}",
                    passed.len(),
                    branches.len()
                ),
            );
        }
    }

    fn check_format(&mut self, format: &Value, at: &str, value: &Value, path: &str) {
        let ok = match (format.as_str(), value) {
            (Some("date-time"), Value::String(text)) => {
                OffsetDateTime::parse(text, &Rfc3339).is_ok()
            }
            (Some("int32"), Value::Number(n)) => {
                n.as_i64().is_some_and(|n| i32::try_from(n).is_ok())
            }
            (Some("int64"), Value::Number(n)) => n.as_i64().is_some(),
            (Some("date-time" | "int32" | "int64"), _) => true,
            _ => {
                self.fail(path, format!("{at}: unknown format {format}"));
                return;
            }
        };
        if !ok {
            self.fail(path, format!("{} is not a {format} ({at})", brief(value)));
        }
    }

    fn check_bounds(
        &mut self,
        s: &serde_json::Map<String, Value>,
        at: &str,
        value: &Value,
        path: &str,
    ) {
        let size = match value {
            Value::Number(n) => n.as_f64(),
            _ => None,
        };
        let count = match value {
            Value::String(t) => Some(("Length", t.chars().count())),
            Value::Array(a) => Some(("Items", a.len())),
            Value::Object(o) => Some(("Properties", o.len())),
            _ => None,
        };
        for (keyword, bound) in s {
            let Some(limit) = bound.as_f64() else {
                continue;
            };
            let holds = match (keyword.as_str(), size, count) {
                ("minimum", Some(v), _) => v >= limit,
                ("maximum", Some(v), _) => v <= limit,
                (k, _, Some((what, n))) if k.strip_prefix("min") == Some(what) => n as f64 >= limit,
                (k, _, Some((what, n))) if k.strip_prefix("max") == Some(what) => n as f64 <= limit,
                _ => true,
            };
            if !holds {
                self.fail(
                    path,
                    format!("{} breaks {keyword} {bound} ({at})", brief(value)),
                );
            }
        }
    }

    fn check_string(
        &mut self,
        s: &serde_json::Map<String, Value>,
        at: &str,
        text: &str,
        path: &str,
    ) {
        if let Some(pattern) = s.get("pattern") {
            let Some(pattern) = pattern.as_str() else {
                self.fail(path, format!("{at}: `pattern` is not a string"));
                return;
            };
            match Pattern::parse(pattern) {
                Ok(p) if p.matches(text) => {}
                Ok(_) => self.fail(path, format!("{text:?} does not match {pattern} ({at})")),
                Err(e) => self.fail(path, format!("{at}: pattern {pattern}: {e}")),
            }
        }
    }

    fn check_object(
        &mut self,
        s: &'d serde_json::Map<String, Value>,
        at: &str,
        map: &serde_json::Map<String, Value>,
        path: &str,
    ) {
        let props = s.get("properties").and_then(Value::as_object);
        if s.get("properties").is_some() && props.is_none() {
            self.fail(path, format!("{at}: `properties` is not an object"));
        }
        if s.get("required").is_some_and(|r| !r.is_array()) {
            self.fail(path, format!("{at}: `required` is not an array"));
        }
        if let Some(props) = props {
            let mut met = ObjectSeen::default();
            for (name, schema) in props {
                met.declared.insert(name.clone());
                if self.is_nullable(schema) {
                    met.nullable.insert(name.clone());
                }
            }
            for (name, v) in map {
                if props.contains_key(name) {
                    met.present.insert(name.clone());
                    if !v.is_null() {
                        met.valued.insert(name.clone());
                    }
                }
            }
            let mut one = Seen::default();
            one.objects.insert(at.to_string(), met);
            self.seen.merge(one);
        }
        if let Some(required) = s.get("required") {
            for name in required.as_array().into_iter().flatten() {
                let name = name.as_str().unwrap_or_default();
                if !map.contains_key(name) {
                    self.fail(
                        path,
                        format!("required property `{name}` is missing ({at})"),
                    );
                }
            }
        }
        for (name, v) in map {
            let here = format!("{path}.{name}");
            if let Some(schema) = props.and_then(|p| p.get(name)) {
                self.check(schema, &format!("{at}/properties/{name}"), v, &here);
                continue;
            }
            match s.get("additionalProperties") {
                // Stricter than OpenAPI, so that the document names every field sent: where a
                // schema lists its properties and says nothing of others, there are none.
                None if props.is_some() => {
                    self.fail(&here, format!("sent but not among the properties of {at}"))
                }
                None | Some(Value::Bool(true)) => {}
                Some(Value::Bool(false)) => {
                    self.fail(&here, format!("{at} allows no other properties"))
                }
                Some(schema) => self.check(schema, &format!("{at}/additionalProperties"), v, &here),
            }
        }
    }
}

fn resolve<'d>(doc: &'d Value, reference: &str) -> Option<&'d Value> {
    let pointer = reference.strip_prefix("#/components/")?;
    doc["components"].pointer(&format!("/{pointer}"))
}

fn type_matches(t: &str, v: &Value) -> Option<bool> {
    Some(match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        _ => return None,
    })
}

/// A value, shortened for a message.
fn brief(v: &Value) -> String {
    let text = v.to_string();
    if text.chars().count() > 80 {
        format!("{}…", text.chars().take(80).collect::<String>())
    } else {
        text
    }
}

// ---------------------------------------------------------------------------------------
// Patterns
// ---------------------------------------------------------------------------------------

/// The regular expressions the document uses: anchors, literals, `.`, character classes
/// (ranges, negation) and the quantifiers `*`, `+`, `?`, `{n}`, `{n,}`, `{n,m}`. Anything else
/// (groups, alternation, `\d`…) is refused, so a pattern is never half understood.
#[derive(Debug)]
struct Pattern {
    start: bool,
    end: bool,
    pieces: Vec<Piece>,
}

#[derive(Debug)]
struct Piece {
    atom: Atom,
    min: usize,
    max: usize,
}

#[derive(Debug)]
enum Atom {
    Any,
    Char(char),
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Atom {
    fn matches(&self, c: char) -> bool {
        match self {
            Atom::Any => c != '\n',
            Atom::Char(x) => *x == c,
            Atom::Class { negated, ranges } => {
                ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&c)) != *negated
            }
        }
    }
}

impl Pattern {
    fn parse(pattern: &str) -> Result<Pattern, String> {
        let mut chars: Vec<char> = pattern.chars().collect();
        let start = chars.first() == Some(&'^');
        if start {
            chars.remove(0);
        }
        let end =
            chars.last() == Some(&'$') && !(chars.len() >= 2 && chars[chars.len() - 2] == '\\');
        if end {
            chars.pop();
        }
        let mut pieces = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let atom = match chars[i] {
                '.' => Atom::Any,
                '[' => {
                    let (atom, next) = parse_class(&chars, i + 1)?;
                    i = next - 1;
                    atom
                }
                '\\' => {
                    i += 1;
                    match chars.get(i) {
                        Some(c) if !c.is_ascii_alphanumeric() => Atom::Char(*c),
                        other => return Err(format!("unsupported escape \\{other:?}")),
                    }
                }
                c @ ('(' | ')' | '|' | '^' | '$' | '*' | '+' | '?' | '{' | '}' | ']') => {
                    return Err(format!("unsupported `{c}` at {i}"))
                }
                c => Atom::Char(c),
            };
            i += 1;
            let (min, max) = match chars.get(i) {
                Some('*') => (0, usize::MAX),
                Some('+') => (1, usize::MAX),
                Some('?') => (0, 1),
                Some('{') => {
                    let close = chars[i..]
                        .iter()
                        .position(|c| *c == '}')
                        .ok_or("an unclosed `{`")?
                        + i;
                    let inner: String = chars[i + 1..close].iter().collect();
                    i = close;
                    let number =
                        |t: &str| t.parse::<usize>().map_err(|_| format!("bad {{{inner}}}"));
                    match inner.split_once(',') {
                        None => (number(&inner)?, number(&inner)?),
                        Some((lo, "")) => (number(lo)?, usize::MAX),
                        Some((lo, hi)) => (number(lo)?, number(hi)?),
                    }
                }
                _ => {
                    pieces.push(Piece {
                        atom,
                        min: 1,
                        max: 1,
                    });
                    continue;
                }
            };
            i += 1;
            if min > max {
                return Err(format!("an empty repetition {{{min},{max}}}"));
            }
            pieces.push(Piece { atom, min, max });
        }
        Ok(Pattern { start, end, pieces })
    }

    fn matches(&self, text: &str) -> bool {
        let chars: Vec<char> = text.chars().collect();
        let starts = if self.start { 0..=0 } else { 0..=chars.len() };
        starts
            .into_iter()
            .any(|s| match_here(&self.pieces, &chars[s..], self.end))
    }
}

/// A class from just after its `[`; returns it and the index after its `]`.
fn parse_class(chars: &[char], mut i: usize) -> Result<(Atom, usize), String> {
    let negated = chars.get(i) == Some(&'^');
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    let literal = |i: usize| -> Result<(char, usize), String> {
        match chars.get(i) {
            Some('\\') => match chars.get(i + 1) {
                Some(c) if !c.is_ascii_alphanumeric() => Ok((*c, i + 2)),
                other => Err(format!("unsupported escape \\{other:?} in a class")),
            },
            Some('[') => Err("`[` inside a class".into()),
            Some(c) => Ok((*c, i + 1)),
            None => Err("an unclosed `[`".into()),
        }
    };
    loop {
        match chars.get(i) {
            None => return Err("an unclosed `[`".into()),
            Some(']') if !ranges.is_empty() => return Ok((Atom::Class { negated, ranges }, i + 1)),
            _ => {}
        }
        let (lo, next) = literal(i)?;
        if chars.get(next) == Some(&'-') && chars.get(next + 1).is_some_and(|c| *c != ']') {
            let (hi, after) = literal(next + 1)?;
            if hi < lo {
                return Err(format!("a backwards range {lo}-{hi}"));
            }
            ranges.push((lo, hi));
            i = after;
        } else {
            ranges.push((lo, lo));
            i = next;
        }
    }
}

fn match_here(pieces: &[Piece], text: &[char], end: bool) -> bool {
    let Some((piece, rest)) = pieces.split_first() else {
        return !end || text.is_empty();
    };
    let mut n = 0;
    while n < piece.max && n < text.len() && piece.atom.matches(text[n]) {
        n += 1;
    }
    (piece.min..=n)
        .rev()
        .any(|k| match_here(rest, &text[k..], end))
}

#[test]
fn patterns_of_the_document_are_understood() -> Result<()> {
    let worker = Pattern::parse("^w_[0-9A-HJKMNP-TV-Z]{26}$").map_err(anyhow::Error::msg)?;
    assert!(worker.matches("w_0123456789ABCDEFGHJKMNPQRS"));
    assert!(!worker.matches("w_0123456789ABCDEFGHJKMNPQRI"), "no I");
    assert!(
        !worker.matches("w_0123456789ABCDEFGHJKMNPQR"),
        "25 characters"
    );
    assert!(
        !worker.matches("w_0123456789ABCDEFGHJKMNPQRST"),
        "27 characters"
    );
    assert!(!worker.matches("x_0123456789ABCDEFGHJKMNPQRS"));
    let runtime = Pattern::parse("^[a-z][a-z0-9-]{0,62}$").map_err(anyhow::Error::msg)?;
    assert!(runtime.matches("local") && runtime.matches("a") && runtime.matches("gpu-box-2"));
    assert!(!runtime.matches("") && !runtime.matches("Local") && !runtime.matches("1a"));
    assert!(runtime.matches(&format!("a{}", "b".repeat(62))));
    assert!(!runtime.matches(&format!("a{}", "b".repeat(63))));
    let label = Pattern::parse("^[^=,]+=.*$").map_err(anyhow::Error::msg)?;
    assert!(label.matches("team=a") && label.matches("k=") && !label.matches("=v"));
    assert!(!label.matches("a,b=c") && !label.matches("team"));
    let loose = Pattern::parse("b+c?").map_err(anyhow::Error::msg)?;
    assert!(loose.matches("abbd") && !loose.matches("acd"));
    for unsupported in ["^(a|b)$", "^\\d+$", "^[a-z", "a{2", "^*"] {
        assert!(Pattern::parse(unsupported).is_err(), "{unsupported}");
    }
    Ok(())
}

#[test]
fn the_checker_refuses_what_it_does_not_know_and_names_each_mismatch() {
    let doc = json!({ "components": { "schemas": {
        "Id": { "type": "string", "pattern": "^w_[0-9A-HJKMNP-TV-Z]{26}$" },
        "Thing": {
            "type": "object",
            "required": ["id", "at", "n", "tags"],
            "properties": {
                "id": { "$ref": "#/components/schemas/Id" },
                "at": { "type": "string", "format": "date-time", "nullable": true },
                "n": { "type": "integer", "minimum": 1, "maximum": 3 },
                "tags": { "type": "object", "additionalProperties": { "type": "string" } },
                "odd": { "type": "string", "exclusiveMaximum": 3 }
            }
        }
    }}});
    let schema = json!({ "$ref": "#/components/schemas/Thing" });
    let good = json!({ "id": "w_0123456789ABCDEFGHJKMNPQRS", "at": "2024-05-01T10:00:00Z",
                       "n": 2, "tags": { "a": "b" } });
    let mut walk = Walk::new(&doc);
    walk.check(&schema, "test", &good, "$");
    assert!(walk.problems.is_empty(), "{:?}", walk.problems);
    let bad = json!({ "id": "w_1", "at": "yesterday", "n": 4, "tags": { "a": 1 }, "more": true,
                      "odd": "x" });
    let mut walk = Walk::new(&doc);
    walk.check(&schema, "test", &bad, "$");
    let text = walk.problems.join("\n");
    for needle in [
        "$.id: \"w_1\" does not match",
        "$.at: \"yesterday\" is not a \"date-time\"",
        "$.n: 4 breaks maximum",
        "$.tags.a: 1 is not of type \"string\"",
        "$.more: sent but not among the properties",
        "unknown schema keyword `exclusiveMaximum`",
    ] {
        assert!(text.contains(needle), "{needle} not in:\n{text}");
    }
    let mut walk = Walk::new(&doc);
    walk.check(&schema, "test", &json!({ "id": null }), "$");
    let text = walk.problems.join("\n");
    assert!(text.contains("$.id: null is not of type"), "{text}");
    assert!(text.contains("required property `n` is missing"), "{text}");
}

// ---------------------------------------------------------------------------------------
// The document and the answers
// ---------------------------------------------------------------------------------------

const ERROR_SCHEMA: &str = "#/components/schemas/Error";

/// Checks answers against the document and remembers what it met.
struct Api<'d> {
    doc: &'d Value,
    problems: Vec<String>,
    seen: Seen,
    /// Event types seen, per stream template.
    events: BTreeMap<String, BTreeSet<String>>,
    /// Per response (its `$ref`, or `METHOD template status`): its documented headers and
    /// those sent.
    headers: BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)>,
    /// Every header name the document describes somewhere, lowercased.
    described_headers: BTreeSet<String>,
}

impl<'d> Api<'d> {
    fn new(doc: &'d Value) -> Self {
        let mut described_headers = BTreeSet::new();
        for response in all_responses(doc) {
            for name in response["headers"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|h| h.0)
            {
                described_headers.insert(name.to_ascii_lowercase());
            }
        }
        Api {
            doc,
            problems: Vec::new(),
            seen: Seen::default(),
            events: BTreeMap::new(),
            headers: BTreeMap::new(),
            described_headers,
        }
    }

    fn fail(&mut self, what: &str, message: impl Display) {
        self.problems.push(format!("{what}: {message}"));
    }

    /// The documented operation of a request: its template and the operation object.
    fn operation(&self, method: &Method, path: &str) -> Option<(String, &'d Value)> {
        let path = route_of(path);
        let method = method.as_str().to_ascii_lowercase();
        self.doc["paths"]
            .as_object()?
            .iter()
            .filter(|(template, _)| template_matches(template, path))
            .filter_map(|(template, item)| Some((template, item.get(&method)?)))
            .min_by_key(|(template, _)| template.matches('{').count())
            .map(|(t, op)| (t.clone(), op))
    }

    /// Checks `value` against `schema`; mismatches go to the report under `what`.
    fn check_value(&mut self, what: &str, schema: &'d Value, at: &str, value: &Value) {
        let mut walk = Walk::new(self.doc);
        walk.check(schema, at, value, "$");
        for p in walk.problems {
            self.fail(what, p);
        }
        self.seen.merge(walk.seen);
    }

    /// One request, its answer checked against the document (and, when it succeeded, its
    /// body against the request schema).
    async fn call(
        &mut self,
        server: &TestServer,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Result<TestResponse> {
        let resp = server.request(method.clone(), path, headers, body).await?;
        self.check_response(&method, path, &resp);
        if resp.status.is_success() {
            if let Some(body) = body {
                self.check_request(&method, path, body);
            }
        }
        Ok(resp)
    }

    async fn get(&mut self, server: &TestServer, path: &str) -> Result<TestResponse> {
        self.call(server, Method::GET, path, &[], None).await
    }

    async fn post(&mut self, server: &TestServer, path: &str, body: &str) -> Result<TestResponse> {
        self.call(server, Method::POST, path, &[], Some(body)).await
    }

    fn check_request(&mut self, method: &Method, path: &str, body: &str) {
        let what = format!("the request body of {method} {path}");
        let Some((template, op)) = self.operation(method, path) else {
            return;
        };
        let Some(schema) = op.pointer("/requestBody/content/application~1json/schema") else {
            self.fail(&what, "accepted, but the document describes no JSON body");
            return;
        };
        let value = match serde_json::from_str::<Value>(body) {
            Ok(v) => v,
            Err(e) => return self.fail(&what, format!("accepted, but not JSON: {e}")),
        };
        // What a request met is not what the server sends: it stays out of the reverse checks.
        let mut walk = Walk::new(self.doc);
        walk.check(schema, &format!("{method} {template} request"), &value, "$");
        for p in walk.problems {
            self.fail(&what, p);
        }
    }

    fn check_response(&mut self, method: &Method, path: &str, resp: &TestResponse) {
        let status = resp.status.as_u16();
        let what = format!("{method} {path} → {status}");
        let Some((template, op)) = self.operation(method, path) else {
            // A method or path the document does not have: an error, and every error is
            // `Error` (SPEC §6).
            if status < 400 {
                self.fail(&what, "an undocumented request succeeded");
            }
            let schema = resolve(self.doc, ERROR_SCHEMA).expect("the Error schema");
            self.check_json(&what, resp, schema, ERROR_SCHEMA);
            return;
        };
        let responses = &op["responses"];
        let Some(mut response) = responses
            .get(status.to_string())
            .or_else(|| responses.get("default"))
        else {
            self.fail(
                &what,
                format!(
                    "{status} is not documented for {method} {template}: {}",
                    resp.text()
                ),
            );
            return;
        };
        let mut name = format!("{method} {template} {status}");
        if let Some(reference) = response.get("$ref").and_then(Value::as_str) {
            name = reference.to_string();
            match resolve(self.doc, reference) {
                Some(r) => response = r,
                None => {
                    self.fail(&what, format!("`{reference}` does not resolve"));
                    return;
                }
            }
        }
        self.check_headers(&what, &name, response, &resp.headers);
        if method == Method::HEAD {
            // The answer a GET would have, without its body.
            if !resp.body.is_empty() {
                self.fail(&what, format!("a body in answer to HEAD: {}", resp.text()));
            }
            return;
        }
        let Some(content) = response.get("content").and_then(Value::as_object) else {
            if !resp.body.is_empty() {
                self.fail(
                    &what,
                    format!("a body the document does not describe: {}", resp.text()),
                );
            }
            return;
        };
        let Some(media) = media_type(&resp.headers) else {
            self.fail(&what, "no Content-Type");
            return;
        };
        let Some(media_object) = content.get(&media) else {
            let documented: Vec<&String> = content.keys().collect();
            self.fail(
                &what,
                format!("Content-Type {media}, documented {documented:?}"),
            );
            return;
        };
        if media == "application/json" {
            let schema = &media_object["schema"];
            self.check_json(&what, resp, schema, &name);
        }
    }

    fn check_json(&mut self, what: &str, resp: &TestResponse, schema: &'d Value, at: &str) {
        if media_type(&resp.headers).as_deref() != Some("application/json") {
            self.fail(what, "not declared application/json");
        }
        match resp.json() {
            Ok(v) => self.check_value(what, schema, at, &v),
            Err(e) => self.fail(what, format!("{e:#}")),
        }
    }

    fn check_headers(&mut self, what: &str, name: &str, response: &'d Value, sent: &HeaderMap) {
        let documented: BTreeMap<String, &Value> = response["headers"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        let entry = self.headers.entry(name.to_string()).or_default();
        entry.0.extend(documented.keys().cloned());
        for header in &self.described_headers.clone() {
            if sent.contains_key(header.as_str()) && !documented.contains_key(header) {
                self.fail(
                    what,
                    format!("sends `{header}`, which {name} does not document"),
                );
            }
        }
        for (header, h) in documented {
            let Some(v) = sent.get(&header) else { continue };
            self.headers
                .get_mut(name)
                .expect("just added")
                .1
                .insert(header.clone());
            let text = v.to_str().unwrap_or_default();
            let schema = &h["schema"];
            let value = match schema["type"].as_str() {
                Some("integer") => match text.parse::<i64>() {
                    Ok(n) => json!(n),
                    Err(_) => json!(text),
                },
                _ => json!(text),
            };
            self.check_value(&format!("{what}, header {header}"), schema, name, &value);
        }
    }

    /// Opens a stream; its answer's status and type are checked.
    async fn stream(
        &mut self,
        server: &TestServer,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<SseClient> {
        let client = server.sse(path, headers).await?;
        let what = format!("GET {path} → 200");
        match self.operation(&Method::GET, path) {
            Some((_, op)) => {
                let media = media_type(&client.headers).unwrap_or_default();
                if op["responses"]["200"]["content"].get(&media).is_none() {
                    self.fail(&what, format!("Content-Type {media} is not documented"));
                }
            }
            None => self.fail(&what, "not a documented stream"),
        }
        Ok(client)
    }

    /// Checks each event's data against the schema the document names for its type.
    fn check_events(&mut self, path: &str, events: &[SseEvent]) {
        let Some((template, op)) = self.operation(&Method::GET, path) else {
            self.fail(path, "not a documented stream");
            return;
        };
        let Some(types) = op
            .pointer("/responses/200/content/text~1event-stream/x-events")
            .and_then(Value::as_object)
        else {
            self.fail(path, "the document names no event types (`x-events`)");
            return;
        };
        for ev in events {
            let what = format!("GET {path}, event {} (id {:?})", ev.event, ev.id);
            let Some(schema) = types.get(&ev.event) else {
                self.fail(&what, "an event type the document does not name");
                continue;
            };
            self.events
                .entry(template.clone())
                .or_default()
                .insert(ev.event.clone());
            self.check_value(&what, schema, &format!("{template} {}", ev.event), &ev.data);
        }
    }

    /// The reverse checks: what the document promises was met.
    fn coverage(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (at, o) in &self.seen.objects {
            for name in o.declared.difference(&o.present) {
                out.push(format!("{at}: `{name}` is declared but was never sent"));
            }
            for name in o.nullable.intersection(&o.present) {
                if !o.valued.contains(name) && !ALWAYS_NULL.contains(&(at.as_str(), name.as_str()))
                {
                    out.push(format!("{at}: `{name}` was only ever null"));
                }
            }
        }
        for reference in response_refs(self.doc) {
            if !self.seen.refs.contains(&reference) {
                out.push(format!("{reference}: a response can hold it, but none did"));
            }
        }
        for (template, item) in self.doc["paths"].as_object().into_iter().flatten() {
            let types = item
                .pointer("/get/responses/200/content/text~1event-stream/x-events")
                .and_then(Value::as_object);
            let seen = self.events.get(template);
            for name in types.into_iter().flatten().map(|t| t.0) {
                if !seen.is_some_and(|s| s.contains(name)) {
                    out.push(format!("GET {template}: event `{name}` was never sent"));
                }
            }
        }
        for (name, (documented, sent)) in &self.headers {
            for header in documented.difference(sent) {
                out.push(format!("{name}: header `{header}` was never sent"));
            }
        }
        out
    }
}

/// The path of a request target (absolute form too), without its query.
fn route_of(target: &str) -> &str {
    let path = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    path.split('?').next().unwrap_or(path)
}

fn template_matches(template: &str, path: &str) -> bool {
    let want: Vec<&str> = template.split('/').collect();
    let have: Vec<&str> = path.split('/').collect();
    want.len() == have.len()
        && want.iter().zip(&have).all(|(w, h)| {
            if w.starts_with('{') {
                !h.is_empty()
            } else {
                w == h
            }
        })
}

fn media_type(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    Some(v.split(';').next()?.trim().to_ascii_lowercase())
}

/// Every response object of the document: the operations' and the components'.
fn all_responses(doc: &Value) -> Vec<&Value> {
    let mut out: Vec<&Value> = doc["components"]["responses"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|r| r.1)
        .collect();
    for item in doc["paths"].as_object().into_iter().flatten().map(|p| p.1) {
        for op in item.as_object().into_iter().flatten().map(|o| o.1) {
            out.extend(
                op["responses"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|r| r.1),
            );
        }
    }
    out
}

/// Every schema `$ref` a response body or event can hold, transitively.
fn response_refs(doc: &Value) -> BTreeSet<String> {
    fn refs_in(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("$ref", Value::String(r)) => out.push(r.clone()),
                        _ => refs_in(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| refs_in(v, out)),
            _ => {}
        }
    }
    let mut todo = Vec::new();
    for response in all_responses(doc) {
        refs_in(&response["content"], &mut todo);
    }
    let mut found = BTreeSet::new();
    while let Some(r) = todo.pop() {
        if r.starts_with("#/components/responses/") {
            if let Some(target) = resolve(doc, &r) {
                refs_in(&target["content"], &mut todo);
            }
        } else if found.insert(r.clone()) {
            if let Some(target) = resolve(doc, &r) {
                refs_in(target, &mut todo);
            }
        }
    }
    found
}

// ---------------------------------------------------------------------------------------
// A runtime that fails on purpose
// ---------------------------------------------------------------------------------------

/// The data of an input that [`Flaky`] answers with an internal error.
const BREAK: &str = "break";

/// The embedded source (at most one live worker: `429`) with its failures chosen, so that the
/// answers only a troubled runtime gives can be met: it says it is `unavailable` (with a
/// message, a retry time and a diagnostic); it cannot remove records (`501`); input finds it
/// restarting (`503`), or breaks inside (`500`); a stop times out (`504`); and its output
/// streams are those of a source that only observes its workers: they end when it lets go at
/// shutdown, without `End`.
fn flaky() -> Result<Fake<EmbeddedSource>> {
    Ok(Fake::new(shell_source("max_workers = 1")?)
        .with_capabilities(|c| c.remove = false)
        .with_health(|| SourceHealth {
            status: HealthStatus::Unavailable,
            message: Some("the runtime is restarting".into()),
            retry_at: Some(OffsetDateTime::now_utc() + Duration::from_secs(30)),
            diagnostics: vec![Diagnostic {
                code: "restarting".into(),
                message: "the runtime is restarting".into(),
            }],
        })
        .with_stop(|_| {
            Some(Err(RegistryError::UpstreamTimeout(
                "the runtime did not answer the stop in time".into(),
            )))
        })
        .with_input(|data| {
            Some(Err(if data == BREAK {
                RegistryError::internal("broken on purpose")
            } else {
                RegistryError::unavailable(
                    "the runtime is restarting",
                    Some(Duration::from_secs(3)),
                )
            }))
        })
        .with_held_output())
}

// ---------------------------------------------------------------------------------------
// The scenario
// ---------------------------------------------------------------------------------------

const SPAWN: &str = "/v1/runtimes/local/workers";
const FLAKY_SPAWN: &str = "/v1/runtimes/flaky/workers";
/// A well-formed worker id that no registry issued.
const UNKNOWN_ID: &str = "w_0123456789ABCDEFGHJKMNPQRS";
const MAX_BODY: u64 = 4096;
const READ_SECRET: &str = "read-secret-for-the-shape-tests";
/// The keys of a path item that are operations.
const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn expect(resp: &TestResponse, status: u16, code: &str) -> Result<()> {
    ensure!(
        resp.status.as_u16() == status && resp.code() == code,
        "expected {status} {code}, got {}: {}",
        resp.status,
        resp.text()
    );
    Ok(())
}

fn id_of(resp: &TestResponse) -> Result<String> {
    resp.created_id()
}

/// Reads a stream to its end in the background.
fn collect(mut stream: SseClient) -> JoinHandle<(Vec<SseEvent>, Result<()>)> {
    tokio::spawn(async move {
        let mut events = Vec::new();
        loop {
            match stream.next_event_within(Duration::from_secs(30)).await {
                Ok(Some(ev)) => events.push(ev),
                Ok(None) => return (events, Ok(())),
                Err(e) => return (events, Err(e)),
            }
        }
    })
}

impl Api<'_> {
    /// Polls a worker (each answer checked) until `check` holds.
    async fn wait_worker(
        &mut self,
        server: &TestServer,
        id: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let w = self
                .get(server, &format!("/v1/workers/{id}"))
                .await?
                .json()?;
            if check(&w) {
                return Ok(w);
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "worker never reached the condition: {w}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Reads events (each checked) until one satisfies `until`.
    async fn read_until(
        &mut self,
        path: &str,
        stream: &mut SseClient,
        until: impl Fn(&SseEvent) -> bool,
    ) -> Result<Vec<SseEvent>> {
        let mut got = Vec::new();
        loop {
            let ev = stream.next_event().await?;
            self.check_events(path, std::slice::from_ref(&ev));
            let done = until(&ev);
            got.push(ev);
            if done {
                return Ok(got);
            }
        }
    }
}

fn terminal(w: &Value) -> bool {
    matches!(w["state"].as_str(), Some("exited" | "stopped" | "failed"))
}

#[tokio::test]
async fn every_answer_and_event_has_the_shape_the_document_gives() {
    let doc: Value = serde_json::from_str(server_bin::OPENAPI).expect("the document is JSON");
    let mut api = Api::new(&doc);
    let outcome = scenario(&mut api).await;
    let mut report = api.problems.clone();
    match outcome {
        Ok(()) => report.extend(api.coverage()),
        Err(e) => report.insert(0, format!("the scenario failed: {e:#}")),
    }
    assert!(
        report.is_empty(),
        "{} problems:\n{}",
        report.len(),
        report.join("\n")
    );
}

/// The `local` runtime of `common::config("output_retention = 64")`, as a config file.
const LOCAL_TOML: &str = "[[runtimes]]\nname = \"local\"\nsource = \"embedded\"\n\
    allow_commands = true\noutput_retention = 64\n\
    [runtimes.profiles.shell]\ncommand = [\"/bin/sh\", \"-c\"]\n";

async fn scenario(api: &mut Api<'_>) -> Result<()> {
    let options = ServeOptions {
        max_body: MAX_BODY,
        shutdown_grace: Duration::from_secs(5),
        ..Default::default()
    };
    // The server's config is also a file it reloads (the same runtime, so it is unchanged).
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("roster.toml");
    std::fs::write(&file, LOCAL_TOML)?;
    let config = common::config("output_retention = 64");
    let options = ServeOptions {
        reload: Some(server_bin::ReloadConfig {
            path: Some(file.clone().into()),
            listen: None,
            state_dir: Some(dir.path().join("state").into()),
            factories: server_bin::default_factories(),
            running: config.clone(),
            on_sighup: false,
        }),
        ..options
    };
    let server = TestServer::start_in(dir, config, options).await?;

    // The service routes.
    let served = api.get(&server, "/v1/openapi.json").await?;
    ensure!(
        served.json()? == *api.doc,
        "the served document is the one checked here"
    );
    expect(&api.get(&server, "/healthz").await?, 200, "")?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while api.get(&server, "/readyz").await?.status != StatusCode::OK {
        ensure!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for probe in ["/healthz", "/readyz"] {
        let head = api.call(&server, Method::HEAD, probe, &[], None).await?;
        expect(&head, 200, "")?;
    }
    expect(&api.get(&server, "/metrics").await?, 200, "")?;
    expect(&api.get(&server, "/").await?, 200, "")?;

    // A registry stream open from the start to the shutdown.
    let mut registry_events = api.stream(&server, "/v1/events", &[]).await?;
    let snapshot = registry_events.next_event().await?;
    ensure!(snapshot.event == "snapshot", "{snapshot:?}");
    let snapshot_id = snapshot.id.clone().context("the snapshot's id")?;
    api.check_events("/v1/events", std::slice::from_ref(&snapshot));
    let registry_events = collect(registry_events);

    // A runtime added while the server runs: `runtime.updated`.
    server
        .registry
        .add_runtime(RuntimeId::new("flaky")?, "flaky", Arc::new(flaky()?))
        .await?;

    // A worker waiting to be restarted: `restarts`, `last_exit` and `retry_at` are set.
    let again: EmbeddedConfig = toml::from_str(
        "[profiles.again]\ncommand = [\"/bin/sh\", \"-c\"]\nrestart = \"always\"\n\
         restart_backoff = { base = \"60s\", cap = \"60s\" }\n\
         description = \"a shell that starts again\"\nshow_command = true\n\
         [profiles.probed]\ncommand = [\"/bin/sh\", \"-c\"]\n\
         probe = { exec = [\"true\"], interval = \"50ms\" }\n",
    )?;
    server
        .registry
        .add_runtime(
            RuntimeId::new("again")?,
            "embedded",
            Arc::new(EmbeddedSource::new(again)?),
        )
        .await?;
    // Profiles: one with every field set (`again`), one with the defaults (`local`'s shell).
    for runtime in ["again", "local"] {
        let path = format!("/v1/runtimes/{runtime}/profiles");
        let profiles = api.get(&server, &path).await?;
        expect(&profiles, 200, "")?;
    }
    // One run ended with a code, one by a signal: `last_exit` holds each of its fields.
    for script in ["exit 3", "kill -9 $$"] {
        let body = json!({ "profile": "again", "args": [script] }).to_string();
        let waiting = id_of(
            &api.post(&server, "/v1/runtimes/again/workers", &body)
                .await?,
        )?;
        api.wait_worker(&server, &waiting, |w| !w["retry_at"].is_null())
            .await?;
        let stop = api
            .post(&server, &format!("/v1/workers/{waiting}/stop"), "{}")
            .await?;
        expect(&stop, 202, "")?;
    }
    // A worker with a health probe: `health` is set.
    let body = json!({ "profile": "probed", "args": ["exec sleep 30"] }).to_string();
    let probed = id_of(
        &api.post(&server, "/v1/runtimes/again/workers", &body)
            .await?,
    )?;
    api.wait_worker(&server, &probed, |w| w["health"]["status"] == "healthy")
        .await?;
    expect(
        &api.get(&server, "/v1/workers?health=healthy").await?,
        200,
        "",
    )?;
    let stop = api
        .post(&server, &format!("/v1/workers/{probed}/stop"), "{}")
        .await?;
    expect(&stop, 202, "")?;

    // Workers of every end: exited (with output on both streams), stopped, failed.
    let body = json!({
        "profile": "shell", "args": ["echo out; echo err >&2"], "name": "a",
        "labels": { "team": "a" }, "env": { "K": "V" }, "request_id": "shapes-a",
    })
    .to_string();
    let a = id_of(&api.post(&server, SPAWN, &body).await?)?;
    ensure!(
        id_of(&api.post(&server, SPAWN, &body).await?)? == a,
        "the same request, the same worker"
    );
    let other = json!({ "profile": "shell", "args": ["true"], "request_id": "shapes-a" });
    expect(
        &api.post(&server, SPAWN, &other.to_string()).await?,
        409,
        "conflict",
    )?;
    let body = json!({ "command": ["/bin/sh", "-c", "cat"], "labels": { "team": "b" },
                       "stdin": "first\n" });
    let b = id_of(&api.post(&server, SPAWN, &body.to_string()).await?)?;
    let killed = id_of(
        &api.post(
            &server,
            SPAWN,
            r#"{"profile":"shell","args":["kill -9 $$"]}"#,
        )
        .await?,
    )?;
    // A program that can't be started: `failed` with a `message` that says why.
    let missing = api
        .post(
            &server,
            SPAWN,
            r#"{"command":["/nonexistent/shape-program"]}"#,
        )
        .await?;
    expect(&missing, 201, "")?;
    ensure!(missing.json()?["message"].is_string(), "{}", missing.text());
    let pad = "p".repeat(90);
    let script = format!("for i in $(seq 1 12); do echo line-$i-{pad}; sleep 0.02; done");
    let body = json!({ "profile": "shell", "args": [script], "name": "gap" }).to_string();
    let gap = id_of(&api.post(&server, SPAWN, &body).await?)?;
    let body = r#"{"profile":"shell","args":["exec sleep 30"],"name":"d"}"#;
    let d = id_of(&api.post(&server, SPAWN, body).await?)?;

    // Output of a live worker: state, output (stdin echoed), state changes, end.
    let b_path = format!("/v1/workers/{b}/output");
    let mut b_output = api.stream(&server, &b_path, &[]).await?;
    let input = api
        .post(
            &server,
            &format!("/v1/workers/{b}/input"),
            r#"{"data":"hello\n"}"#,
        )
        .await?;
    expect(&input, 202, "")?;
    api.read_until(&b_path, &mut b_output, |e| {
        e.event == "output" && e.data["data"].as_str().is_some_and(|d| d.contains("hello"))
    })
    .await?;
    let stop = api
        .post(
            &server,
            &format!("/v1/workers/{b}/stop"),
            r#"{"grace_ms":2000}"#,
        )
        .await?;
    expect(&stop, 202, "")?;
    let rest = b_output.rest(WAIT).await?;
    api.check_events(&b_path, &rest);
    ensure!(rest.last().is_some_and(|e| e.event == "end"), "{rest:?}");
    let again = api
        .call(
            &server,
            Method::POST,
            &format!("/v1/workers/{b}/stop"),
            &[],
            None,
        )
        .await?;
    expect(&again, 202, "")?;

    api.wait_worker(&server, &a, |w| w["state"] == "exited")
        .await?;
    api.wait_worker(&server, &killed, |w| w["state"] == "failed")
        .await?;
    api.wait_worker(&server, &gap, |w| w["state"] == "exited")
        .await?;

    // Output beyond the retention: a gap first.
    let gap_path = format!("/v1/workers/{gap}/output");
    let events = api
        .stream(&server, &gap_path, &[])
        .await?
        .rest(WAIT)
        .await?;
    api.check_events(&gap_path, &events);
    ensure!(events.iter().any(|e| e.event == "gap"), "{events:?}");
    ensure!(events.iter().any(|e| e.event == "output"), "{events:?}");
    let path = format!("{gap_path}?after=2&follow=0");
    let events = api.stream(&server, &path, &[]).await?.rest(WAIT).await?;
    api.check_events(&path, &events);
    let a_path = format!("/v1/workers/{a}/output");
    let events = api
        .stream(&server, &a_path, &[("last-event-id", "0")])
        .await?
        .rest(WAIT)
        .await?;
    api.check_events(&a_path, &events);
    ensure!(
        events.iter().any(|e| e.data["stream"] == "stderr"),
        "{events:?}"
    );

    // Removing: not while it runs, then at once.
    let d_path = format!("/v1/workers/{d}");
    expect(
        &api.call(&server, Method::DELETE, &d_path, &[], None)
            .await?,
        409,
        "conflict",
    )?;
    let stop = api
        .post(&server, &format!("{d_path}/stop"), r#"{"grace_ms":0}"#)
        .await?;
    expect(&stop, 202, "")?;
    api.wait_worker(&server, &d, terminal).await?;
    let removed = api
        .call(
            &server,
            Method::DELETE,
            &format!("/v1/workers/{a}"),
            &[],
            None,
        )
        .await?;
    expect(&removed, 204, "")?;
    expect(
        &api.get(&server, &format!("/v1/workers/{a}")).await?,
        404,
        "worker_not_found",
    )?;

    // Lists, filtered and paged.
    for path in [
        "/v1/runtimes".to_string(),
        "/v1/runtimes/local".to_string(),
        "/v1/runtimes/flaky".to_string(),
        format!("/v1/workers/{b}"),
        "/v1/workers".to_string(),
        "/v1/workers?runtime=local&state=exited&limit=10".to_string(),
        "/v1/workers?state=stopped&label=team%3Db&label=team=b".to_string(),
    ] {
        let resp = api.get(&server, &path).await?;
        expect(&resp, 200, "")?;
        let listed = resp.json()?["workers"].as_array().map_or(1, Vec::len);
        ensure!(listed > 0, "{path} lists nothing");
    }
    let mut page = api.get(&server, "/v1/workers?limit=1").await?.json()?;
    let mut pages = 1;
    while let Some(next) = page["next_page"].as_str() {
        ensure!(pages < 20, "paging does not end");
        let path = format!("/v1/workers?limit=1&page={}", urlencode(next));
        page = api.get(&server, &path).await?.json()?;
        pages += 1;
    }
    ensure!(pages > 1, "more than one page");

    // Reloads of the config file: a runtime added, then removed (`runtime.removed`).
    std::fs::write(
        &file,
        format!("{LOCAL_TOML}[[runtimes]]\nname = \"spare\"\nsource = \"embedded\"\n"),
    )?;
    let added = api.post(&server, "/v1/admin/reload", "{}").await?;
    expect(&added, 200, "")?;
    let outcome = added.json()?;
    ensure!(
        outcome["added"] == json!(["spare"]) && outcome["unchanged"] == json!(["local"]),
        "{outcome}"
    );
    std::fs::write(&file, LOCAL_TOML)?;
    let removed = api.post(&server, "/v1/admin/reload", "{}").await?;
    expect(&removed, 200, "")?;
    ensure!(
        removed.json()?["removed"] == json!(["spare"]),
        "{}",
        removed.text()
    );

    // The runtime that fails: 429, 500, 501, 503, 504 — and an output stream that ends in
    // `shutdown`.
    let body = r#"{"profile":"shell","args":["exec sleep 30"]}"#;
    let f = id_of(&api.post(&server, FLAKY_SPAWN, body).await?)?;
    let full = api.post(&server, FLAKY_SPAWN, body).await?;
    expect(&full, 429, "capacity_exceeded")?;
    let f_input = format!("/v1/workers/{f}/input");
    let unavailable = api.post(&server, &f_input, r#"{"data":"x"}"#).await?;
    expect(&unavailable, 503, "runtime_unavailable")?;
    let broken = api
        .post(&server, &f_input, &json!({ "data": BREAK }).to_string())
        .await?;
    expect(&broken, 500, "internal")?;
    let timeout = api
        .post(&server, &format!("/v1/workers/{f}/stop"), "{}")
        .await?;
    expect(&timeout, 504, "upstream_timeout")?;
    let unsupported = api
        .call(
            &server,
            Method::DELETE,
            &format!("/v1/workers/{f}"),
            &[],
            None,
        )
        .await?;
    expect(&unsupported, 501, "unsupported")?;
    let f_path = format!("/v1/workers/{f}/output");
    let mut f_output = api.stream(&server, &f_path, &[]).await?;
    api.read_until(&f_path, &mut f_output, |e| e.event == "state")
        .await?;

    // Errors of the main runtime.
    errors(api, &server, &b).await?;

    // Registry streams: filtered, resumed, and reset.
    let mut filtered = api.stream(&server, "/v1/events?runtime=local", &[]).await?;
    api.read_until("/v1/events", &mut filtered, |e| e.event == "snapshot")
        .await?;
    let mut resumed = api
        .stream(&server, "/v1/events", &[("last-event-id", &snapshot_id)])
        .await?;
    api.read_until("/v1/events", &mut resumed, |e| {
        e.event == "worker.removed" && e.data["worker_id"] == a.as_str()
    })
    .await?;
    let mut reset = api
        .stream(&server, "/v1/events?cursor=not-a-cursor", &[])
        .await?;
    let got = api
        .read_until("/v1/events", &mut reset, |e| e.event == "snapshot")
        .await?;
    ensure!(
        got.first()
            .is_some_and(|e| e.event == "reset" && e.data["reason"] == "malformed"),
        "{got:?}"
    );
    drop((filtered, resumed, reset));

    // Shutdown ends the open streams with `shutdown`.
    server.stop().await?;
    let (events, ended) = registry_events.await?;
    ended.context("the registry stream")?;
    api.check_events("/v1/events", &events);
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    for name in ["runtime.updated", "worker.upserted", "worker.removed"] {
        ensure!(names.contains(&name), "no {name} in {names:?}");
    }
    ensure!(names.last() == Some(&"shutdown"), "{names:?}");
    let rest = f_output.rest(WAIT).await?;
    api.check_events(&f_path, &rest);
    ensure!(
        rest.last().is_some_and(|e| e.event == "shutdown"),
        "{rest:?}"
    );
    Ok(())
}

/// Errors of several codes, from the main runtime and from a server with tokens.
async fn errors(api: &mut Api<'_>, server: &TestServer, b: &str) -> Result<()> {
    let worker = format!("/v1/workers/{b}");
    let unknown = format!("/v1/workers/{UNKNOWN_ID}");
    let bad = "invalid_request";
    let cases = [
        Case::get("/v1/workers?limit=many", 400, bad),
        Case::get("/v1/workers?state=asleep", 400, bad),
        Case::get("/v1/workers?label=team", 400, bad),
        Case::get("/v1/workers?colour=red", 400, bad),
        Case::get("/v1/runtimes?x=1", 400, bad),
        Case::get("/v1/runtimes/local?x=1", 400, bad),
        Case::get(format!("{worker}?x=1"), 400, bad),
        Case::new(Method::DELETE, format!("{worker}?x=1"), None, 400, bad),
        Case::get(format!("{worker}/output?after=soon"), 400, bad),
        Case::get("/v1/events?x=1", 400, bad),
        Case::post(SPAWN, "{", 400, "invalid_json"),
        Case::post(SPAWN, r#"{"profile":"shell","x":1}"#, 400, bad),
        Case::post(format!("{worker}/stop"), r#"{"grace_ms":-1}"#, 400, bad),
        Case::post(format!("{worker}/input"), r#"{"data":1}"#, 400, bad),
        Case::post(SPAWN, "{}", 403, "origin_not_allowed").with("origin", "http://evil.example"),
        Case::get("/v1/runtimes/nowhere", 404, "runtime_not_found"),
        Case::post(
            "/v1/runtimes/nowhere/workers",
            "{}",
            404,
            "runtime_not_found",
        ),
        Case::get(&unknown, 404, "worker_not_found"),
        Case::get("/v1/workers/not-an-id", 404, "worker_not_found"),
        Case::new(Method::DELETE, &unknown, None, 404, "worker_not_found"),
        Case::post(
            format!("{unknown}/input"),
            r#"{"data":"x"}"#,
            404,
            "worker_not_found",
        ),
        Case::new(
            Method::POST,
            format!("{unknown}/stop"),
            None,
            404,
            "worker_not_found",
        ),
        Case::get(format!("{unknown}/output"), 404, "worker_not_found"),
        Case::get("/v1/events?runtime=nowhere", 404, "runtime_not_found"),
        Case::get("/v1/nothing", 404, "route_not_found"),
        Case::new(
            Method::PUT,
            "/v1/runtimes",
            Some("{}"),
            405,
            "method_not_allowed",
        ),
        Case::new(Method::DELETE, "/healthz", None, 405, "method_not_allowed"),
        Case::post(&worker, "{}", 405, "method_not_allowed"),
        Case::post(SPAWN, big_spawn(), 413, "payload_too_large"),
        Case::post(
            format!("{worker}/input"),
            big_input(),
            413,
            "payload_too_large",
        ),
        Case::post(SPAWN, "{}", 415, "unsupported_media_type").with("content-type", "text/plain"),
        Case::post(
            format!("{worker}/input"),
            r#"{"data":"x"}"#,
            415,
            "unsupported_media_type",
        )
        .with("content-type", "text/plain"),
        Case::post(
            format!("{worker}/stop"),
            "{}",
            415,
            "unsupported_media_type",
        )
        .with("content-type", "text/plain"),
    ];
    for case in cases {
        let (method, path) = (case.method, case.path);
        let resp = api
            .call(
                server,
                method.clone(),
                &path,
                &case.headers,
                case.body.as_deref(),
            )
            .await?;
        expect(&resp, case.status, case.code).with_context(|| format!("{method} {path}"))?;
    }

    // The Host checks come before any route: every operation may answer 400 and 403.
    let operations: Vec<(Method, String)> = api.doc["paths"]
        .as_object()
        .into_iter()
        .flatten()
        .flat_map(|(template, item)| {
            let path = template
                .replace("{runtime_id}", "local")
                .replace("{worker_id}", b);
            item.as_object()
                .into_iter()
                .flatten()
                .filter(|(m, _)| METHODS.contains(&m.as_str()))
                .filter_map(move |(m, _)| Some((m.to_uppercase().parse().ok()?, path.clone())))
        })
        .collect();
    for (method, path) in operations {
        let twice = api
            .call(
                server,
                method.clone(),
                &path,
                &[("host", "127.0.0.1")],
                None,
            )
            .await?;
        // A HEAD answer has the status and no body, so no code to compare.
        let code = |c| if method == Method::HEAD { "" } else { c };
        expect(&twice, 400, code("invalid_request")).with_context(|| format!("{method} {path}"))?;
        let foreign = format!("http://evil.example{path}");
        let resp = api
            .call(server, method.clone(), &foreign, &[], None)
            .await?;
        expect(&resp, 403, code("forbidden")).with_context(|| format!("{method} {foreign}"))?;
    }

    // Tokens: 401 without one, 403 for a scope that does not allow it.
    let options = ServeOptions {
        tokens: vec![LoadedToken {
            name: "reader".into(),
            scope: Scope::Read,
            secret: READ_SECRET.into(),
        }],
        ..Default::default()
    };
    let guarded = TestServer::start_with(common::config(""), options).await?;
    let bearer = format!("Bearer {READ_SECRET}");
    let read = [("authorization", bearer.as_str())];
    for path in ["/v1/runtimes", "/v1/events", "/metrics"] {
        expect(&api.get(&guarded, path).await?, 401, "unauthorized")?;
    }
    let body = Some(r#"{"profile":"shell","args":["true"]}"#);
    let resp = api.call(&guarded, Method::POST, SPAWN, &read, body).await?;
    expect(&resp, 403, "forbidden")?;
    let resp = api
        .call(&guarded, Method::GET, "/v1/runtimes", &read, None)
        .await?;
    expect(&resp, 200, "")?;
    guarded.stop().await?;
    Ok(())
}

/// A request that fails, and the status and error code it gets.
struct Case {
    method: Method,
    path: String,
    headers: Vec<(&'static str, &'static str)>,
    body: Option<String>,
    status: u16,
    code: &'static str,
}

impl Case {
    fn new(
        method: Method,
        path: impl Into<String>,
        body: Option<&str>,
        status: u16,
        code: &'static str,
    ) -> Case {
        Case {
            method,
            path: path.into(),
            headers: Vec::new(),
            body: body.map(str::to_string),
            status,
            code,
        }
    }

    fn get(path: impl Into<String>, status: u16, code: &'static str) -> Case {
        Case::new(Method::GET, path, None, status, code)
    }

    fn post(
        path: impl Into<String>,
        body: impl AsRef<str>,
        status: u16,
        code: &'static str,
    ) -> Case {
        Case::new(Method::POST, path, Some(body.as_ref()), status, code)
    }

    fn with(mut self, name: &'static str, value: &'static str) -> Case {
        self.headers.push((name, value));
        self
    }
}

/// An input body over [`MAX_BODY`].
fn big_input() -> String {
    json!({ "data": "x".repeat(MAX_BODY as usize) }).to_string()
}

/// A spawn body over [`MAX_BODY`].
fn big_spawn() -> String {
    json!({ "profile": "shell", "name": "n".repeat(MAX_BODY as usize) }).to_string()
}

fn urlencode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}
