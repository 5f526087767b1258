//! Metrics of the `roster` process itself, read from `/proc/self` at each render, under the
//! names Prometheus' client libraries use for them: `process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_open_fds`, `process_max_fds`,
//! `process_start_time_seconds`; and `roster_build_info{version}`, always 1.
//!
//! Where `/proc` can't be read (another OS, a sandbox without it) a family is left out rather
//! than reported as 0: a missing series is honest, a zero would be a lie.

use std::fmt::{self, Write as _};
use std::fs;

use super::header;

/// The unit of the times in `/proc/<pid>/stat`. The kernel always reports them in `USER_HZ`,
/// which is 100 on every architecture Linux runs on (Prometheus' own `procfs` library makes
/// the same assumption).
const USER_HZ: f64 = 100.0;

/// What `/proc/self` says now; each field `None` where it could not be read.
#[derive(Debug, Default, PartialEq)]
struct ProcessStats {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<u64>,
    open_fds: Option<u64>,
    max_fds: Option<u64>,
    start_time_seconds: Option<f64>,
}

impl ProcessStats {
    fn read() -> ProcessStats {
        let stat = fs::read_to_string("/proc/self/stat").ok();
        let stat = stat.as_deref().and_then(parse_stat);
        let boot_time = fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|text| parse_boot_time(&text));
        ProcessStats {
            cpu_seconds: stat.map(|s| (s.utime + s.stime) as f64 / USER_HZ),
            resident_bytes: fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|text| parse_rss(&text)),
            open_fds: fs::read_dir("/proc/self/fd")
                .ok()
                .map(|dir| dir.filter(Result::is_ok).count() as u64),
            max_fds: fs::read_to_string("/proc/self/limits")
                .ok()
                .and_then(|text| parse_max_fds(&text)),
            start_time_seconds: match (stat, boot_time) {
                (Some(s), Some(boot)) => Some(boot as f64 + s.starttime as f64 / USER_HZ),
                _ => None,
            },
        }
    }
}

/// The fields of `/proc/self/stat` used here, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stat {
    utime: u64,
    stime: u64,
    starttime: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may hold
/// spaces and parentheses itself, so fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name, field 3 (state) is index 0: field n is index n - 3.
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime: field(14)?,
        stime: field(15)?,
        starttime: field(22)?,
    })
}

/// `btime` of `/proc/stat`: the boot time in seconds since the epoch.
fn parse_boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// `VmRSS` of `/proc/<pid>/status` (in kB there), in bytes.
fn parse_rss(text: &str) -> Option<u64> {
    let line = text.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().next()?.parse().ok()?;
    kb.checked_mul(1024)
}

/// The soft limit of "Max open files" in `/proc/<pid>/limits`; `None` when unlimited.
fn parse_max_fds(text: &str) -> Option<u64> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    line.split_whitespace().next()?.parse().ok()
}

/// Writes the process families and `roster_build_info`.
pub(super) fn write(out: &mut String) -> fmt::Result {
    let stats = ProcessStats::read();
    let families = [
        (
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time spent, in seconds.",
            stats.cpu_seconds.map(|v| v.to_string()),
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            stats.resident_bytes.map(|v| v.to_string()),
        ),
        (
            "process_open_fds",
            "gauge",
            "Open file descriptors.",
            stats.open_fds.map(|v| v.to_string()),
        ),
        (
            "process_max_fds",
            "gauge",
            "The limit of open file descriptors.",
            stats.max_fds.map(|v| v.to_string()),
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since the Unix epoch, in seconds.",
            stats.start_time_seconds.map(|v| v.to_string()),
        ),
    ];
    for (name, kind, help, value) in families {
        if let Some(value) = value {
            header(out, name, kind, help)?;
            writeln!(out, "{name} {value}")?;
        }
    }
    let name = "roster_build_info";
    header(
        out,
        name,
        "gauge",
        "Always 1; the `version` label is the version of this roster build.",
    )?;
    writeln!(
        out,
        "{name}{{version=\"{}\"}} 1",
        super::escape_label(env!("CARGO_PKG_VERSION"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        // A command name with spaces and a `)` of its own.
        let line = "4242 (ro ster) x) S 1 4242 4242 0 -1 4194560 1 0 0 0 250 75 0 0 20 0 9 0 \
                    123456 1000000 500 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
        let stat = parse_stat(line).unwrap();
        assert_eq!(
            stat,
            Stat {
                utime: 250,
                stime: 75,
                starttime: 123456
            }
        );
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn status_limits_and_boot_time_are_read() {
        assert_eq!(
            parse_rss("Name:\troster\nVmRSS:\t   20480 kB\nThreads:\t9\n"),
            Some(20480 * 1024)
        );
        assert_eq!(parse_rss("Name:\tkthread\n"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(parse_max_fds(limits), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_max_fds(unlimited), None);
        assert_eq!(
            parse_boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 5\n"),
            Some(1_700_000_000)
        );
    }

    #[test]
    fn this_process_is_measured() {
        let stats = ProcessStats::read();
        if !std::path::Path::new("/proc/self/stat").exists() {
            assert_eq!(stats, ProcessStats::default());
            return;
        }
        assert!(stats.resident_bytes.unwrap() > 0, "{stats:?}");
        assert!(stats.open_fds.unwrap() >= 3, "{stats:?}");
        let start = stats.start_time_seconds.unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        // Started after 2020 and not in the future (a second of rounding allowed).
        assert!(
            start > 1_577_836_800.0 && start <= now + 1.0,
            "{start} {now}"
        );
    }
}
