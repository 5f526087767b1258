//! The one error type that crosses crate boundaries.

use std::fmt;
use std::time::Duration;

/// Every failure a client of the registry can see.
///
/// Each variant maps one-to-one onto an error code of the API (see [`RegistryError::code`]).
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
    /// The request body is not parsable JSON (`invalid_json`).
    #[error("{0}")]
    InvalidJson(String),
    /// No or an unknown credential (`unauthorized`).
    #[error("{0}")]
    Unauthorized(String),
    /// The credential or policy does not allow this (`forbidden`).
    #[error("{0}")]
    Forbidden(String),
    /// The request's `Origin` is not allowed (`origin_not_allowed`).
    #[error("{0}")]
    OriginNotAllowed(String),
    /// No runtime of that id (`runtime_not_found`).
    #[error("{0}")]
    RuntimeNotFound(String),
    /// No worker of that id (`worker_not_found`).
    #[error("{0}")]
    WorkerNotFound(String),
    /// No such route (`route_not_found`).
    #[error("{0}")]
    RouteNotFound(String),
    /// The route exists but not with that method (`method_not_allowed`).
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The request conflicts with the current state (`conflict`).
    #[error("{0}")]
    Conflict(String),
    /// The request body is over the size limit (`payload_too_large`).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The request body has a missing or wrong content type (`unsupported_media_type`).
    #[error("{0}")]
    UnsupportedMediaType(String),
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

/// Every error code of the API, in the order of the contract's table.
pub const ERROR_CODES: &[&str] = &[
    "invalid_request",
    "invalid_json",
    "unauthorized",
    "forbidden",
    "origin_not_allowed",
    "runtime_not_found",
    "worker_not_found",
    "route_not_found",
    "method_not_allowed",
    "conflict",
    "payload_too_large",
    "unsupported_media_type",
    "capacity_exceeded",
    "internal",
    "unsupported",
    "runtime_unavailable",
    "upstream_timeout",
];

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
            RegistryError::InvalidJson(_) => "invalid_json",
            RegistryError::Unauthorized(_) => "unauthorized",
            RegistryError::Forbidden(_) => "forbidden",
            RegistryError::OriginNotAllowed(_) => "origin_not_allowed",
            RegistryError::RuntimeNotFound(_) => "runtime_not_found",
            RegistryError::WorkerNotFound(_) => "worker_not_found",
            RegistryError::RouteNotFound(_) => "route_not_found",
            RegistryError::MethodNotAllowed(_) => "method_not_allowed",
            RegistryError::Conflict(_) => "conflict",
            RegistryError::PayloadTooLarge(_) => "payload_too_large",
            RegistryError::UnsupportedMediaType(_) => "unsupported_media_type",
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
            RegistryError::InvalidJson(_) => RegistryError::InvalidJson(message),
            RegistryError::Unauthorized(_) => RegistryError::Unauthorized(message),
            RegistryError::Forbidden(_) => RegistryError::Forbidden(message),
            RegistryError::OriginNotAllowed(_) => RegistryError::OriginNotAllowed(message),
            RegistryError::RuntimeNotFound(_) => RegistryError::RuntimeNotFound(message),
            RegistryError::WorkerNotFound(_) => RegistryError::WorkerNotFound(message),
            RegistryError::RouteNotFound(_) => RegistryError::RouteNotFound(message),
            RegistryError::MethodNotAllowed(_) => RegistryError::MethodNotAllowed(message),
            RegistryError::Conflict(_) => RegistryError::Conflict(message),
            RegistryError::PayloadTooLarge(_) => RegistryError::PayloadTooLarge(message),
            RegistryError::UnsupportedMediaType(_) => RegistryError::UnsupportedMediaType(message),
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
            RegistryError::InvalidJson(m()),
            RegistryError::Unauthorized(m()),
            RegistryError::Forbidden(m()),
            RegistryError::OriginNotAllowed(m()),
            RegistryError::RuntimeNotFound(m()),
            RegistryError::WorkerNotFound(m()),
            RegistryError::RouteNotFound(m()),
            RegistryError::MethodNotAllowed(m()),
            RegistryError::Conflict(m()),
            RegistryError::PayloadTooLarge(m()),
            RegistryError::UnsupportedMediaType(m()),
            RegistryError::CapacityExceeded(m()),
            RegistryError::internal("x"),
            RegistryError::Unsupported(m()),
            RegistryError::unavailable("m", None),
            RegistryError::UpstreamTimeout(m()),
        ]
    }

    #[test]
    fn variants_map_one_to_one_onto_spec_codes() {
        let codes: Vec<&str> = every_variant().iter().map(|e| e.code()).collect();
        assert_eq!(codes, ERROR_CODES);
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
