//! Placeholder config (replaced by the full module).
#![allow(missing_docs, dead_code)]
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use registry_core::{RuntimeId, RuntimeSource, SourceConfig, SourceFactories};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7411";

#[derive(Clone, Debug)]
pub struct Config {
    pub server: ServerSection,
    pub runtimes: Vec<RuntimeSection>,
}
#[derive(Clone, Debug)]
pub struct ServerSection {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub tokens: Vec<TokenSection>,
    pub allowed_hosts: Vec<String>,
    pub allowed_origins: Vec<String>,
    pub max_body: u64,
    pub shutdown_grace: Duration,
    pub sse_ping: Duration,
    pub event_retention: usize,
    pub event_retention_bytes: u64,
    pub subscriber_queue: usize,
}
impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: DEFAULT_LISTEN.parse().unwrap(),
            state_dir: "./.roster".into(),
            tokens: vec![],
            allowed_hosts: vec![],
            allowed_origins: vec![],
            max_body: 1 << 20,
            shutdown_grace: Duration::from_secs(10),
            sse_ping: Duration::from_secs(15),
            event_retention: 10_000,
            event_retention_bytes: 64 << 20,
            subscriber_queue: 1024,
        }
    }
}
#[derive(Clone, Debug)]
pub struct TokenSection {
    pub name: String,
    pub scope: Scope,
    pub token_env: Option<String>,
    pub token_file: Option<PathBuf>,
}
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Operate,
}
impl Scope {
    pub fn allows(self, needed: Scope) -> bool {
        self == Scope::Operate || needed == Scope::Read
    }
}
#[derive(Clone, Debug)]
pub struct RuntimeSection {
    pub id: RuntimeId,
    pub kind: String,
    pub table: toml::Table,
    pub line: usize,
}
#[derive(Clone, Debug)]
pub struct LoadedToken {
    pub name: String,
    pub scope: Scope,
    pub secret: String,
}
#[derive(Debug)]
pub struct BuiltRuntime {
    pub id: RuntimeId,
    pub kind: String,
    pub source: Arc<dyn RuntimeSource>,
}
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ConfigFileError {
    pub line: Option<usize>,
    pub message: String,
}
impl Config {
    pub fn default_embedded() -> Config {
        let table: toml::Table = toml::from_str(
            "allow_commands = true\n[profiles.shell]\ncommand = [\"/bin/sh\", \"-c\"]\n",
        )
        .unwrap();
        Config {
            server: ServerSection::default(),
            runtimes: vec![RuntimeSection {
                id: RuntimeId::new("local").unwrap(),
                kind: "embedded".into(),
                table,
                line: 0,
            }],
        }
    }
    pub fn parse(_text: &str) -> Result<Config, ConfigFileError> {
        Ok(Self::default_embedded())
    }
    pub fn load(_path: &Path) -> Result<Config, ConfigFileError> {
        Ok(Self::default_embedded())
    }
    pub fn build_sources(
        &self,
        factories: &SourceFactories,
    ) -> Result<Vec<BuiltRuntime>, ConfigFileError> {
        self.runtimes
            .iter()
            .map(|r| {
                let source = factories
                    .build(
                        &r.kind,
                        SourceConfig {
                            runtime_id: r.id.clone(),
                            table: r.table.clone(),
                            state_dir: self.server.state_dir.join("runtimes").join(r.id.as_str()),
                        },
                    )
                    .map_err(|e| ConfigFileError {
                        line: None,
                        message: e.to_string(),
                    })?;
                Ok(BuiltRuntime {
                    id: r.id.clone(),
                    kind: r.kind.clone(),
                    source,
                })
            })
            .collect()
    }
    pub fn load_tokens(&self) -> Result<Vec<LoadedToken>, ConfigFileError> {
        Ok(vec![])
    }
    pub fn check_listen(&self, _tokens: &[LoadedToken]) -> Result<(), ConfigFileError> {
        Ok(())
    }
}
