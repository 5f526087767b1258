//! The `docker` runtime's table in the config file.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use registry_core::{de, Redacted, RedactedValues};
use serde::Deserialize;

pub use registry_core::limits::MAX_GRACE;

/// Where a runtime's workers run: containers on one engine, or services on a swarm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Each worker is a container on the engine behind `socket`.
    #[default]
    Docker,
    /// Each worker is a one-replica swarm service (`restart_policy: none`) on the swarm
    /// whose manager is behind `socket`; its task may run on any node.
    Swarm,
}

/// Settings of a `docker` runtime: the keys of its `[[runtimes]]` table besides `name` and
/// `source`. Every key is optional; an unknown key is an error that names it.
///
/// `profiles`, `allow_commands`, `max_workers`, `max_finished`, `output_retention`, `grace`
/// and `retain_finished` mean what they mean for the `embedded` kind; a profile adds where
/// and how its container runs (`image`, `network`, limits).
///
/// ```toml
/// [[runtimes]]
/// name = "boxes"
/// source = "docker"
/// socket = "/var/run/docker.sock"  # or Podman's, e.g. /run/podman/podman.sock
/// allow_images = ["roster-test/*"]  # the images profiles (and commands) may name
/// image = "roster-test/busybox:1"   # the image a spawn with `command` runs in
/// allow_commands = false
/// max_workers = 64
/// max_finished = 1024
/// output_retention = "1MiB"
/// grace = "10s"
/// retain_finished = "1h"
/// [runtimes.profiles.shell]
/// image = "roster-test/busybox:1"
/// command = ["/bin/sh", "-c"]
/// env = { RUST_LOG = "info" }
/// cwd = "/tmp"
/// labels = { team = "a" }
/// network = "none"
/// memory = "64MiB"
/// cpus = 0.5
/// pids_limit = 64
/// user = "1000:1000"
/// ```
///
/// `Debug` shows neither the socket nor environment values.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DockerConfig {
    /// The engine's API socket (a Unix socket path, `unix://` allowed). Default
    /// `/var/run/docker.sock`; Podman's Docker-compatible socket works unchanged.
    pub socket: Redacted<String>,
    /// `docker` (default) or `swarm`.
    pub mode: Mode,
    /// Spawn templates by name.
    pub profiles: BTreeMap<String, Profile>,
    /// The images a profile or the runtime's `image` may name: exact references, or
    /// prefixes ending in `*`. Empty (the default): any image.
    pub allow_images: Vec<String>,
    /// The image a spawn with `command` in place of a profile runs in. Needed for
    /// `allow_commands`.
    pub image: Option<String>,
    /// Whether a spawn may give a `command` in place of a profile. Default `false`.
    pub allow_commands: bool,
    /// Live (non-terminal) workers allowed at once. Default 64.
    pub max_workers: usize,
    /// Finished worker records kept; beyond it the oldest is removed. Default 1024.
    pub max_finished: usize,
    /// Output bytes kept in memory per worker (at least this many of the newest). Default
    /// 1 MiB.
    #[serde(deserialize_with = "de::byte_size")]
    pub output_retention: u64,
    /// Time between SIGTERM and SIGKILL when stopping, unless the stop request or the
    /// profile gives one. Default 10 s; at most [`MAX_GRACE`].
    #[serde(deserialize_with = "de::duration")]
    pub grace: Duration,
    /// How long a finished worker (record and container) is kept. Default 1 h.
    #[serde(deserialize_with = "de::duration")]
    pub retain_finished: Duration,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            socket: Redacted(DEFAULT_SOCKET.to_string()),
            mode: Mode::Docker,
            profiles: BTreeMap::new(),
            allow_images: Vec::new(),
            image: None,
            allow_commands: false,
            max_workers: 64,
            max_finished: 1024,
            output_retention: 1 << 20,
            grace: Duration::from_secs(10),
            retain_finished: Duration::from_secs(3600),
        }
    }
}

/// The engine socket when the config names none.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// A spawn template: the container a worker runs in. Its argv is `command` followed by the
/// request's `args` (it replaces the image's entrypoint and command); its environment gets
/// `env`, then the request's `env`.
///
/// `Debug` shows env names but never their values, and never the `cwd` path.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The image, present on the engine (the source never pulls).
    pub image: String,
    /// The argv prefix, e.g. `["/bin/sh", "-c"]`. Must not be empty.
    pub command: Vec<String>,
    /// Environment of the container.
    #[serde(default)]
    pub env: RedactedValues<BTreeMap<String, String>>,
    /// Working directory inside the container; the image's when unset.
    #[serde(default)]
    pub cwd: Option<Redacted<PathBuf>>,
    /// Labels put on the container (for the engine's operator; clients see only their own).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The container's network: `none` (default), or a network the engine has.
    #[serde(default = "default_network")]
    pub network: String,
    /// Memory limit, e.g. `"64MiB"`.
    #[serde(default, deserialize_with = "de::opt_byte_size")]
    pub memory: Option<u64>,
    /// CPU limit in CPUs, e.g. `0.5`.
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Most processes in the container.
    #[serde(default)]
    pub pids_limit: Option<i64>,
    /// The user (`name`, `uid` or `uid:gid`) inside the container; the image's when unset.
    #[serde(default)]
    pub user: Option<String>,
    /// Output bytes kept per worker; overrides the runtime's `output_retention`.
    #[serde(default, deserialize_with = "de::opt_byte_size")]
    pub output_retention: Option<u64>,
    /// Time between SIGTERM and SIGKILL; overrides the runtime's `grace`.
    #[serde(default, deserialize_with = "de::opt_duration")]
    pub grace: Option<Duration>,
}

fn default_network() -> String {
    "none".into()
}

/// Labels of this crate's own, on every container it makes: profile labels may not use them.
pub(crate) const LABEL_PREFIX: &str = "roster.";

impl DockerConfig {
    /// Checks what serde cannot. The message names the key at fault.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.socket.is_empty() {
            return Err("`socket` is empty; give the engine's API socket".into());
        }
        if self.max_workers == 0 {
            return Err("`max_workers` must be at least 1".into());
        }
        if self.grace > MAX_GRACE {
            return Err("`grace` is longer than one day".into());
        }
        if let Some(image) = &self.image {
            self.check_image("image", image)?;
        }
        if self.allow_commands && self.image.is_none() {
            return Err(
                "`allow_commands = true` needs `image`: the image a command runs in".into(),
            );
        }
        for (name, profile) in &self.profiles {
            let at = |key: &str| format!("`profiles.{name}.{key}`");
            self.check_image(&format!("profiles.{name}.image"), &profile.image)?;
            match profile.command.first() {
                None => return Err(format!("{} must hold at least the program", at("command"))),
                Some(p) if p.is_empty() => {
                    return Err(format!("{}: the program is empty", at("command")))
                }
                Some(_) => {}
            }
            if profile.command.iter().any(|a| a.contains('\0')) {
                return Err(format!("{} holds a NUL character", at("command")));
            }
            for (key, value) in &profile.env {
                if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0')
                {
                    return Err(format!(
                        "{}: a name must be non-empty and hold no '=' or NUL, a value no NUL",
                        at("env")
                    ));
                }
            }
            if profile.labels.keys().any(|k| k.starts_with(LABEL_PREFIX)) {
                return Err(format!(
                    "{}: keys starting with \"{LABEL_PREFIX}\" are the source's own",
                    at("labels")
                ));
            }
            if profile.network.is_empty() {
                return Err(format!("{} is empty", at("network")));
            }
            if profile.network == "host" || profile.network == "bridge" {
                return Err(format!(
                    "{}: \"{}\" would reach outside the container's loopback; use \"none\" or a \
                     network of the engine made for workers",
                    at("network"),
                    profile.network
                ));
            }
            if let Some(cpus) = profile.cpus {
                if !(cpus.is_finite() && cpus > 0.0 && cpus <= 1024.0) {
                    return Err(format!("{} must be a number of CPUs above 0", at("cpus")));
                }
            }
            if profile.memory == Some(0) {
                return Err(format!("{} must be above 0", at("memory")));
            }
            if profile.pids_limit.is_some_and(|p| p < 1) {
                return Err(format!("{} must be at least 1", at("pids_limit")));
            }
            if profile.grace.is_some_and(|g| g > MAX_GRACE) {
                return Err(format!("{} is longer than one day", at("grace")));
            }
            if profile.cwd.as_ref().is_some_and(|c| !c.is_absolute()) {
                return Err(format!("{} must be an absolute path", at("cwd")));
            }
        }
        Ok(())
    }

    fn check_image(&self, key: &str, image: &str) -> Result<(), String> {
        if image.is_empty() {
            return Err(format!("`{key}` is empty"));
        }
        if !self.image_allowed(image) {
            return Err(format!(
                "`{key}` names an image that `allow_images` does not allow"
            ));
        }
        Ok(())
    }

    /// Whether `allow_images` lets a worker run `image`.
    pub fn image_allowed(&self, image: &str) -> bool {
        self.allow_images.is_empty()
            || self
                .allow_images
                .iter()
                .any(|pattern| match pattern.strip_suffix('*') {
                    Some(prefix) => image.starts_with(prefix),
                    None => image == pattern,
                })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<DockerConfig, String> {
        let config: DockerConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config.check()?;
        Ok(config)
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let c = parse("").unwrap();
        assert_eq!(c, DockerConfig::default());
        assert_eq!(c.socket, DEFAULT_SOCKET);
        assert_eq!(c.max_workers, 64);
        assert_eq!(c.output_retention, 1 << 20);
        assert_eq!(c.grace, Duration::from_secs(10));
        assert_eq!(c.retain_finished, Duration::from_secs(3600));
        let p = parse("[profiles.x]\nimage = \"i\"\ncommand = [\"sh\"]").unwrap();
        assert_eq!(p.profiles["x"].network, "none");
    }

    #[test]
    fn a_full_profile_reads() {
        let c = parse(
            r#"
            allow_images = ["roster-test/*"]
            [profiles.shell]
            image = "roster-test/busybox:1"
            command = ["/bin/sh", "-c"]
            env = { A = "1" }
            cwd = "/tmp"
            labels = { team = "a" }
            memory = "64MiB"
            cpus = 0.5
            pids_limit = 32
            user = "1000"
            grace = "2s"
            output_retention = 4096
            "#,
        )
        .unwrap();
        let p = &c.profiles["shell"];
        assert_eq!(p.memory, Some(64 << 20));
        assert_eq!(p.cpus, Some(0.5));
        assert_eq!(p.pids_limit, Some(32));
        assert_eq!(p.grace, Some(Duration::from_secs(2)));
    }

    #[test]
    fn errors_name_the_key() {
        let profile =
            |extra: &str| format!("[profiles.x]\nimage = \"i\"\ncommand = [\"sh\"]\n{extra}");
        for (text, key) in [
            ("max_workers = 0".to_string(), "`max_workers`"),
            ("socket = \"\"".to_string(), "`socket`"),
            ("allow_commands = true".to_string(), "`allow_commands"),
            (
                "[profiles.x]\nimage = \"i\"\ncommand = []".to_string(),
                "`profiles.x.command`",
            ),
            (profile("network = \"host\""), "`profiles.x.network`"),
            (profile("cpus = 0.0"), "`profiles.x.cpus`"),
            (profile("pids_limit = 0"), "`profiles.x.pids_limit`"),
            (profile("cwd = \"rel\""), "`profiles.x.cwd`"),
            (
                profile("labels = { \"roster.runtime\" = \"x\" }"),
                "`profiles.x.labels`",
            ),
            (
                format!("allow_images = [\"good/*\"]\n{}", profile("")),
                "`profiles.x.image`",
            ),
        ] {
            let err = parse(&text).unwrap_err();
            assert!(err.contains(key), "{text}: {err}");
        }
        let err = parse("sockt = \"x\"").unwrap_err();
        assert!(err.contains("sockt"), "{err}");
    }

    #[test]
    fn allow_images_takes_exact_names_and_prefixes() {
        let c = DockerConfig {
            allow_images: vec!["a/b:1".into(), "roster-test/*".into()],
            ..Default::default()
        };
        assert!(c.image_allowed("a/b:1") && c.image_allowed("roster-test/busybox:1"));
        assert!(!c.image_allowed("a/b:2") && !c.image_allowed("other"));
        assert!(DockerConfig::default().image_allowed("anything"));
    }

    #[test]
    fn debug_shows_no_socket_nor_environment_values() {
        let c = parse(
            r#"
            socket = "/srv/private/engine.sock"
            [profiles.x]
            image = "i"
            command = ["sh"]
            cwd = "/srv/hidden"
            env = { TOKEN = "s3cr3t" }
            "#,
        )
        .unwrap();
        let text = format!("{c:?}");
        for secret in ["/srv/private", "/srv/hidden", "s3cr3t"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(text.contains("TOKEN"), "{text}");
    }
}
