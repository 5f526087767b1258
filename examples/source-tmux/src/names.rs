//! Session names, and who owns a session.
//!
//! A session is named `roster-w<pid>-<start>-<instance>-<n>`: the pid and start time of the
//! process whose source made it, that source's instance number in the process, and the
//! worker's number in that source. The name says whether its owner still lives, so a
//! source that starts on a server where sessions of an earlier run are left kills those
//! (nobody can follow them again) and leaves alone the sessions of a source that still
//! runs (another process, or another source of this process, on the same server).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::sys::{self, Proc};

/// What every session name of this kind starts with.
pub(crate) const PREFIX: &str = "roster-w";

static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

/// The instances of this process whose sources are not dropped yet.
static LIVE: Mutex<BTreeSet<u64>> = Mutex::new(BTreeSet::new());

fn live() -> std::sync::MutexGuard<'static, BTreeSet<u64>> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Who made a session: a source instance of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Owner {
    pid: u32,
    /// The process's start time (0 where `/proc` does not tell).
    start: u64,
    instance: u64,
}

impl Owner {
    /// A new owner for a source of this process, registered as live until
    /// [`retire`](Self::retire).
    pub(crate) fn register() -> Owner {
        let pid = std::process::id();
        let owner = Owner {
            pid,
            start: sys::start_time(pid as i32).unwrap_or(0),
            instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
        };
        live().insert(owner.instance);
        owner
    }

    /// The source is gone: its sessions are leftovers from now on.
    pub(crate) fn retire(&self) {
        live().remove(&self.instance);
    }

    /// What the names of this owner's sessions start with.
    fn stem(&self) -> String {
        format!("{PREFIX}{}-{}-{}-", self.pid, self.start, self.instance)
    }

    /// The name of worker `n`'s session.
    pub(crate) fn session(&self, n: u64) -> String {
        format!("{}{n}", self.stem())
    }

    /// The worker number of one of this owner's session names, in its one spelling.
    pub(crate) fn worker_of(&self, name: &str) -> Option<u64> {
        let n = name.strip_prefix(&self.stem())?;
        let id: u64 = n.parse().ok()?;
        (id.to_string() == n).then_some(id)
    }

    /// The owner a session name names, if it is a name of this kind.
    pub(crate) fn of(name: &str) -> Option<Owner> {
        let rest = name.strip_prefix(PREFIX)?;
        let mut parts = rest.split('-');
        let owner = Owner {
            pid: parts.next()?.parse().ok()?,
            start: parts.next()?.parse().ok()?,
            instance: parts.next()?.parse().ok()?,
        };
        let _worker: u64 = parts.next()?.parse().ok()?;
        parts.next().is_none().then_some(owner)
    }

    /// Whether the source that made sessions of this owner still runs.
    pub(crate) fn alive(&self) -> bool {
        let me = std::process::id();
        if self.pid == me && self.start == sys::start_time(me as i32).unwrap_or(0) {
            return live().contains(&self.instance);
        }
        let Ok(pid) = i32::try_from(self.pid) else {
            return false;
        };
        Proc {
            pid,
            start: (self.start != 0).then_some(self.start),
        }
        .alive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_name_names_its_owner_and_worker() {
        let owner = Owner::register();
        let name = owner.session(17);
        assert!(name.starts_with(PREFIX));
        assert_eq!(Owner::of(&name), Some(owner));
        assert_eq!(owner.worker_of(&name), Some(17));
        assert_eq!(owner.worker_of(&format!("{name}0")), Some(170));
        assert_eq!(owner.worker_of(&format!("{name}#x")), None);
        let zero_padded = format!("{}017", owner.stem());
        assert_eq!(owner.worker_of(&zero_padded), None);
        assert_eq!(Owner::of("main"), None);
        assert_eq!(Owner::of(&format!("{name}-1")), None);
        owner.retire();
    }

    #[test]
    fn an_owner_is_alive_while_registered_and_not_after() {
        let owner = Owner::register();
        let other = Owner::register();
        assert!(owner.alive() && other.alive());
        owner.retire();
        assert!(!owner.alive());
        assert!(other.alive());
        other.retire();
    }

    #[test]
    fn an_owner_of_an_ended_process_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let start = sys::start_time(pid as i32).unwrap_or(0);
        child.wait().unwrap();
        let gone = Owner {
            pid,
            start,
            instance: 1,
        };
        // The pid may be reused by now, but not with the same start time.
        assert!(!gone.alive() || sys::start_time(pid as i32) != Some(start));
    }
}
