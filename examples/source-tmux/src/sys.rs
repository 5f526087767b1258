//! The few system calls the source needs: FIFOs, process identity and signals.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// A process as the source knows it: its pid and, where `/proc` tells, its start time (in
/// clock ticks after boot), so that a pid reused by another process is never mistaken for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Proc {
    pub(crate) pid: i32,
    pub(crate) start: Option<u64>,
}

impl Proc {
    /// The process `pid` as it is now (its start time read from `/proc` where there is one).
    pub(crate) fn now(pid: i32) -> Proc {
        Proc {
            pid,
            start: start_time(pid),
        }
    }

    /// Whether the process is still this one. `false` once it is gone or its pid names
    /// another process; without `/proc`, whether some process has the pid.
    pub(crate) fn alive(&self) -> bool {
        match self.start {
            Some(start) => start_time(self.pid) == Some(start),
            None => {
                // SAFETY: kill with signal 0 only checks that the process exists.
                let r = unsafe { libc::kill(self.pid, 0) };
                r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
            }
        }
    }

    /// Sends `signal` to every other process of the group this process leads, the leader
    /// itself spared (found in `/proc`; a few passes, for processes forked meanwhile).
    /// Without `/proc`, or once the leader is gone, the whole group gets it.
    pub(crate) fn signal_members(&self, signal: i32) {
        if !self.alive() || start_time(std::process::id() as i32).is_none() {
            self.signal_group(signal);
            return;
        }
        for _ in 0..MEMBER_PASSES {
            let Ok(dir) = std::fs::read_dir("/proc") else {
                return;
            };
            let mut hit = 0;
            for entry in dir.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<i32>().ok())
                else {
                    continue;
                };
                if pid != self.pid && process_group(pid) == Some(self.pid) {
                    // SAFETY: a signal to a pid just seen in the group; no memory involved.
                    if unsafe { libc::kill(pid, signal) } == 0 {
                        hit += 1;
                    }
                }
            }
            if hit == 0 {
                return;
            }
        }
    }

    /// Sends `signal` to the process group this process leads (a tmux pane's process is the
    /// leader of its own session and group). Not sent when the pid names another process
    /// now; sent when the leader is gone but its group may live on. Returns whether it was
    /// sent to a live group.
    pub(crate) fn signal_group(&self, signal: i32) -> bool {
        if self.pid <= 1 {
            return false;
        }
        if let (Some(start), Some(now)) = (self.start, start_time(self.pid)) {
            if start != now {
                return false;
            }
        }
        // SAFETY: a negative pid addresses the process group; no memory is involved.
        unsafe { libc::kill(-self.pid, signal) == 0 }
    }
}

/// The start time of process `pid` in clock ticks after boot (field 22 of
/// `/proc/<pid>/stat`), or `None` when there is no such process or no `/proc`.
pub(crate) fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces or ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts at field 3 (the state); the start time is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// How often [`Proc::signal_members`] looks for the group's processes at most.
const MEMBER_PASSES: usize = 4;

/// The process group of process `pid` (field 5 of `/proc/<pid>/stat`); `None` for a
/// zombie, which no signal reaches any more.
fn process_group(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    if fields.next()? == "Z" {
        return None;
    }
    fields.nth(1)?.parse().ok()
}

/// Bytes from the system's random source, for names nobody can guess; a hash of the time
/// and the process where there is none.
pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    let read = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf));
    if read.is_err() {
        use std::hash::{BuildHasher, Hasher};
        for (i, chunk) in buf.chunks_mut(8).enumerate() {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_usize(i);
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            let v = h.finish().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `/proc` tells start times on this system.
#[cfg(test)]
pub(crate) fn has_proc() -> bool {
    start_time(std::process::id() as i32).is_some()
}

/// Whether `path` is a file someone may execute.
pub(crate) fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Creates `dir` (and its parents) readable by this user alone, if it is not there.
pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Makes a FIFO at `path`, readable and writable by this user alone.
pub(crate) fn mkfifo(path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path"))?;
    // SAFETY: `c` is a valid NUL-terminated string that lives across the call.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Opens the read end of the FIFO at `path` without waiting for a writer.
pub(crate) fn open_fifo_reader(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

/// What a look at a FIFO's read end found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FifoPeek {
    /// No writer has it open.
    NoWriter,
    /// A writer has it open; nothing to read yet.
    Writer,
    /// A writer has it open and wrote these bytes.
    Data(Vec<u8>),
}

/// Looks at a FIFO's read end without blocking (it was opened non-blocking).
pub(crate) fn peek_fifo(mut file: &File) -> io::Result<FifoPeek> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        return match file.read(&mut buf) {
            Ok(0) => Ok(FifoPeek::NoWriter),
            Ok(n) => {
                buf.truncate(n);
                Ok(FifoPeek::Data(buf))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(FifoPeek::Writer),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Err(e),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_made_up_start_time_is_not() {
        let me = Proc::now(std::process::id() as i32);
        assert!(me.alive());
        if has_proc() {
            let other = Proc {
                start: me.start.map(|s| s + 1),
                ..me
            };
            assert!(
                !other.alive(),
                "a pid with another start time is another process"
            );
            assert!(!other.signal_group(0));
        }
    }

    #[test]
    fn an_ended_child_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let proc = Proc::now(pid);
        child.wait().unwrap();
        assert!(!proc.alive() || start_time(pid) != proc.start);
    }

    #[test]
    fn members_of_a_group_die_and_its_leader_is_spared() {
        use std::os::unix::process::CommandExt;
        // A leader (its own group) with a child in its group.
        let mut leader = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 300 & exec sleep 301"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = leader.id() as i32;
        let proc = Proc::now(pid);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let members = || {
            std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|p| *p != pid && process_group(*p) == Some(pid))
                .count()
        };
        while members() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the child never started"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        proc.signal_members(libc::SIGKILL);
        while members() != 0 {
            assert!(std::time::Instant::now() < deadline, "a member survived");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(proc.alive(), "the leader is spared");
        proc.signal_group(libc::SIGKILL);
        leader.wait().unwrap();
    }

    #[test]
    fn random_names_differ() {
        let a = random_hex(16);
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, random_hex(16));
    }

    #[test]
    fn a_fifo_tells_whether_a_writer_has_it_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        mkfifo(&path).unwrap();
        let reader = open_fifo_reader(&path).unwrap();
        assert_eq!(peek_fifo(&reader).unwrap(), FifoPeek::NoWriter);
        let mut writer = OpenOptions::new().write(true).open(&path).unwrap();
        assert_eq!(peek_fifo(&reader).unwrap(), FifoPeek::Writer);
        io::Write::write_all(&mut writer, b"abc").unwrap();
        assert_eq!(peek_fifo(&reader).unwrap(), FifoPeek::Data(b"abc".to_vec()));
        drop(writer);
        // A process another test forks in this instant holds a copy of the writer until it
        // execs (the fd is close-on-exec), so the last writer may go a moment later.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while peek_fifo(&reader).unwrap() != FifoPeek::NoWriter {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer never went"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
