//! The source's own failures, and their one conversion into the registry's error.

use std::fmt;
use std::time::Duration;

use registry_core::RegistryError;

/// What went wrong talking to slurmrestd. The text may name the address, a job or a node:
/// it is for the log only. A client sees the registry error it becomes, or the runtime's
/// health message, which name none of them.
#[derive(Debug)]
pub(crate) enum SlurmError {
    /// slurmrestd could not be reached (nothing listens, connection cut).
    Unreachable { what: &'static str, detail: String },
    /// slurmrestd did not answer within `request_timeout`.
    Timeout { what: &'static str },
    /// slurmrestd refused the token or the user (401, 403).
    Unauthorized { what: &'static str, status: u16 },
    /// slurmrestd does not serve the configured API version (404 on a versioned path).
    VersionNotServed {
        what: &'static str,
        served: Vec<String>,
    },
    /// slurmrestd answered with Slurm's errors: a 5xx on a read means the controller
    /// (slurmctld) does not answer it.
    Slurm {
        what: &'static str,
        status: u16,
        errors: Vec<String>,
    },
    /// An answer that does not read (not JSON, too large, …).
    Bad { what: &'static str, detail: String },
}

/// Fixed texts for people: they name keys and daemons, never an address.
pub(crate) const UNREACHABLE: &str =
    "slurmrestd does not answer at the runtime's `url` (is it running?)";
pub(crate) const TIMED_OUT: &str =
    "slurmrestd did not answer within `request_timeout` (is slurmctld overloaded?)";
pub(crate) const UNAUTHORIZED: &str = "slurmrestd refused the token (401/403): check the \
     runtime's `user` and its token (`token_env` or `token_file`; `scontrol token` makes one)";
pub(crate) const CONTROLLER_DOWN: &str =
    "slurmrestd answers but the Slurm controller (slurmctld) does not";

impl SlurmError {
    /// What the runtime's health says while this failure lasts.
    pub(crate) fn health_message(&self, api_version: &str) -> String {
        match self {
            SlurmError::Unreachable { .. } => UNREACHABLE.into(),
            SlurmError::Timeout { .. } => TIMED_OUT.into(),
            SlurmError::Unauthorized { .. } => UNAUTHORIZED.into(),
            SlurmError::VersionNotServed { served, .. } => {
                let served = if served.is_empty() {
                    "none that this roster could read".to_string()
                } else {
                    served.join(", ")
                };
                format!(
                    "the cluster's slurmrestd does not serve the configured `api_version` \
                     {api_version}; it serves: {served}"
                )
            }
            SlurmError::Slurm { status, .. } if *status >= 500 => CONTROLLER_DOWN.into(),
            SlurmError::Slurm { .. } | SlurmError::Bad { .. } => {
                "slurmrestd gave an answer this roster cannot use (see the log)".into()
            }
        }
    }

    /// Whether the failure is the cluster being out of reach (rather than a refusal).
    pub(crate) fn is_outage(&self) -> bool {
        match self {
            SlurmError::Unreachable { .. } | SlurmError::Timeout { .. } => true,
            SlurmError::Slurm { status, .. } => *status >= 500,
            _ => false,
        }
    }

    /// Slurm's own error texts of the answer (fixed strings of Slurm's, e.g. "Invalid
    /// partition name specified"), when they say why a request was refused rather than
    /// that the controller is out of reach.
    pub(crate) fn refusal(&self) -> Option<String> {
        let SlurmError::Slurm { errors, .. } = self else {
            return None;
        };
        let outage = errors.is_empty()
            || errors.iter().any(|e| {
                let e = e.to_ascii_lowercase();
                e.contains("unspecified error")
                    || e.contains("contact slurm controller")
                    || e.contains("connect failure")
                    || e.contains("timed out")
            });
        (!outage).then(|| errors.join("; "))
    }
}

impl fmt::Display for SlurmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlurmError::Unreachable { what, detail } => {
                write!(f, "slurmrestd {what}: cannot reach it: {detail}")
            }
            SlurmError::Timeout { what } => write!(f, "slurmrestd {what}: no answer in time"),
            SlurmError::Unauthorized { what, status } => {
                write!(f, "slurmrestd {what}: {status}: the token was refused")
            }
            SlurmError::VersionNotServed { what, served } => write!(
                f,
                "slurmrestd {what}: the API version is not served (served: {})",
                served.join(", ")
            ),
            SlurmError::Slurm {
                what,
                status,
                errors,
            } => write!(f, "slurmrestd {what}: {status}: {}", errors.join("; ")),
            SlurmError::Bad { what, detail } => write!(f, "slurmrestd {what}: {detail}"),
        }
    }
}

impl From<SlurmError> for RegistryError {
    fn from(error: SlurmError) -> Self {
        match &error {
            SlurmError::Unreachable { .. } => {
                tracing::debug!(error = %error, "slurmrestd out of reach");
                RegistryError::unavailable(UNREACHABLE, Some(Duration::from_secs(1)))
            }
            SlurmError::Timeout { .. } => RegistryError::UpstreamTimeout(TIMED_OUT.into()),
            SlurmError::Slurm { status, .. } if *status >= 500 => {
                tracing::debug!(error = %error, "slurmctld out of reach");
                RegistryError::unavailable(CONTROLLER_DOWN, Some(Duration::from_secs(1)))
            }
            SlurmError::Unauthorized { .. } | SlurmError::VersionNotServed { .. } => {
                tracing::warn!(error = %error, "slurmrestd refused a request");
                RegistryError::unavailable(error.health_message(""), Some(Duration::from_secs(5)))
            }
            _ => {
                tracing::warn!(error = %error, "slurmrestd error");
                RegistryError::internal(error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_internal_and_its_detail_stays_in_the_log() {
        let e: RegistryError = SlurmError::Bad {
            what: "jobs",
            detail: "job 4711 on node gpu-17: bad field".into(),
        }
        .into();
        assert_eq!(e.code(), "internal");
        assert!(!e.to_string().contains("4711"));
        assert!(!format!("{e:?}").contains("gpu-17"));
        assert!(e.internal_detail().unwrap().contains("4711"));
    }

    #[test]
    fn an_unreachable_cluster_is_unavailable_without_the_address() {
        let e: RegistryError = SlurmError::Unreachable {
            what: "jobs",
            detail: "tcp connect error: 10.1.2.3:6820 refused".into(),
        }
        .into();
        assert_eq!(e.code(), "runtime_unavailable");
        assert!(!e.to_string().contains("10.1.2.3"));
        assert!(!format!("{e:?}").contains("10.1.2.3"));
    }

    #[test]
    fn a_version_not_served_names_what_is() {
        let e = SlurmError::VersionNotServed {
            what: "ping",
            served: vec!["v0.0.36".into(), "v0.0.37".into()],
        };
        let m = e.health_message("v0.0.38");
        assert!(
            m.contains("v0.0.38") && m.contains("v0.0.36, v0.0.37"),
            "{m}"
        );
    }
}
