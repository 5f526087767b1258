//! What can go wrong in a client command, the message a person reads, and the exit code.

use std::fmt;
use std::process::ExitCode;

use http::StatusCode;

/// Exit code: the API answered with an error (or a worker name did not resolve).
pub const EXIT_API: u8 = 1;
/// Exit code: the command line was wrong.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the server could not be reached.
pub const EXIT_UNREACHABLE: u8 = 3;

/// A failed command.
#[derive(Debug)]
pub enum ClientError {
    /// The command line asks for something that cannot be done (exit 2).
    Usage(String),
    /// The API's error answer (exit 1).
    Api {
        /// The HTTP status.
        status: StatusCode,
        /// The error code of SPEC §6.
        code: String,
        /// The server's message.
        message: String,
    },
    /// A worker name or prefix matched more than one worker (exit 1): one line per
    /// candidate.
    Ambiguous {
        /// What was given.
        given: String,
        /// A line per matching worker.
        candidates: Vec<String>,
    },
    /// No answer from the server (exit 3).
    Unreachable {
        /// The address tried (the user's own `--server`).
        server: String,
        /// What the connection attempt said.
        detail: String,
    },
    /// Anything else (exit 1).
    Other(String),
}

impl ClientError {
    /// The error in an answer of the API.
    pub fn from_answer(status: StatusCode, body: &[u8]) -> ClientError {
        match source_remote::ErrorAnswer::parse(body) {
            Some(e) => ClientError::Api {
                status,
                code: e.code,
                message: e.message,
            },
            None => ClientError::Other(format!(
                "the server answered {status} without an error body; is it a roster server?"
            )),
        }
    }

    /// An API-style error made here (a name that matched no worker, say).
    pub fn api(code: &str, message: String) -> ClientError {
        ClientError::Api {
            status: StatusCode::NOT_FOUND,
            code: code.to_string(),
            message,
        }
    }

    /// The exit code (they are listed in `roster --help`).
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Usage(_) => EXIT_USAGE,
            ClientError::Unreachable { .. } => EXIT_UNREACHABLE,
            ClientError::Api { .. } | ClientError::Ambiguous { .. } | ClientError::Other(_) => {
                EXIT_API
            }
        }
    }

    /// Prints the error (and a hint where one helps) to stderr and gives the exit code.
    pub fn report(&self) -> ExitCode {
        eprintln!("{self}");
        ExitCode::from(self.exit_code())
    }

    fn hint(&self) -> Option<String> {
        match self {
            ClientError::Api { code, .. } => match code.as_str() {
                "unauthorized" => Some(
                    "give a token with --token-file FILE or the ROSTER_TOKEN environment \
                     variable (a token of the server's [[server.tokens]])"
                        .into(),
                ),
                "forbidden" => Some(
                    "this token may only read; spawn, input, stop and rm need a token of \
                     scope \"operate\""
                        .into(),
                ),
                "conflict" => None,
                "runtime_not_found" => Some("`roster runtimes` lists the runtimes".into()),
                "worker_not_found" => {
                    Some("`roster ls --all` lists the workers, finished ones too".into())
                }
                "runtime_unavailable" => {
                    Some("the runtime is not answering now; try again later".into())
                }
                _ => None,
            },
            ClientError::Ambiguous { .. } => {
                Some("give more of the id, the whole id, or the runtime with -r RUNTIME".into())
            }
            ClientError::Unreachable { .. } => Some(
                "start a server with `roster serve`, or point --server (or ROSTER_URL) at a \
                 running one"
                    .into(),
            ),
            ClientError::Usage(_) | ClientError::Other(_) => None,
        }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Usage(m) => write!(f, "roster: {m}")?,
            ClientError::Api {
                status,
                code,
                message,
            } => write!(f, "roster: {code} ({}): {message}", status.as_u16())?,
            ClientError::Ambiguous { given, candidates } => {
                write!(f, "roster: {given:?} matches {} workers:", candidates.len())?;
                for c in candidates {
                    write!(f, "\n  {c}")?;
                }
            }
            ClientError::Unreachable { server, detail } => {
                write!(f, "roster: cannot reach the server at {server}: {detail}")?
            }
            ClientError::Other(m) => write!(f, "roster: {m}")?,
        }
        if let Some(hint) = self.hint() {
            write!(f, "\nhint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ClientError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_keep_code_and_message_and_add_a_hint() {
        let e = ClientError::from_answer(
            StatusCode::UNAUTHORIZED,
            br#"{"error":{"code":"unauthorized","message":"a bearer token is required","retryable":false}}"#,
        );
        let text = e.to_string();
        assert!(text.starts_with("roster: unauthorized (401): a bearer token is required"));
        assert!(text.contains("--token-file"), "{text}");
        assert_eq!(e.exit_code(), EXIT_API);
        let e = ClientError::from_answer(StatusCode::BAD_GATEWAY, b"<html>");
        assert!(matches!(e, ClientError::Other(_)));
    }
}
