//! Starting a worker's process without copying the runtime's address space.
//!
//! A `fork` copies the page tables of the whole runtime process, only for the child's
//! `execve` to throw them away: its cost grows with the runtime's memory. Here the child is
//! made with `clone(CLONE_VM | CLONE_VFORK)`, as `posix_spawn` makes its children: it runs on
//! a small stack of its own inside the runtime's memory, and the calling thread sleeps until
//! the child has called `execve` or exited. Unlike `posix_spawn`, the child can do what a
//! worker needs before the `execve`: its cgroup (where workers are contained), its own
//! process group, `PR_SET_PDEATHSIG`, the check
//! that the runtime is still its parent, stdio, marking inherited descriptors close-on-exec
//! and the working directory. The pidfd comes from the same call (`CLONE_PIDFD`), so it
//! names the child from its first instant.
//!
//! Between the `clone` and the `execve` the child shares the runtime's memory: it calls only
//! async-signal-safe functions, allocates nothing and takes no lock. Everything it needs
//! ([`Exec`]) is prepared before. Every signal is blocked around the `clone`, and the child
//! resets the handlers the runtime installed before it unblocks them, so no handler of the
//! runtime ever runs in the child.

use std::ffi::{c_char, c_int, c_void, CStr, CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, Ordering};

/// The size of the stack a child runs on until its `execve`. It needs a few hundred bytes;
/// the rest is room.
pub(crate) const CHILD_STACK: usize = 64 * 1024;

/// What to run, prepared for the child: the child may not allocate, so every string is a
/// `CString` already.
pub(crate) struct Exec {
    /// The paths to hand to `execve`, in order: the program itself when it names a path, or
    /// each `PATH` directory joined with its name (the rule of `execvp`).
    programs: Vec<CString>,
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: Option<CString>,
    /// An open `cgroup.procs` of the cgroup the child moves itself into; -1 for none.
    cgroup_procs: c_int,
}

impl Exec {
    /// Has the child move itself into the cgroup whose `cgroup.procs` is open as `fd`
    /// (close-on-exec; it must stay open until [`spawn`] returns) before anything else it
    /// does, so that every process it starts is in that cgroup too.
    pub(crate) fn in_cgroup(mut self, fd: c_int) -> Exec {
        self.cgroup_procs = fd;
        self
    }

    /// Prepares `argv` (not empty) with exactly the environment `env` and, if given, the
    /// working directory `cwd`. A bare program name is looked up in `env`'s `PATH` (or
    /// `default_path` when it has none), as `execvp` does with the child's environment.
    pub(crate) fn new(
        argv: &[String],
        env: &[(OsString, OsString)],
        cwd: Option<&Path>,
        default_path: &str,
    ) -> io::Result<Exec> {
        let nul = |_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the command");
        let program = argv
            .first()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "an empty command"))?;
        let programs = if program.contains('/') {
            vec![CString::new(program.as_bytes()).map_err(nul)?]
        } else {
            let path = env
                .iter()
                .find(|(k, _)| k == "PATH")
                .map_or(OsStr::new(default_path), |(_, v)| v.as_os_str());
            path.as_bytes()
                .split(|b| *b == b':')
                .map(|dir| {
                    // An empty entry is the current directory, as for `execvp`.
                    let dir = if dir.is_empty() { b"." } else { dir };
                    let mut full = Vec::with_capacity(dir.len() + 1 + program.len());
                    full.extend_from_slice(dir);
                    full.push(b'/');
                    full.extend_from_slice(program.as_bytes());
                    CString::new(full).map_err(nul)
                })
                .collect::<io::Result<_>>()?
        };
        let argv = argv
            .iter()
            .map(|a| CString::new(a.as_bytes()).map_err(nul))
            .collect::<io::Result<_>>()?;
        let envp = env
            .iter()
            .map(|(k, v)| {
                let mut entry = Vec::with_capacity(k.len() + 1 + v.len());
                entry.extend_from_slice(k.as_bytes());
                entry.push(b'=');
                entry.extend_from_slice(v.as_bytes());
                CString::new(entry).map_err(nul)
            })
            .collect::<io::Result<_>>()?;
        let cwd = cwd
            .map(|c| CString::new(c.as_os_str().as_bytes()).map_err(nul))
            .transpose()?;
        Ok(Exec {
            programs,
            argv,
            envp,
            cwd,
            cgroup_procs: -1,
        })
    }
}

/// A child just started: its pid, its pidfd (where the kernel has `CLONE_PIDFD`), and the
/// runtime's ends of its stdin, stdout and stderr pipes (close-on-exec, blocking).
pub(crate) struct RawChild {
    pub(crate) pid: i32,
    pub(crate) pidfd: Option<OwnedFd>,
    pub(crate) stdin: OwnedFd,
    pub(crate) stdout: OwnedFd,
    pub(crate) stderr: OwnedFd,
}

/// What the child reads between `clone` and `execve`. It lives on the caller's stack, which
/// the child can see (shared memory) and which stays put while the caller sleeps.
struct ChildArgs {
    programs: *const *const c_char,
    programs_len: usize,
    argv: *const *const c_char,
    /// `argv` behind `/bin/sh` and an empty slot for the program (see [`SH`]).
    script_argv: *mut *const c_char,
    envp: *const *const c_char,
    /// Null for "stay where the runtime is".
    cwd: *const c_char,
    /// The child's ends of the pipes, all above 2, close-on-exec: dup'ed onto 0, 1 and 2.
    stdio: [c_int; 3],
    /// The runtime's pid, read before the clone.
    parent: libc::pid_t,
    /// See [`Exec::in_cgroup`]; -1 for none.
    cgroup_procs: c_int,
    /// Written by the child when it fails before or at `execve`: the errno.
    error: AtomicI32,
}

/// The shell a program without `#!` is run with, as `execvp` does on `ENOEXEC`.
const SH: &CStr = c"/bin/sh";

/// Starts `exec` in a new process: its own process group, `PR_SET_PDEATHSIG = SIGKILL`
/// (tied to the calling thread, which must live as long as the runtime), stdin, stdout and
/// stderr pipes, every other descriptor close-on-exec, signal dispositions and mask as a
/// fresh process expects (SIGPIPE at its default, nothing blocked). `parent` is the
/// runtime's pid: a child whose parent is already another process exits at once.
///
/// `stack` is the child's stack until its `execve`; the calling thread sleeps meanwhile, so
/// one buffer per thread serves every spawn. An error of the child before or at its `execve`
/// (no such program, a bad working directory) is returned here, the child reaped.
pub(crate) fn spawn(exec: &Exec, parent: i32, stack: &mut [u8]) -> io::Result<RawChild> {
    let (stdin_r, stdin_w) = pipe()?;
    let (stdout_r, stdout_w) = pipe()?;
    let (stderr_r, stderr_w) = pipe()?;
    let pointers = |strings: &[CString]| -> Vec<*const c_char> {
        strings
            .iter()
            .map(|s| s.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect()
    };
    let programs = pointers(&exec.programs);
    let argv = pointers(&exec.argv);
    let envp = pointers(&exec.envp);
    // `/bin/sh <program> <args…>` for a program without `#!`, as `execvp` runs it; the
    // child writes the program's path into slot 1.
    let mut script_argv: Vec<*const c_char> = [SH.as_ptr(), std::ptr::null()]
        .into_iter()
        .chain(argv.iter().skip(1).copied())
        .collect();
    let args = ChildArgs {
        programs: programs.as_ptr(),
        programs_len: exec.programs.len(),
        argv: argv.as_ptr(),
        script_argv: script_argv.as_mut_ptr(),
        envp: envp.as_ptr(),
        cwd: exec.cwd.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
        stdio: [
            stdin_r.as_raw_fd(),
            stdout_w.as_raw_fd(),
            stderr_w.as_raw_fd(),
        ],
        parent,
        cgroup_procs: exec.cgroup_procs,
        error: AtomicI32::new(0),
    };
    // The stack grows down from its end, which must be 16-byte aligned.
    let top = stack.as_mut_ptr_range().end as usize & !15;
    let arg = std::ptr::addr_of!(args).cast_mut().cast::<c_void>();
    let mut pidfd: c_int = -1;
    // SAFETY: sigset_t is a plain C struct for which all zero bytes are a valid value; the
    // calls only write into the locals they are given.
    let (mut all, mut before): (libc::sigset_t, libc::sigset_t) =
        unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    // SAFETY: as above.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut before);
    }
    let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD;
    // SAFETY: `child` runs on `stack` (not used by anything else while this thread sleeps,
    // which CLONE_VFORK makes it do until the child's execve or exit) and only reads `args`,
    // which outlives the call; it writes only `args.error`, an atomic. With CLONE_PIDFD the
    // kernel writes the pidfd into `pidfd`, which outlives the call too.
    let mut pid = unsafe {
        libc::clone(
            child,
            top as *mut c_void,
            flags | libc::CLONE_PIDFD,
            arg,
            std::ptr::addr_of_mut!(pidfd),
        )
    };
    let mut clone_error = (pid < 0).then(io::Error::last_os_error);
    if clone_error
        .as_ref()
        .is_some_and(|e| e.raw_os_error() == Some(libc::EINVAL))
    {
        // A kernel before 5.2 has no CLONE_PIDFD: the caller opens one or waits without.
        pidfd = -1;
        // SAFETY: as above, without the pidfd.
        pid = unsafe { libc::clone(child, top as *mut c_void, flags, arg) };
        clone_error = (pid < 0).then(io::Error::last_os_error);
    }
    // SAFETY: restores this thread's own mask, saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &before, std::ptr::null_mut());
    }
    drop((stdin_r, stdout_w, stderr_w));
    if let Some(e) = clone_error {
        return Err(e);
    }
    // SAFETY: with CLONE_PIDFD set and the call successful, the kernel gave us this new fd.
    let pidfd = (pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd) });
    let error = args.error.load(Ordering::Acquire);
    if error != 0 {
        // The child has exited (that is what ended our sleep): reap it.
        let _ = reap(pid, false);
        return Err(io::Error::from_raw_os_error(error));
    }
    Ok(RawChild {
        pid,
        pidfd,
        stdin: stdin_w,
        stdout: stdout_r,
        stderr: stderr_r,
    })
}

/// The child, from `clone` to `execve`. Async-signal-safe calls only, no allocation, no
/// lock, no panic: it runs in the runtime's memory, on the stack it was given.
extern "C" fn child(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `ChildArgs` that `spawn` keeps alive until we exec or exit.
    let args = unsafe { &*arg.cast::<ChildArgs>() };
    // SAFETY: the preconditions of `run_child` are what `spawn` set up.
    unsafe { run_child(args) }
}

/// The steps of [`child`]; only returns by `execve` or `_exit`.
///
/// # Safety
///
/// Called only in a child made by `clone(CLONE_VM | CLONE_VFORK)` from [`spawn`], with every
/// signal blocked and `args` and the pointers in it valid.
unsafe fn run_child(args: &ChildArgs) -> ! {
    let fail = |error: c_int| -> ! {
        args.error.store(error.max(1), Ordering::Release);
        // SAFETY: _exit is async-signal-safe and ends only this child.
        unsafe { libc::_exit(127) }
    };
    // SAFETY (the block): each call is async-signal-safe and reads or writes only locals
    // or the strings `args` points to.
    unsafe {
        // Handlers the runtime installed must not run here (this is its memory): reset them
        // before anything is unblocked. Ignored signals stay ignored across exec, as for any
        // child, except SIGPIPE, which the Rust runtime ignores for itself only.
        for signal in 1..=64 {
            if signal == libc::SIGKILL || signal == libc::SIGSTOP {
                continue;
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, std::ptr::null(), &mut action) != 0 {
                continue;
            }
            let handled =
                action.sa_sigaction != libc::SIG_DFL && action.sa_sigaction != libc::SIG_IGN;
            if handled || signal == libc::SIGPIPE {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(signal, &default, std::ptr::null_mut());
            }
        }
        // Into the worker's cgroup first: whatever the child starts from here on is in it.
        if args.cgroup_procs >= 0
            && libc::write(args.cgroup_procs, c"0".as_ptr().cast::<c_void>(), 1) != 1
        {
            fail(errno());
        }
        if libc::setpgid(0, 0) != 0 {
            fail(errno());
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            fail(errno());
        }
        // The runtime may have died before the prctl: then no signal will come.
        if libc::getppid() != args.parent {
            libc::_exit(1);
        }
        for (target, fd) in (0..).zip(args.stdio) {
            // Every `fd` is above 2, so none is overwritten before it is used; dup2 clears
            // close-on-exec on the copy.
            if libc::dup2(fd, target) < 0 {
                fail(errno());
            }
        }
        super::cloexec_inherited_fds();
        if !args.cwd.is_null() && libc::chdir(args.cwd) != 0 {
            fail(errno());
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        // The rule of execvp: go on past directories without the program, remember that
        // one held it without permission, run a file without `#!` with the shell.
        let (mut denied, mut last) = (false, libc::ENOENT);
        for i in 0..args.programs_len {
            let program = *args.programs.add(i);
            libc::execve(program, args.argv, args.envp);
            match errno() {
                libc::EACCES => denied = true,
                libc::ENOEXEC => {
                    // Not a binary and no `#!`: a shell script, for `execvp`.
                    *args.script_argv.add(1) = program;
                    libc::execve(SH.as_ptr(), args.script_argv.cast_const(), args.envp);
                    last = errno();
                    break;
                }
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                other => {
                    last = other;
                    break;
                }
            }
        }
        fail(if denied && last == libc::ENOENT {
            libc::EACCES
        } else {
            last
        })
    }
}

/// This thread's errno. Async-signal-safe.
fn errno() -> c_int {
    // SAFETY: __errno_location returns the calling thread's errno slot, always valid.
    unsafe { *libc::__errno_location() }
}

/// A pipe, both ends close-on-exec and above 2 (so that the child's `dup2`s onto 0, 1 and 2
/// never overwrite one another, even when the runtime runs with a standard descriptor
/// closed).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds: [c_int; 2] = [-1, -1];
    // SAFETY: pipe2 writes two fds into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned these fds to us and nothing else owns them.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((above_stdio(read)?, above_stdio(write)?))
}

fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: fcntl duplicates a valid fd into a new one we then own.
    let copy = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if copy < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

/// Puts `fd` in non-blocking mode (for the runtime's ends of the pipes, which tokio reads).
pub(crate) fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let on: c_int = 1;
    // SAFETY: FIONBIO reads one int from the pointer it is given.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONBIO, &on) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reaps the child `pid`: its status, or with `nohang` `None` while it still runs.
pub(crate) fn reap(pid: i32, nohang: bool) -> io::Result<Option<ExitStatus>> {
    let flags = if nohang { libc::WNOHANG } else { 0 };
    loop {
        let mut status: c_int = 0;
        // SAFETY: waitpid writes only into `status`.
        let rc = unsafe { libc::waitpid(pid, &mut status, flags) };
        if rc == pid {
            return Ok(Some(ExitStatus::from_raw(status)));
        }
        if rc == 0 {
            return Ok(None);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
