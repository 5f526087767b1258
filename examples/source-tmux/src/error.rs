//! The source's own failures, and their one conversion into the registry's error.

use std::fmt;
use std::io;
use std::process::ExitStatus;

use registry_core::RegistryError;

/// What went wrong talking to tmux or the file system. The text may name the socket, a
/// session or a path: it is for the log only, and becomes an `internal` error whose detail
/// no client sees.
#[derive(Debug)]
pub(crate) enum TmuxError {
    /// The tmux program could not be run.
    Run {
        what: &'static str,
        error: io::Error,
    },
    /// A tmux command ended with a failure.
    Failed {
        what: &'static str,
        status: ExitStatus,
        stderr: String,
    },
    /// A tmux command did not answer in time.
    Timeout { what: &'static str },
    /// The tmux server is not running (no session is left on it).
    NoServer,
    /// A file operation failed.
    Io {
        what: &'static str,
        error: io::Error,
    },
    /// A step of setting a session up did not happen.
    Setup(&'static str),
    /// The answer of a tmux command made no sense.
    Garbled { what: &'static str, answer: String },
}

impl fmt::Display for TmuxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TmuxError::Run { what, error } => write!(f, "tmux {what}: cannot run tmux: {error}"),
            TmuxError::Failed {
                what,
                status,
                stderr,
            } => write!(f, "tmux {what} failed ({status}): {}", stderr.trim()),
            TmuxError::Timeout { what } => write!(f, "tmux {what} did not answer in time"),
            TmuxError::NoServer => f.write_str("the tmux server is not running"),
            TmuxError::Io { what, error } => write!(f, "{what}: {error}"),
            TmuxError::Setup(what) => write!(f, "setting the session up: {what}"),
            TmuxError::Garbled { what, answer } => {
                write!(f, "tmux {what} answered {answer:?}")
            }
        }
    }
}

impl From<TmuxError> for RegistryError {
    fn from(error: TmuxError) -> Self {
        RegistryError::internal(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tmux_failure_is_internal_and_its_detail_stays_in_the_log() {
        let e: RegistryError = TmuxError::Io {
            what: "mkfifo /var/lib/roster/runtimes/t/x.out",
            error: io::Error::from(io::ErrorKind::PermissionDenied),
        }
        .into();
        assert_eq!(e.code(), "internal");
        assert_eq!(e.to_string(), "internal error");
        assert!(!format!("{e:?}").contains("/var/lib"));
        assert!(e.internal_detail().unwrap().contains("/var/lib"));
    }
}
