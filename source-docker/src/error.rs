//! The source's own failures, and their one conversion into the registry's error.

use std::fmt;

use registry_core::RegistryError;

/// What went wrong talking to the engine. The text may name a container, an image or the
/// socket: it is for the log only. A client sees the registry error it becomes, whose
/// message names none of them.
#[derive(Debug)]
pub(crate) enum DockerError {
    /// The engine answered with an error status.
    Engine {
        what: &'static str,
        status: u16,
        message: String,
    },
    /// The engine could not be reached (socket missing, connection refused or cut).
    Unreachable { what: &'static str, detail: String },
    /// The engine did not answer in time.
    Timeout { what: &'static str },
    /// Anything else bollard reports (an answer that does not parse, …).
    Other { what: &'static str, detail: String },
}

impl DockerError {
    /// Wraps a bollard error, naming the operation.
    pub(crate) fn from_bollard(what: &'static str, error: bollard::errors::Error) -> Self {
        use bollard::errors::Error as E;
        match error {
            E::DockerResponseServerError {
                status_code,
                message,
            } => DockerError::Engine {
                what,
                status: status_code,
                message,
            },
            E::RequestTimeoutError => DockerError::Timeout { what },
            E::IOError { err } => DockerError::Unreachable {
                what,
                detail: err.to_string(),
            },
            E::HyperResponseError { err } => DockerError::Unreachable {
                what,
                detail: err.to_string(),
            },
            E::HyperLegacyError { err } => DockerError::Unreachable {
                what,
                detail: err.to_string(),
            },
            E::SocketNotFoundError(path) => DockerError::Unreachable {
                what,
                detail: format!("no socket at {path}"),
            },
            other => DockerError::Other {
                what,
                detail: other.to_string(),
            },
        }
    }

    /// The engine's status, when it answered with an error.
    pub(crate) fn status(&self) -> Option<u16> {
        match self {
            DockerError::Engine { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The engine says the object (container, image) does not exist.
    pub(crate) fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// The engine could not be reached at all.
    pub(crate) fn is_unreachable(&self) -> bool {
        matches!(
            self,
            DockerError::Unreachable { .. } | DockerError::Timeout { .. }
        )
    }
}

impl fmt::Display for DockerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DockerError::Engine {
                what,
                status,
                message,
            } => write!(f, "engine {what}: {status} {}", message.trim()),
            DockerError::Unreachable { what, detail } => {
                write!(f, "engine {what}: cannot reach the engine: {detail}")
            }
            DockerError::Timeout { what } => write!(f, "engine {what}: no answer in time"),
            DockerError::Other { what, detail } => write!(f, "engine {what}: {detail}"),
        }
    }
}

impl From<DockerError> for RegistryError {
    fn from(error: DockerError) -> Self {
        match &error {
            DockerError::Unreachable { .. } => RegistryError::unavailable(
                "the container engine does not answer",
                Some(std::time::Duration::from_secs(1)),
            ),
            DockerError::Timeout { .. } => {
                RegistryError::UpstreamTimeout("the container engine did not answer in time".into())
            }
            _ => {
                tracing::warn!(error = %error, "container engine error");
                RegistryError::internal(error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_failure_is_internal_and_its_detail_stays_in_the_log() {
        let e: RegistryError = DockerError::Engine {
            what: "start",
            status: 500,
            message: "container 0123abcd4567: exec /nope: no such file".into(),
        }
        .into();
        assert_eq!(e.code(), "internal");
        assert!(!e.to_string().contains("0123abcd"));
        assert!(!format!("{e:?}").contains("0123abcd"));
        assert!(e.internal_detail().unwrap().contains("0123abcd"));
    }

    #[test]
    fn an_unreachable_engine_is_unavailable_without_the_socket() {
        let e: RegistryError = DockerError::Unreachable {
            what: "list",
            detail: "no socket at /srv/private.sock".into(),
        }
        .into();
        assert_eq!(e.code(), "runtime_unavailable");
        assert!(!e.to_string().contains("/srv"));
        assert!(!format!("{e:?}").contains("/srv"));
    }
}
