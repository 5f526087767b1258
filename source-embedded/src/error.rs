//! The one conversion from the runtime's errors into the registry's.

use registry_core::RegistryError;
use worker_runtime::RuntimeError;

/// Maps a [`RuntimeError`] onto the [`RegistryError`] of the same meaning. The runtime's
/// messages carry no path or pid, so they pass through; an internal error keeps its text as
/// the detail for the log only.
pub(crate) fn registry_error(error: RuntimeError) -> RegistryError {
    match error {
        RuntimeError::NotFound => RegistryError::WorkerNotFound("worker not found".into()),
        RuntimeError::Conflict(m) => RegistryError::Conflict(m),
        RuntimeError::CapacityExceeded(m) => RegistryError::CapacityExceeded(m),
        RuntimeError::InvalidRequest(m) => RegistryError::InvalidRequest(m),
        RuntimeError::Forbidden(m) => RegistryError::Forbidden(m),
        RuntimeError::Internal(m) => RegistryError::internal(m),
        RuntimeError::Unavailable {
            message,
            retry_after,
        } => RegistryError::unavailable(message, Some(retry_after)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_runtime_error_maps_onto_the_registry_code_of_the_same_meaning() {
        let m = || "m".to_string();
        let cases = [
            (RuntimeError::NotFound, "worker_not_found"),
            (RuntimeError::Conflict(m()), "conflict"),
            (RuntimeError::CapacityExceeded(m()), "capacity_exceeded"),
            (RuntimeError::InvalidRequest(m()), "invalid_request"),
            (RuntimeError::Forbidden(m()), "forbidden"),
            (RuntimeError::Internal(m()), "internal"),
            (
                RuntimeError::Unavailable {
                    message: m(),
                    retry_after: std::time::Duration::from_secs(1),
                },
                "runtime_unavailable",
            ),
        ];
        for (error, code) in cases {
            assert_eq!(registry_error(error.clone()).code(), code, "for {error:?}");
        }
    }

    #[test]
    fn messages_pass_through_and_internal_detail_stays_in_the_log() {
        let e = registry_error(RuntimeError::Conflict("the worker has ended".into()));
        assert_eq!(e.to_string(), "the worker has ended");
        let e = registry_error(RuntimeError::Internal("spawner thread died".into()));
        assert_eq!(e.to_string(), "internal error");
        assert_eq!(e.internal_detail(), Some("spawner thread died"));
    }
}
