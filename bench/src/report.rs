//! Rows of figures, their ratios to the baselines, the plain table and the JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

/// Which way a figure is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    /// Throughput, rates.
    Higher,
    /// Times, latencies, bytes.
    Lower,
}

/// A goal of issue 12 for one row.
#[derive(Debug, Clone, Serialize)]
pub struct Goal {
    /// How it reads, e.g. `≥ 10× supervisord`.
    pub text: String,
    /// Whether the measured figures meet it.
    pub met: bool,
}

/// One measured figure (or one peer that was not measured).
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// `spawn`, `get`, ….
    pub scenario: String,
    /// What is measured, e.g. `1000 × /bin/true, 32 in flight`.
    pub metric: String,
    /// `roster`, `raw`, `supervisord`, ….
    pub subject: String,
    /// Unit of the samples, e.g. `spawns/s`.
    pub unit: String,
    /// Which way is better.
    pub better: Better,
    /// One sample per round.
    pub samples: Vec<f64>,
    /// Minimum, median and maximum of the samples.
    pub min: Option<f64>,
    /// Median.
    pub median: Option<f64>,
    /// Maximum.
    pub max: Option<f64>,
    /// `(baseline subject, Roster's advantage)`: > 1 means Roster is better by that factor.
    pub ratio: Option<(String, f64)>,
    /// The goal for this row, if the issue sets one.
    pub goal: Option<Goal>,
    /// What the scenario counted (e.g. exits seen), so a run shows it did the work.
    pub counts: BTreeMap<String, u64>,
    /// `not measured: <why>` for a peer that is missing.
    pub note: Option<String>,
}

impl Row {
    /// A row of samples.
    pub fn new(
        scenario: &str,
        metric: &str,
        subject: &str,
        unit: &str,
        better: Better,
        samples: Vec<f64>,
    ) -> Row {
        let mut sorted = samples.clone();
        sorted.sort_by(f64::total_cmp);
        let (min, median, max) = if sorted.is_empty() {
            (None, None, None)
        } else {
            (
                Some(sorted[0]),
                Some(sorted[sorted.len() / 2]),
                Some(sorted[sorted.len() - 1]),
            )
        };
        Row {
            scenario: scenario.into(),
            metric: metric.into(),
            subject: subject.into(),
            unit: unit.into(),
            better,
            samples,
            min,
            median,
            max,
            ratio: None,
            goal: None,
            counts: BTreeMap::new(),
            note: None,
        }
    }

    /// A peer that could not be measured, and why.
    pub fn not_measured(scenario: &str, metric: &str, subject: &str, why: &str) -> Row {
        let mut row = Row::new(scenario, metric, subject, "", Better::Higher, Vec::new());
        row.note = Some(format!("not measured: {why}"));
        row
    }

    /// Adds a count.
    pub fn count(mut self, key: &str, n: u64) -> Row {
        self.counts.insert(key.into(), n);
        self
    }

    /// Sets the ratio to `baseline` and, with `goal_factor`, the goal `≥ factor× baseline`.
    pub fn against(&mut self, baseline: &Row, goal_factor: Option<f64>) {
        let (Some(me), Some(base)) = (self.median, baseline.median) else {
            if let Some(f) = goal_factor {
                self.goal = Some(Goal {
                    text: format!("≥ {f}× {} (not measured)", baseline.subject),
                    met: false,
                });
            }
            return;
        };
        let ratio = match self.better {
            Better::Higher => me / base.max(f64::MIN_POSITIVE),
            Better::Lower => base / me.max(f64::MIN_POSITIVE),
        };
        self.ratio = Some((baseline.subject.clone(), ratio));
        if let Some(f) = goal_factor {
            self.goal = Some(Goal {
                text: format!("≥ {f}× {}", baseline.subject),
                met: ratio >= f,
            });
        }
    }

    /// Sets an absolute goal on the median: `≤ limit unit` (or `≥` for `Better::Higher`).
    pub fn limit(&mut self, limit: f64, text: &str) {
        let met = self.median.is_some_and(|m| match self.better {
            Better::Higher => m >= limit,
            Better::Lower => m <= limit,
        });
        self.goal = Some(Goal {
            text: text.into(),
            met,
        });
    }
}

fn fig(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

/// The plain table (one line per row, grouped by scenario).
pub fn table(rows: &[Row], header: &str) -> String {
    let mut out = format!("{header}\n");
    let mut last = "";
    for r in rows {
        if r.scenario != last {
            let _ = writeln!(out, "\n== {}", r.scenario);
            let _ = writeln!(
                out,
                "{:<46} {:<12} {:>10} {:>10} {:>10} {:<10} {:<22} goal / counts",
                "metric", "subject", "min", "median", "max", "unit", "ratio"
            );
            last = &r.scenario;
        }
        let ratio = r
            .ratio
            .as_ref()
            .map_or(String::new(), |(b, x)| format!("{x:.2}× vs {b}"));
        let mut tail = match &r.goal {
            Some(g) => format!("[{}] {}", g.text, if g.met { "met" } else { "MISSED" }),
            None => String::new(),
        };
        if let Some(note) = &r.note {
            tail = note.clone();
        }
        if !r.counts.is_empty() {
            let counts: Vec<String> = r.counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
            if !tail.is_empty() {
                tail.push_str("; ");
            }
            tail.push_str(&counts.join(" "));
        }
        let _ = writeln!(
            out,
            "{:<46} {:<12} {:>10} {:>10} {:>10} {:<10} {:<22} {}",
            r.metric,
            r.subject,
            fig(r.min),
            fig(r.median),
            fig(r.max),
            r.unit,
            ratio,
            tail
        );
    }
    out
}
