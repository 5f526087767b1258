//! Tokens: the `[[server.tokens]]` entries (where each secret comes from), their scopes,
//! and reading the secrets when the server starts.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;

use serde::Deserialize;

use crate::auth::Scope;

use super::lines::{ConfigFileError, KeyIndex};
use registry_core::Redacted;

use super::Config;

/// The shortest token secret accepted, in bytes.
const MIN_SECRET_LEN: usize = 16;

/// One `[[server.tokens]]` entry: where a bearer token's secret comes from, never the secret.
///
/// Exactly one of `token_env` and `token_file` is set. `Debug` does not print the file path.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSection {
    /// A name for the token, unique in the file; errors and logs use it.
    pub name: String,
    /// What the token may do.
    pub scope: Scope,
    /// The environment variable that holds the secret.
    #[serde(default)]
    pub token_env: Option<String>,
    /// A file that holds the secret (trailing whitespace is ignored).
    #[serde(default)]
    pub token_file: Redacted<Option<PathBuf>>,
}

impl TokenSection {
    /// The checks on the entries of `[[server.tokens]]` that serde does not make, each
    /// error at the line of its entry: a non-empty unique `name`, exactly one of
    /// `token_env` and `token_file`, a non-empty `token_env`.
    pub(super) fn check_all(
        tokens: &[TokenSection],
        index: &KeyIndex,
    ) -> Result<(), ConfigFileError> {
        let mut first_line_of: HashMap<&str, Option<usize>> = HashMap::new();
        for (i, token) in tokens.iter().enumerate() {
            let line = index.line(&format!("server.tokens[{i}]"));
            if token.name.is_empty() {
                return Err(ConfigFileError::new(
                    line,
                    "a [[server.tokens]] entry has an empty `name`",
                ));
            }
            if let Some(first) = first_line_of.get(token.name.as_str()) {
                let first = first.map_or_else(String::new, |l| format!(" (first on line {l})"));
                return Err(ConfigFileError::new(
                    line,
                    format!("token name {:?} is used twice{first}", token.name),
                ));
            }
            first_line_of.insert(&token.name, line);
            if token.token_env.is_some() == token.token_file.is_some() {
                return Err(ConfigFileError::new(line, one_source_message(&token.name)));
            }
            if token.token_env.as_deref() == Some("") {
                return Err(ConfigFileError::new(
                    line,
                    format!("token {:?}: `token_env` is empty", token.name),
                ));
            }
        }
        Ok(())
    }
}

/// A token with its secret read. Not `Serialize`; `Debug` does not print the secret.
#[derive(Clone, Debug)]
pub struct LoadedToken {
    /// The token's name from the config.
    pub name: String,
    /// What the token may do.
    pub scope: Scope,
    /// The secret a client sends as `Authorization: Bearer <secret>`.
    pub secret: Redacted<String>,
}

impl Config {
    /// Reads each token's secret from its environment variable or its file; trailing
    /// whitespace (a final newline) is dropped.
    ///
    /// Refused, with an error naming the token (and the variable) but never a secret: an
    /// unset or non-UTF-8 variable, an unreadable file, a token with both or neither
    /// source, an empty secret, a secret shorter than 16 bytes, a secret with characters
    /// other than visible ASCII (it travels in an `Authorization` header), two tokens with
    /// the same name, two tokens with the same secret.
    pub fn load_tokens(&self) -> Result<Vec<LoadedToken>, ConfigFileError> {
        let mut loaded: Vec<LoadedToken> = Vec::with_capacity(self.server.tokens.len());
        for token in &self.server.tokens {
            let name = &token.name;
            if loaded.iter().any(|t| &t.name == name) {
                return Err(ConfigFileError::new(
                    None,
                    format!("token name {name:?} is used twice; token names must be unique"),
                ));
            }
            let read = match (&token.token_env, &*token.token_file) {
                (Some(var), None) => match std::env::var(var) {
                    Ok(value) => value,
                    Err(std::env::VarError::NotPresent) => {
                        return Err(ConfigFileError::new(
                            None,
                            format!(
                                "token {name:?}: the environment variable {var} \
                                 (its token_env) is not set"
                            ),
                        ))
                    }
                    Err(std::env::VarError::NotUnicode(_)) => {
                        return Err(ConfigFileError::new(
                            None,
                            format!(
                                "token {name:?}: the environment variable {var} \
                                 (its token_env) is not valid UTF-8"
                            ),
                        ))
                    }
                },
                (None, Some(path)) => fs::read_to_string(path).map_err(|e| {
                    ConfigFileError::new(
                        None,
                        format!("token {name:?}: its token_file cannot be read: {e}"),
                    )
                })?,
                _ => return Err(ConfigFileError::new(None, one_source_message(name))),
            };
            let secret = read.trim_end();
            let from = match &token.token_env {
                Some(var) => format!("the environment variable {var}"),
                None => "its token_file".to_string(),
            };
            if secret.is_empty() {
                return Err(ConfigFileError::new(
                    None,
                    format!("token {name:?}: the secret in {from} is empty"),
                ));
            }
            if secret.len() < MIN_SECRET_LEN {
                return Err(ConfigFileError::new(
                    None,
                    format!(
                        "token {name:?}: the secret in {from} is shorter than \
                         {MIN_SECRET_LEN} bytes; use a long random value"
                    ),
                ));
            }
            if !secret.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ConfigFileError::new(
                    None,
                    format!(
                        "token {name:?}: the secret in {from} holds spaces, control or \
                         non-ASCII characters; it must be visible ASCII to travel in an \
                         Authorization header"
                    ),
                ));
            }
            if let Some(twin) = loaded.iter().find(|t| t.secret == secret) {
                return Err(ConfigFileError::new(
                    None,
                    format!(
                        "tokens {:?} and {name:?} have the same secret; give each its own",
                        twin.name
                    ),
                ));
            }
            loaded.push(LoadedToken {
                name: name.clone(),
                scope: token.scope,
                secret: secret.into(),
            });
        }
        Ok(loaded)
    }
}

/// The message for a token with both or neither of `token_env` and `token_file`.
fn one_source_message(name: &str) -> String {
    format!(
        "token {name:?} needs exactly one of `token_env` (an environment variable) or \
         `token_file` (a file) to hold its secret"
    )
}
