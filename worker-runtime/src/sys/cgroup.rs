//! CgroupTree in cgroup v2: a cgroup per worker, so that the processes that leave the
//! worker's process group (`setsid`, `setpgid`) are still the worker's.
//!
//! The runtime makes `roster-<instance>` under a root (its own cgroup by default) and one
//! `w-<n>` in it per run of a worker. The child moves itself into its cgroup between `clone`
//! and `execve` (it writes `0` to the cgroup's `cgroup.procs`, through a descriptor opened
//! before the clone), so everything the worker ever starts is in it, with no window in which
//! a process could escape. Killing is one write of `1` to `cgroup.kill` (kernel 5.14 or
//! newer), which SIGKILLs every process in the cgroup, wherever its process group; the
//! empty cgroup is then removed.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The runtime's own cgroup, `roster-<instance>` under the root.
pub(crate) struct CgroupTree {
    dir: PathBuf,
    next: AtomicU64,
}

/// One run's cgroup: its directory and an open descriptor on its `cgroup.procs`, which the
/// child writes to.
pub(crate) struct WorkerCgroup {
    dir: PathBuf,
    procs: OwnedFd,
}

// No path in `Debug`: it is the host's.
impl std::fmt::Debug for CgroupTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CgroupTree")
    }
}

impl std::fmt::Debug for WorkerCgroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkerCgroup")
    }
}

impl CgroupTree {
    /// Makes the runtime's cgroup under `root` (or under this process's own cgroup v2 when
    /// `None`). The error says, for people and without a path, why there is no containment.
    pub(crate) fn new(root: Option<&Path>, instance: &str) -> Result<CgroupTree, String> {
        let root = match root {
            Some(root) => root.to_path_buf(),
            None => own_cgroup().ok_or_else(|| "this host has no cgroup v2 mount".to_string())?,
        };
        let dir = root.join(format!("roster-{instance}"));
        std::fs::create_dir(&dir)
            .map_err(|e| format!("the cgroup v2 tree is not writable here ({})", e.kind()))?;
        let containment = CgroupTree {
            dir,
            next: AtomicU64::new(1),
        };
        if !containment.dir.join("cgroup.kill").exists() {
            return Err("the kernel has no cgroup.kill (it needs Linux 5.14 or newer)".into());
        }
        // One try, so that a tree where a cgroup can be made but not entered is found now.
        let probe = containment
            .create()
            .map_err(|e| format!("a worker's cgroup cannot be made ({})", e.kind()))?;
        probe.remove();
        Ok(containment)
    }

    /// The runtime's cgroup directory (for the watchdog, which kills all of it when the
    /// runtime's process is gone).
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new, empty cgroup for one run of a worker.
    pub(crate) fn create(&self) -> io::Result<WorkerCgroup> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.join(format!("w-{n}"));
        std::fs::create_dir(&dir)?;
        match open_write(&dir.join("cgroup.procs")) {
            Ok(procs) => Ok(WorkerCgroup { dir, procs }),
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                Err(e)
            }
        }
    }
}

impl Drop for CgroupTree {
    /// The runtime is gone: whatever is still in its cgroups is killed, and the cgroups are
    /// removed once empty: briefly here (killed processes go within milliseconds), so that a
    /// process that ends right after leaves nothing behind, then on a short-lived thread for
    /// up to 5 s.
    fn drop(&mut self) {
        let dir = std::mem::take(&mut self.dir);
        if std::fs::remove_dir(&dir).is_ok() {
            return;
        }
        let _ = std::fs::write(dir.join("cgroup.kill"), b"1");
        if remove_tree(&dir, Duration::from_millis(200)) {
            return;
        }
        let _ = std::thread::Builder::new()
            .name("worker-cgroup-cleanup".into())
            .spawn(move || remove_tree(&dir, Duration::from_secs(5)));
    }
}

/// Removes `dir` and the cgroups in it as they become empty, for up to `within`. Whether it
/// is gone.
fn remove_tree(dir: &Path, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = std::fs::remove_dir(entry.path());
                }
            }
        }
        if std::fs::remove_dir(dir).is_ok() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl WorkerCgroup {
    /// The descriptor the child writes `0` to, to move itself in.
    pub(crate) fn procs_fd(&self) -> i32 {
        self.procs.as_raw_fd()
    }

    /// SIGKILLs every process in the cgroup.
    pub(crate) fn kill(&self) {
        if let Err(e) = std::fs::write(self.dir.join("cgroup.kill"), b"1") {
            tracing::debug!(error = %e, "cannot kill a worker's cgroup");
        }
    }

    /// Whether a process is still in the cgroup.
    pub(crate) fn populated(&self) -> bool {
        std::fs::read_to_string(self.dir.join("cgroup.events"))
            .map(|events| events.lines().any(|l| l == "populated 1"))
            .unwrap_or(false)
    }

    /// Removes the cgroup; true when it is gone (it must be empty for that).
    pub(crate) fn remove(&self) -> bool {
        match std::fs::remove_dir(&self.dir) {
            Ok(()) => true,
            Err(e) => e.kind() == io::ErrorKind::NotFound,
        }
    }
}

/// This process's cgroup in the cgroup v2 hierarchy: the `cgroup2` mount of
/// `/proc/self/mountinfo` joined with the `0::` line of `/proc/self/cgroup`.
fn own_cgroup() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = mountinfo.lines().find_map(cgroup2_mount)?;
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let own = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(mount.join(own.trim().trim_start_matches('/')))
}

/// The mount point of a `mountinfo` line whose file system type is `cgroup2`.
fn cgroup2_mount(line: &str) -> Option<PathBuf> {
    let (fields, rest) = line.split_once(" - ")?;
    if rest.split_whitespace().next()? != "cgroup2" {
        return None;
    }
    // Fields: id, parent, major:minor, root, mount point, …; spaces in paths are `\040`.
    let point = fields.split_whitespace().nth(4)?;
    Some(PathBuf::from(point.replace("\\040", " ")))
}

fn open_write(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: open takes a valid NUL-terminated string and flags; no other pointers.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_among_v1_ones() {
        let v1 = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu";
        let v2 = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";
        let spaced = "41 31 0:38 / /mnt/my\\040cg rw shared:9 - cgroup2 none rw";
        assert_eq!(cgroup2_mount(v1), None);
        assert_eq!(
            cgroup2_mount(v2),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount(spaced), Some(PathBuf::from("/mnt/my cg")));
        assert_eq!(cgroup2_mount("garbage"), None);
    }

    #[test]
    fn a_root_that_is_not_a_cgroup_gives_a_reason_without_a_path() {
        let dir = std::env::temp_dir().join(format!("roster-not-a-cgroup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let reason = CgroupTree::new(Some(&dir), "test").unwrap_err();
        let _ = std::fs::remove_dir(dir.join("roster-test"));
        let _ = std::fs::remove_dir(&dir);
        assert!(reason.contains("cgroup.kill"), "{reason}");
        assert!(!reason.contains('/'), "{reason}");
    }
}
