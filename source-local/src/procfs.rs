//! What this crate learns from `/proc` and asks of the kernel about processes it did not
//! start: whether a pid is still the process a descriptor names, a pidfd to wait for its
//! end, and signals that reach only that process.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

/// How far a process's start time (from `/proc`) may be from a descriptor's `started_at`
/// and still count as the same process, in seconds. `btime` in `/proc/stat` is whole
/// seconds and the start time in clock ticks is cut to whole seconds, so two honest
/// readings can differ by one.
pub(crate) const START_TOLERANCE_SECS: i64 = 1;

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), the unit of `starttime` in
/// `/proc/<pid>/stat`.
fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        // SAFETY: sysconf has no preconditions; it only reads a system value.
        let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if n > 0 {
            n as u64
        } else {
            100
        }
    })
}

/// The boot time in seconds since the epoch (`btime` of `/proc/stat`).
fn boot_time() -> io::Result<i64> {
    let text = fs::read_to_string("/proc/stat")?;
    parse_btime(&text).ok_or_else(|| io::Error::other("no btime line in the kernel's stat"))
}

fn parse_btime(text: &str) -> Option<i64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The fields of `/proc/<pid>/stat` this crate needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stat {
    /// The state letter (`R`, `S`, `Z`, …).
    pub(crate) state: char,
    /// Field 22: start time in clock ticks since boot.
    pub(crate) start_ticks: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may hold
/// spaces and parentheses itself, so the fields are counted from after the *last* `)`.
pub(crate) fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // After `)`: field 3 (state) comes first, so field 22 is the 20th.
    let state = fields.next()?.chars().next()?;
    let start_ticks = fields.nth(18)?.parse().ok()?;
    Some(Stat { state, start_ticks })
}

/// The process `pid` now: `None` when there is no such process.
fn stat_of(pid: i32) -> io::Result<Option<Stat>> {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(text) => Ok(parse_stat(&text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// When process `pid` started, in whole seconds since the epoch; `None` when there is no
/// such process. Zombies (ended, not yet reaped) count as ended: `Ok(None)` too.
pub(crate) fn start_time(pid: i32) -> io::Result<Option<i64>> {
    let Some(stat) = stat_of(pid)? else {
        return Ok(None);
    };
    if matches!(stat.state, 'Z' | 'X' | 'x') {
        return Ok(None);
    }
    let btime = boot_time()?;
    Ok(Some(btime + (stat.start_ticks / clock_ticks()) as i64))
}

/// What `pid` is now, measured against a descriptor's start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Liveness {
    /// A live process that started when the descriptor says.
    Same,
    /// No such live process, or one that started at another time (the pid was reused).
    Gone,
}

/// Whether `pid` is the live process that started at `started_secs` (within
/// [`START_TOLERANCE_SECS`]). An unreadable `/proc` counts as gone: a process this source
/// cannot vouch for is never shown running, and never signalled.
pub(crate) fn liveness(pid: i32, started_secs: i64) -> Liveness {
    match start_time(pid) {
        Ok(Some(start)) if (start - started_secs).abs() <= START_TOLERANCE_SECS => Liveness::Same,
        Ok(_) => Liveness::Gone,
        Err(e) => {
            tracing::debug!(error = %e, "a process's stat could not be read; it counts as gone");
            Liveness::Gone
        }
    }
}

/// A pidfd: a handle on one process that can't come to mean another one. It becomes
/// readable when the process ends (also for a process that is not our child).
#[derive(Debug)]
pub(crate) struct Pidfd(OwnedFd);

impl Pidfd {
    /// `pidfd_open(pid, 0)`.
    pub(crate) fn open(pid: i32) -> io::Result<Pidfd> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is
        // passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        Ok(Pidfd(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }))
    }

    /// Another fd on the same pidfd (`dup`), to be waited on by another task: one fd can
    /// be registered with the reactor only once.
    pub(crate) fn try_clone(&self) -> io::Result<Pidfd> {
        Ok(Pidfd(self.0.try_clone()?))
    }

    /// Whether the process has ended (the fd polls readable).
    pub(crate) fn has_exited(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, a count of 1 and a zero timeout: poll returns at once.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n > 0 && pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
    }

    /// `pidfd_send_signal(fd, sig, NULL, 0)`: reaches the process this fd was opened for,
    /// or fails with `ESRCH` once it has ended.
    pub(crate) fn send_signal(&self, sig: i32) -> io::Result<()> {
        // SAFETY: a valid fd, a signal number, a null siginfo (allowed) and zero flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsRawFd for Pidfd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// How this source watches a live process.
#[derive(Debug)]
pub(crate) enum Handle {
    /// A pidfd, checked against the start time after it was opened: it names the right
    /// process for good.
    Pidfd(Pidfd),
    /// The kernel has no pidfd for us: `/proc` is looked at every `poll_interval`, and just
    /// before each signal.
    Poll,
}

/// What a descriptor's process is when first seen.
#[derive(Debug)]
pub(crate) enum Probe {
    /// Live and the same process, with a handle to watch it by.
    Alive(Handle),
    /// Gone, a zombie, or another process under the same pid.
    Gone,
}

/// Opens a handle on the process a descriptor names. The pidfd is opened *before* the
/// start time is checked: if the check passes, the fd was opened on that very process
/// (a pid is not reused while its process lives), so it can never come to name another.
pub(crate) fn probe(pid: i32, started_secs: i64) -> Probe {
    match Pidfd::open(pid) {
        Ok(fd) => {
            if fd.has_exited() {
                return Probe::Gone;
            }
            match liveness(pid, started_secs) {
                Liveness::Same => Probe::Alive(Handle::Pidfd(fd)),
                Liveness::Gone => Probe::Gone,
            }
        }
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Probe::Gone,
        Err(e) => {
            tracing::debug!(error = %e, "pidfd_open failed; watching the process through /proc");
            match liveness(pid, started_secs) {
                Liveness::Same => Probe::Alive(Handle::Poll),
                Liveness::Gone => Probe::Gone,
            }
        }
    }
}

/// Whether `pid` leads its own process group (then the group is signalled, so that its
/// children go too).
fn leads_group(pid: i32) -> bool {
    // SAFETY: getpgid takes a pid and returns a pgid or -1; no memory is passed.
    let pgid = unsafe { libc::getpgid(pid) };
    pgid == pid
}

/// Sends `sig` to the worker whose process is `pid`, only while that is still the process
/// the descriptor names. Returns whether a signal went out.
///
/// With a pidfd: the fd says whether *that* process has ended; if not, and it leads its
/// own process group, the group gets the signal by `kill(-pid)`; otherwise the process gets
/// it through the fd. The group's id is the leader's pid, which can't be reused while the
/// leader lives, nor while any member of the group does; the one race left is a leader that
/// ends (and whose group empties) between the fd's answer and the `kill`, after which a new
/// group leader would have to be given that very pid in that instant.
///
/// Without a pidfd: `/proc` is checked for the start time just before the signal; the race
/// is the same window with a reused pid.
pub(crate) fn signal(pid: i32, started_secs: i64, handle: &Handle, sig: i32) -> io::Result<bool> {
    match handle {
        Handle::Pidfd(fd) => {
            if fd.has_exited() {
                return Ok(false);
            }
            if leads_group(pid) {
                kill(-pid, sig)
            } else {
                match fd.send_signal(sig) {
                    Ok(()) => Ok(true),
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
        Handle::Poll => {
            if liveness(pid, started_secs) != Liveness::Same {
                return Ok(false);
            }
            if leads_group(pid) {
                kill(-pid, sig)
            } else {
                kill(pid, sig)
            }
        }
    }
}

fn kill(target: i32, sig: i32) -> io::Result<bool> {
    // SAFETY: kill takes a pid (or -pgid) and a signal number; no memory is passed.
    let r = unsafe { libc::kill(target, sig) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ESRCH) {
        return Ok(false);
    }
    Err(e)
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use super::*;

    fn now_secs() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    #[test]
    fn stat_is_parsed_after_the_last_parenthesis() {
        let line = "1234 (a) b) (c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    98765 1000 100 18446744073709551615";
        let stat = parse_stat(line).unwrap();
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.start_ticks, 98765);
        assert_eq!(parse_stat("1234 (no end"), None);
        assert_eq!(parse_stat("1234 (short) S 1 2"), None);
        assert_eq!(
            parse_btime("cpu 1 2\nbtime 1714564800\nprocesses 9\n"),
            Some(1714564800)
        );
        assert_eq!(parse_btime("cpu 1 2\n"), None);
    }

    #[test]
    fn the_test_process_start_time_is_now_or_a_little_before() {
        let pid = std::process::id() as i32;
        let start = start_time(pid).unwrap().expect("this process exists");
        let now = now_secs();
        assert!(
            start <= now + START_TOLERANCE_SECS,
            "start {start}, now {now}"
        );
        // A test binary does not run for a day.
        assert!(start > now - 86_400, "start {start}, now {now}");
        assert_eq!(liveness(pid, start), Liveness::Same);
        assert_eq!(liveness(pid, start - 3600), Liveness::Gone);
    }

    #[test]
    fn a_child_is_the_same_process_until_it_ends_and_then_gone() {
        let mut child = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let start = start_time(pid).unwrap().expect("the child exists");
        let Probe::Alive(Handle::Pidfd(fd)) = probe(pid, start) else {
            panic!("expected a live child with a pidfd");
        };
        assert!(!fd.has_exited());
        // Another start time: never the same process.
        assert!(matches!(probe(pid, start + 3600), Probe::Gone));
        // Signals go out while it lives, through the fd (sleep leads no group of its own).
        assert!(!leads_group(pid));
        assert!(signal(
            pid,
            start,
            &Handle::Pidfd(Pidfd::open(pid).unwrap()),
            libc::SIGKILL
        )
        .unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !fd.has_exited() {
            assert!(Instant::now() < deadline, "the killed child did not end");
            std::thread::sleep(Duration::from_millis(10));
        }
        // A zombie (not yet reaped) counts as gone.
        assert_eq!(liveness(pid, start), Liveness::Gone);
        assert!(!signal(pid, start, &Handle::Pidfd(fd), libc::SIGKILL).unwrap());
        child.wait().unwrap();
        assert!(matches!(probe(pid, start), Probe::Gone));
    }
}
