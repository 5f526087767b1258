//! The one error type that crosses crate boundaries.

use std::fmt;
use std::time::Duration;

/// Every failure the registry or a source can report.
///
/// Each variant maps one-to-one onto an error code of the API (see [`RegistryError::code`]).
/// The codes only HTTP can cause (a body that is not JSON, a missing token, a foreign
/// `Origin`, an unknown route or method, a wrong content type) are the server's own and
/// live beside it, not here.
/// Messages are written for a person and must never carry internal authority: no pid, path,
/// socket, URL, token or remote id. [`RegistryError::Internal`] keeps its detail for the log
/// only; its `Display` and `Debug` say nothing of it.
///
/// Sources map their own errors into this type in one `From` impl; the registry adds the
/// context (which runtime, which worker) in one place.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The request is well-formed JSON but asks for something invalid (`invalid_request`).
    #[error("{0}")]
    InvalidRequest(String),
    /// The credential or policy does not allow this (`forbidden`).
    #[error("{0}")]
    Forbidden(String),
    /// No runtime of that id (`runtime_not_found`).
    #[error("{0}")]
    RuntimeNotFound(String),
    /// No worker of that id (`worker_not_found`).
    #[error("{0}")]
    WorkerNotFound(String),
    /// The request conflicts with the current state (`conflict`).
    #[error("{0}")]
    Conflict(String),
    /// The request body is over the size limit (`payload_too_large`).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// A limit (workers, queued input…) is reached; try later (`capacity_exceeded`).
    #[error("{0}")]
    CapacityExceeded(String),
    /// Something broke inside; the detail is for the log only (`internal`).
    #[error("internal error")]
    Internal {
        /// What went wrong, for the log. Never shown to a client.
        detail: String,
    },
    /// The runtime lacks that capability (`unsupported`).
    #[error("{0}")]
    Unsupported(String),
    /// The runtime does not answer now (`runtime_unavailable`).
    #[error("{message}")]
    RuntimeUnavailable {
        /// A sanitized explanation.
        message: String,
        /// When a retry may succeed, if known.
        retry_after: Option<Duration>,
    },
    /// The runtime did not answer in time (`upstream_timeout`).
    #[error("{0}")]
    UpstreamTimeout(String),
}

impl RegistryError {
    /// An internal error with a detail for the log.
    pub fn internal(detail: impl fmt::Display) -> Self {
        RegistryError::Internal {
            detail: detail.to_string(),
        }
    }

    /// A `runtime_unavailable` error.
    pub fn unavailable(message: impl Into<String>, retry_after: Option<Duration>) -> Self {
        RegistryError::RuntimeUnavailable {
            message: message.into(),
            retry_after,
        }
    }

    /// The API error code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            RegistryError::InvalidRequest(_) => "invalid_request",
            RegistryError::Forbidden(_) => "forbidden",
            RegistryError::RuntimeNotFound(_) => "runtime_not_found",
            RegistryError::WorkerNotFound(_) => "worker_not_found",
            RegistryError::Conflict(_) => "conflict",
            RegistryError::PayloadTooLarge(_) => "payload_too_large",
            RegistryError::CapacityExceeded(_) => "capacity_exceeded",
            RegistryError::Internal { .. } => "internal",
            RegistryError::Unsupported(_) => "unsupported",
            RegistryError::RuntimeUnavailable { .. } => "runtime_unavailable",
            RegistryError::UpstreamTimeout(_) => "upstream_timeout",
        }
    }

    /// Whether the same request may succeed later without change.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            RegistryError::CapacityExceeded(_)
                | RegistryError::RuntimeUnavailable { .. }
                | RegistryError::UpstreamTimeout(_)
        )
    }

    /// The message a client may see (for `Internal`, a generic one).
    pub fn public_message(&self) -> String {
        self.to_string()
    }

    /// The detail of an internal error, for the log.
    pub fn internal_detail(&self) -> Option<&str> {
        match self {
            RegistryError::Internal { detail } => Some(detail),
            _ => None,
        }
    }

    /// The same error with its client-facing message replaced (the variant is kept).
    ///
    /// Used by the registry to put context in one place. `Internal` keeps its detail.
    pub fn with_message(self, message: impl Into<String>) -> Self {
        let message = message.into();
        match self {
            RegistryError::InvalidRequest(_) => RegistryError::InvalidRequest(message),
            RegistryError::Forbidden(_) => RegistryError::Forbidden(message),
            RegistryError::RuntimeNotFound(_) => RegistryError::RuntimeNotFound(message),
            RegistryError::WorkerNotFound(_) => RegistryError::WorkerNotFound(message),
            RegistryError::Conflict(_) => RegistryError::Conflict(message),
            RegistryError::PayloadTooLarge(_) => RegistryError::PayloadTooLarge(message),
            RegistryError::CapacityExceeded(_) => RegistryError::CapacityExceeded(message),
            RegistryError::Internal { detail } => RegistryError::Internal { detail },
            RegistryError::Unsupported(_) => RegistryError::Unsupported(message),
            RegistryError::RuntimeUnavailable { retry_after, .. } => {
                RegistryError::RuntimeUnavailable {
                    message,
                    retry_after,
                }
            }
            RegistryError::UpstreamTimeout(_) => RegistryError::UpstreamTimeout(message),
        }
    }

    /// The client-facing message passed through [`crate::sanitize_message`].
    pub(crate) fn sanitized(self) -> Self {
        match &self {
            RegistryError::Internal { .. } => self,
            other => {
                let clean = crate::sanitize_message(&other.to_string());
                self.with_message(clean)
            }
        }
    }
}

impl fmt::Debug for RegistryError {
    // Redacting: the detail of an internal error may name paths or addresses.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryError::Internal { .. } => f.write_str("RegistryError::Internal(<redacted>)"),
            other => write!(f, "RegistryError({}: {})", other.code(), other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_variant() -> Vec<RegistryError> {
        let m = || "m".to_string();
        vec![
            RegistryError::InvalidRequest(m()),
            RegistryError::Forbidden(m()),
            RegistryError::RuntimeNotFound(m()),
            RegistryError::WorkerNotFound(m()),
            RegistryError::Conflict(m()),
            RegistryError::PayloadTooLarge(m()),
            RegistryError::CapacityExceeded(m()),
            RegistryError::internal("x"),
            RegistryError::Unsupported(m()),
            RegistryError::unavailable("m", None),
            RegistryError::UpstreamTimeout(m()),
        ]
    }

    #[test]
    fn only_capacity_unavailable_and_timeout_are_retryable() {
        let retryable: Vec<&str> = every_variant()
            .iter()
            .filter(|e| e.is_retryable())
            .map(|e| e.code())
            .collect();
        assert_eq!(
            retryable,
            [
                "capacity_exceeded",
                "runtime_unavailable",
                "upstream_timeout"
            ]
        );
    }

    #[test]
    fn internal_detail_is_kept_out_of_display_and_debug() {
        let e = RegistryError::internal("open /var/lib/roster/key: denied");
        assert_eq!(e.to_string(), "internal error");
        assert!(!format!("{e:?}").contains("/var/lib"));
        assert_eq!(
            e.internal_detail(),
            Some("open /var/lib/roster/key: denied")
        );
        let e = e.with_message("nope");
        assert_eq!(
            e.internal_detail(),
            Some("open /var/lib/roster/key: denied")
        );
    }

    #[test]
    fn with_message_keeps_variant_and_retry_after() {
        let e = RegistryError::unavailable("a", Some(Duration::from_secs(3))).with_message("b");
        assert_eq!(
            e,
            RegistryError::RuntimeUnavailable {
                message: "b".into(),
                retry_after: Some(Duration::from_secs(3))
            }
        );
    }
}
