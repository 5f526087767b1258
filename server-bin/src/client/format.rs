//! Output for people: aligned tables (comfy-table), ages like "3m ago", states with their
//! exit code or reason, colour only on a terminal and never with `NO_COLOR` set.

use std::io::IsTerminal;

use comfy_table::{presets, Cell, Color, ContentArrangement, Table};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// How output is coloured.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    /// Colour on stdout.
    pub colour: bool,
}

impl Style {
    /// Colour when stdout is a terminal and `NO_COLOR` is unset or empty
    /// (<https://no-color.org>).
    pub fn detect() -> Style {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Style {
            colour: !no_color && std::io::stdout().is_terminal(),
        }
    }

    /// A table with a bold header and no borders (columns two spaces apart).
    pub fn table(&self, header: &[&str]) -> Table {
        let mut table = Table::new();
        table
            .load_preset(presets::NOTHING)
            .set_content_arrangement(ContentArrangement::Disabled);
        if self.colour {
            table.enforce_styling();
        } else {
            table.force_no_tty();
        }
        table.set_header(
            header
                .iter()
                .map(|h| Cell::new(h).add_attribute(comfy_table::Attribute::Bold)),
        );
        for column in table.column_iter_mut() {
            column.set_padding((0, 2));
        }
        table
    }

    /// A cell with the state's colour.
    pub fn state_cell(&self, worker: &Value) -> Cell {
        let text = state_text(worker);
        let cell = Cell::new(text);
        if !self.colour {
            return cell;
        }
        match worker["state"].as_str().unwrap_or_default() {
            "running" => cell.fg(Color::Green),
            "starting" | "stopping" | "unknown" => cell.fg(Color::Yellow),
            "failed" => cell.fg(Color::Red),
            "exited" if worker["exit_code"].as_i64().is_some_and(|c| c != 0) => cell.fg(Color::Red),
            _ => cell,
        }
    }

    /// A cell with the health's colour.
    pub fn health_cell(&self, status: &str) -> Cell {
        let cell = Cell::new(status);
        if !self.colour {
            return cell;
        }
        match status {
            "ready" => cell.fg(Color::Green),
            "degraded" => cell.fg(Color::Yellow),
            "unavailable" => cell.fg(Color::Red),
            _ => cell,
        }
    }
}

/// A worker's state for a person: `exited (3)`, `failed (killed)`, `running`.
pub fn state_text(worker: &Value) -> String {
    let state = worker["state"].as_str().unwrap_or("?");
    match state {
        "exited" => match worker["exit_code"].as_i64() {
            Some(code) => format!("exited ({code})"),
            None => "exited (code unknown)".to_string(),
        },
        "failed" => match worker["reason"].as_str() {
            Some(reason) => format!("failed ({reason})"),
            None => "failed".to_string(),
        },
        other => other.to_string(),
    }
}

/// A timestamp of the API.
pub fn parse_time(value: &Value) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(value.as_str()?, &Rfc3339).ok()
}

/// A span for a person: `45s`, `3m`, `2h5m`, `4d3h`.
pub fn span(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => match (s % 3600) / 60 {
            0 => format!("{}h", s / 3600),
            m => format!("{}h{m}m", s / 3600),
        },
        _ => match (s % 86_400) / 3600 {
            0 => format!("{}d", s / 86_400),
            h => format!("{}d{h}h", s / 86_400),
        },
    }
}

/// "3m ago" for a timestamp, "-" for none.
pub fn ago(value: &Value, now: OffsetDateTime) -> String {
    match parse_time(value) {
        Some(t) => format!("{} ago", span((now - t).whole_seconds())),
        None => "-".to_string(),
    }
}

/// How long a worker has run (until it ended, or until now), "-" before it started.
pub fn uptime(worker: &Value, now: OffsetDateTime) -> String {
    let Some(started) = parse_time(&worker["started_at"]) else {
        return "-".to_string();
    };
    let end = parse_time(&worker["ended_at"]).unwrap_or(now);
    span((end - started).whole_seconds())
}

/// `k=v,k2=v2`, "-" for none.
pub fn labels(value: &Value) -> String {
    let Some(map) = value.as_object().filter(|m| !m.is_empty()) else {
        return "-".to_string();
    };
    map.iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect::<Vec<_>>()
        .join(",")
}

/// What a worker runs: its profile and args, or its command.
pub fn what(worker: &Value) -> String {
    let words = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(quote).collect())
            .unwrap_or_default()
    };
    if let Some(profile) = worker["profile"].as_str() {
        let mut out = vec![format!("{profile}:")];
        out.extend(words(&worker["args"]));
        return out.join(" ");
    }
    let mut out = words(&worker["command"]);
    out.extend(words(&worker["args"]));
    out.join(" ")
}

/// A word as a shell would need it.
fn quote(word: &Value) -> String {
    let w = word.as_str().unwrap_or_default();
    if !w.is_empty()
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

/// The name, "-" for none.
pub fn name(worker: &Value) -> String {
    worker["name"].as_str().unwrap_or("-").to_string()
}

/// One line describing a worker (candidates of an ambiguous name, watch lines).
pub fn worker_line(worker: &Value, now: OffsetDateTime) -> String {
    format!(
        "{}  {}  {}  {}  {}",
        worker["id"].as_str().unwrap_or_default(),
        name(worker),
        worker["runtime_id"].as_str().unwrap_or_default(),
        state_text(worker),
        ago(&worker["created_at"], now),
    )
}

/// The rows of `roster ls`.
pub fn workers_table(style: Style, workers: &[Value], now: OffsetDateTime) -> Table {
    let mut table = style.table(&[
        "ID", "NAME", "RUNTIME", "STATE", "CREATED", "UPTIME", "LABELS", "COMMAND",
    ]);
    for w in workers {
        table.add_row(vec![
            Cell::new(w["id"].as_str().unwrap_or_default()),
            Cell::new(name(w)),
            Cell::new(w["runtime_id"].as_str().unwrap_or_default()),
            style.state_cell(w),
            Cell::new(ago(&w["created_at"], now)),
            Cell::new(uptime(w, now)),
            Cell::new(labels(&w["labels"])),
            Cell::new(what(w)),
        ]);
    }
    table
}

/// Worker counts by state, the non-zero ones: `2 running, 1 exited` ("none" for none).
pub fn counts(counts: &Value) -> String {
    let parts: Vec<String> = counts
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(state, n)| {
                    let n = n.as_u64()?;
                    (n > 0).then(|| format!("{n} {state}"))
                })
                .collect()
        })
        .unwrap_or_default();
    if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join(", ")
    }
}

/// The rows of `roster runtimes`.
pub fn runtimes_table(style: Style, runtimes: &[Value], now: OffsetDateTime) -> Table {
    let mut table = style.table(&["NAME", "KIND", "HEALTH", "SINCE", "WORKERS", "MESSAGE"]);
    for r in runtimes {
        let health = &r["health"];
        let mut message = health["message"].as_str().unwrap_or_default().to_string();
        if let Some(retry) = parse_time(&health["retry_at"]) {
            let secs = (retry - now).whole_seconds().max(0);
            if !message.is_empty() {
                message.push_str("; ");
            }
            message.push_str(&format!("retry in {}", span(secs)));
        }
        let diagnostics = r["diagnostics"].as_array().map_or(0, Vec::len);
        if diagnostics > 0 {
            if !message.is_empty() {
                message.push_str("; ");
            }
            message.push_str(&format!(
                "{diagnostics} diagnostic{}",
                if diagnostics == 1 { "" } else { "s" }
            ));
        }
        table.add_row(vec![
            Cell::new(r["id"].as_str().unwrap_or_default()),
            Cell::new(r["kind"].as_str().unwrap_or_default()),
            style.health_cell(health["status"].as_str().unwrap_or_default()),
            Cell::new(ago(&health["since"], now)),
            Cell::new(counts(&r["workers"])),
            Cell::new(if message.is_empty() { "-" } else { &message }),
        ]);
    }
    table
}

/// `roster get`: every field of the worker, one per line, in the API's order; times also
/// as ages.
pub fn worker_fields(worker: &Value, now: OffsetDateTime) -> String {
    let Some(map) = worker.as_object() else {
        return worker.to_string();
    };
    let width = map.keys().map(String::len).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (key, value) in map {
        let text = match (key.as_str(), value) {
            (_, Value::Null) => "-".to_string(),
            ("state", _) => state_text(worker),
            ("labels", v) => labels(v),
            (k, Value::String(s)) if k.ends_with("_at") => {
                format!("{s} ({})", ago(value, now))
            }
            (_, Value::String(s)) => s.clone(),
            (_, v) => v.to_string(),
        };
        out.push_str(&format!("{:<width$} {text}\n", format!("{key}:")));
    }
    if worker["started_at"].is_string() {
        out.push_str(&format!("{:<width$} {}\n", "uptime:", uptime(worker, now)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn spans_read_like_a_person_says_them() {
        assert_eq!(span(-3), "0s");
        assert_eq!(span(45), "45s");
        assert_eq!(span(180), "3m");
        assert_eq!(span(3600), "1h");
        assert_eq!(span(3600 + 5 * 60), "1h5m");
        assert_eq!(span(4 * 86_400 + 3 * 3600), "4d3h");
    }

    #[test]
    fn states_carry_their_code_or_reason() {
        assert_eq!(
            state_text(&json!({"state": "exited", "exit_code": 3})),
            "exited (3)"
        );
        assert_eq!(
            state_text(&json!({"state": "failed", "reason": "killed"})),
            "failed (killed)"
        );
        assert_eq!(state_text(&json!({"state": "running"})), "running");
    }

    #[test]
    fn commands_are_quoted_for_the_shell() {
        let w = json!({"profile": "shell", "args": ["echo hi; exit 3"]});
        assert_eq!(what(&w), "shell: 'echo hi; exit 3'");
        let w = json!({"profile": null, "command": ["sleep", "30"], "args": []});
        assert_eq!(what(&w), "sleep 30");
    }

    #[test]
    fn tables_have_no_colour_without_a_terminal() {
        let now = OffsetDateTime::now_utc();
        let w = json!({"id": "w_X", "runtime_id": "local", "name": "demo", "state": "failed",
                       "reason": "killed", "labels": {"team": "a"}, "created_at": null});
        let text =
            workers_table(Style { colour: false }, std::slice::from_ref(&w), now).to_string();
        assert!(!text.contains('\u{1b}'), "{text:?}");
        assert!(
            text.contains("failed (killed)") && text.contains("team=a"),
            "{text}"
        );
        let text = workers_table(Style { colour: true }, &[w], now).to_string();
        assert!(text.contains('\u{1b}'), "{text:?}");
    }
}
