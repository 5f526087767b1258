//! The source's own errors, and the one conversion into the registry's.

use registry_core::RegistryError;

/// What can go wrong in an operation of the local source. Messages name no pid, path or
/// socket.
#[derive(Debug)]
pub(crate) enum LocalError {
    /// No visible worker has that key.
    NotFound,
    /// The worker has ended (input to it).
    Ended,
    /// The worker is live (a remove of it).
    Live,
    /// Its descriptor names no socket.
    NoInput,
    /// Its socket is gone or refuses connections while the process lives.
    InputGone,
    /// The socket did not take the bytes in time.
    InputBusy,
    /// This runtime only observes workers.
    Spawn,
    /// The process can't be signalled by this server (another user's, say).
    NotPermitted,
    /// The source was shut down.
    ShutDown,
    /// Something unexpected; the detail is for the log.
    Internal(String),
}

impl From<LocalError> for RegistryError {
    fn from(e: LocalError) -> RegistryError {
        match e {
            LocalError::NotFound => RegistryError::WorkerNotFound("worker not found".into()),
            LocalError::Ended => RegistryError::Conflict("the worker has ended".into()),
            LocalError::Live => RegistryError::Conflict(
                "the worker is still running; stop it first, or wait until it ends".into(),
            ),
            LocalError::NoInput => RegistryError::Unsupported("this worker takes no input".into()),
            LocalError::InputGone => {
                RegistryError::Conflict("the worker no longer takes input".into())
            }
            LocalError::InputBusy => RegistryError::CapacityExceeded(
                "the worker is not taking input now; try again later".into(),
            ),
            LocalError::Spawn => RegistryError::Unsupported(
                "this runtime cannot start workers: it only observes workers that an older \
                 launcher started on this host"
                    .into(),
            ),
            LocalError::NotPermitted => RegistryError::Forbidden(
                "this server is not allowed to signal that worker's process".into(),
            ),
            LocalError::ShutDown => {
                RegistryError::unavailable("the runtime is shutting down", None)
            }
            LocalError::Internal(detail) => RegistryError::internal(detail),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_maps_onto_the_code_of_the_same_meaning() {
        let cases = [
            (LocalError::NotFound, "worker_not_found"),
            (LocalError::Ended, "conflict"),
            (LocalError::Live, "conflict"),
            (LocalError::NoInput, "unsupported"),
            (LocalError::InputGone, "conflict"),
            (LocalError::InputBusy, "capacity_exceeded"),
            (LocalError::Spawn, "unsupported"),
            (LocalError::NotPermitted, "forbidden"),
            (LocalError::ShutDown, "runtime_unavailable"),
            (LocalError::Internal("/run/x: EIO".into()), "internal"),
        ];
        for (error, code) in cases {
            let e = RegistryError::from(error);
            assert_eq!(e.code(), code);
            assert!(!e.to_string().contains("/run/x"), "{e}");
        }
    }
}
