//! The few system calls the runtime makes directly. Every `unsafe` block of the crate is here,
//! in [`spawn`], which starts a worker's process, and in [`cgroup`], which contains it.

mod cgroup;
mod spawn;

pub(crate) use cgroup::{CgroupTree, WorkerCgroup};
pub(crate) use spawn::{reap, set_nonblocking, spawn, Exec, CHILD_STACK};

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Sends `signal` to every process of the process group `pgid`.
///
/// Callers make sure the group id still names the worker's group: the worker's leader (whose
/// pid is the pgid) is not reaped yet, so the id cannot have been reused.
pub(crate) fn signal_group(pgid: i32, signal: i32) -> io::Result<()> {
    // Guard against ever signalling "every process" (-1) or our own group (0).
    if pgid <= 1 {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: kill has no memory-safety preconditions.
    let rc = unsafe { libc::kill(-pgid, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether any process (a zombie included) is still in the process group `pgid`.
pub(crate) fn group_exists(pgid: i32) -> bool {
    match signal_group(pgid, 0) {
        Ok(()) => true,
        Err(e) => e.raw_os_error() != Some(libc::ESRCH),
    }
}

/// A pidfd for `pid`: it becomes readable when the process exits, without reaping it.
pub(crate) fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no pointers.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(rc).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Waits until `fd` is readable (for a pidfd: until its process has exited).
pub(crate) async fn wait_readable(fd: OwnedFd) -> io::Result<()> {
    // SAFETY: the AsyncFd takes ownership of the OwnedFd, so the fd stays open and is not
    // replaced for as long as it is registered.
    let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE)? };
    let _ready = fd.readable().await?;
    Ok(())
}

/// Blocks until the child `pid` has exited, without reaping it (`waitid` with `WNOWAIT`): it
/// stays a zombie, so its pid and process group id are not reused until it is reaped. For
/// kernels without pidfds; call it on a thread that may block.
pub(crate) fn wait_exited_unreaped(pid: i32) -> io::Result<()> {
    let id = libc::id_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    loop {
        // SAFETY: siginfo_t is a plain C struct for which all zero bytes are a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes only into `info`, which lives for the whole call.
        let rc = unsafe { libc::waitid(libc::P_PID, id, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Marks every fd from 3 up close-on-exec. Called between fork (or clone) and exec so that
/// descriptors the host process inherited without close-on-exec (a job server pipe, a socket
/// handed over by a service manager) do not leak into workers or the watchdog. The std
/// library's own error-reporting pipe is close-on-exec already, so exec failures are still
/// reported.
/// Best effort: kernels before 5.11 lack the flag, and nothing changes there.
///
/// Async-signal-safe: a single system call.
pub(crate) fn cloexec_inherited_fds() {
    // SAFETY: close_range takes plain integers; with CLOSE_RANGE_CLOEXEC it closes nothing.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
    }
}

/// The runtime's own pid.
pub(crate) fn own_pid() -> i32 {
    std::process::id() as i32
}

/// Puts the watchdog in its own process group (so a terminal's signals to the host's group
/// do not reach it) without `PR_SET_PDEATHSIG`: it must outlive the runtime's process.
pub(crate) fn configure_watchdog(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    command.process_group(0);
    // SAFETY: the closure runs between fork and exec and makes one async-signal-safe system
    // call; it neither allocates nor takes locks.
    unsafe {
        command.pre_exec(|| {
            cloexec_inherited_fds();
            Ok(())
        });
    }
}
