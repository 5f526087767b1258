//! The `slurm` runtime's table in the config file, and what is made of it at start.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use registry_core::{de, ConfigError, Redacted, RedactedValues};
use serde::Deserialize;

pub use registry_core::limits::MAX_GRACE;

/// The slurmrestd API version used unless `api_version` says otherwise.
pub const DEFAULT_API_VERSION: &str = "v0.0.38";

/// The slurmrestd API versions this crate speaks (the shapes of a job submission and of
/// the job list it reads are the same in both).
pub const API_VERSIONS: [&str; 2] = ["v0.0.37", "v0.0.38"];

/// Settings of a `slurm` runtime: the keys of its `[[runtimes]]` table besides `name` and
/// `source`. `url`, `user`, a token (`token_env` or `token_file`) and `output_dir` are
/// required; an unknown key is an error that names it.
///
/// `profiles`, `allow_commands`, `max_workers`, `max_finished`, `output_retention`, `grace`
/// and `retain_finished` mean what they mean for the `embedded` kind.
///
/// ```toml
/// [[runtimes]]
/// name = "hpc"
/// source = "slurm"
/// url = "http://127.0.0.1:6820"       # slurmrestd (plain HTTP)
/// api_version = "v0.0.38"
/// user = "builder"                    # the user the token is for; jobs run as this user
/// token_file = "/etc/roster/slurm.jwt" # or token_env = "SLURM_JWT"
/// partition = "debug"
/// account = "builds"
/// output_dir = "/shared/roster/hpc"   # job output files: on a file system roster reads
/// poll_interval = "2s"
/// grace = "10s"
/// [runtimes.profiles.shell]
/// command = ["/bin/sh", "-c"]
/// cwd = "/tmp"
/// env = { LANG = "C.UTF-8" }
/// time_limit = "30m"
/// cpus = 1
/// memory = "512MiB"
/// [runtimes.profiles.build]
/// script = "make -C \"$1\" all"
/// ```
///
/// `Debug` shows neither the URL, the token's source, paths, nor environment values.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlurmConfig {
    /// slurmrestd's address: `http://host:port`, perhaps with a path prefix.
    pub url: Redacted<String>,
    /// The slurmrestd API version (OpenAPI plugin) to speak: one of [`API_VERSIONS`],
    /// default [`DEFAULT_API_VERSION`]. A cluster that does not serve it is refused.
    pub api_version: String,
    /// The Slurm user the token was issued for (`X-SLURM-USER-NAME`). Jobs run as it.
    pub user: String,
    /// The environment variable holding the JWT (`X-SLURM-USER-TOKEN`).
    pub token_env: Option<Redacted<String>>,
    /// A file holding the JWT; read again whenever slurmrestd refuses the token, so a
    /// renewed token takes effect without a restart.
    pub token_file: Option<Redacted<PathBuf>>,
    /// The partition jobs are submitted to; the cluster's default when unset.
    pub partition: Option<String>,
    /// The account jobs are charged to; the user's default when unset.
    pub account: Option<String>,
    /// Spawn templates by name.
    pub profiles: BTreeMap<String, Profile>,
    /// Whether a spawn may give a `command` in place of a profile. Default `false`.
    pub allow_commands: bool,
    /// Where the jobs write their stdout and stderr (one file each per job). Must be a
    /// directory the jobs can write on their nodes and roster can read here: on a real
    /// cluster a shared file system.
    pub output_dir: Option<Redacted<PathBuf>>,
    /// Time between two requests for the job list. Default 2 s, at least 100 ms.
    #[serde(deserialize_with = "de::duration")]
    pub poll_interval: Duration,
    /// Time between SIGTERM and the cancel of a stop, unless the stop request or the
    /// profile gives one. Default 10 s; at most [`MAX_GRACE`].
    #[serde(deserialize_with = "de::duration")]
    pub grace: Duration,
    /// Every request to slurmrestd has this long to be answered. Default 30 s.
    #[serde(deserialize_with = "de::duration")]
    pub request_timeout: Duration,
    /// Live (non-terminal) workers allowed at once. Default 256.
    pub max_workers: usize,
    /// Finished worker records kept; beyond it the oldest is removed. Default 1024.
    pub max_finished: usize,
    /// Output bytes kept in memory per worker (at least this many of the newest). Default
    /// 1 MiB.
    #[serde(deserialize_with = "de::byte_size")]
    pub output_retention: u64,
    /// How long a finished worker (record and output files) is kept. Default 1 h.
    #[serde(deserialize_with = "de::duration")]
    pub retain_finished: Duration,
}

impl Default for SlurmConfig {
    fn default() -> Self {
        SlurmConfig {
            url: Redacted(String::new()),
            api_version: DEFAULT_API_VERSION.into(),
            user: String::new(),
            token_env: None,
            token_file: None,
            partition: None,
            account: None,
            profiles: BTreeMap::new(),
            allow_commands: false,
            output_dir: None,
            poll_interval: Duration::from_secs(2),
            grace: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_workers: 256,
            max_finished: 1024,
            output_retention: 1 << 20,
            retain_finished: Duration::from_secs(3600),
        }
    }
}

/// A spawn template: what a job runs (`command` or `script`, exactly one), where, and with
/// which limits.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// An argv; the request's `args` are appended. The job's batch script `exec`s it.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// A batch script (`/bin/sh` unless it starts with its own `#!` line of a POSIX
    /// shell); the request's `args` are its positional parameters (`$1`, …).
    #[serde(default)]
    pub script: Option<String>,
    /// The operator's sentence about the profile, shown to clients.
    #[serde(default)]
    pub description: Option<String>,
    /// The job's working directory on its node; `/tmp` when unset.
    #[serde(default)]
    pub cwd: Option<Redacted<PathBuf>>,
    /// The job's environment (besides Slurm's own `SLURM_*`); `PATH` is
    /// `/usr/local/bin:/usr/bin:/bin` unless given.
    #[serde(default)]
    pub env: RedactedValues<BTreeMap<String, String>>,
    /// The job's time limit, rounded up to whole minutes (Slurm's unit); the partition's
    /// when unset. A job over it is ended by Slurm: `failed`, `killed`.
    #[serde(default, deserialize_with = "de::opt_duration")]
    pub time_limit: Option<Duration>,
    /// CPUs of the job's one task.
    #[serde(default)]
    pub cpus: Option<u32>,
    /// Memory of the job on its node, rounded up to whole MiB, e.g. `"512MiB"`.
    #[serde(default, deserialize_with = "de::opt_byte_size")]
    pub memory: Option<u64>,
    /// Time between SIGTERM and cancel; overrides the runtime's `grace`.
    #[serde(default, deserialize_with = "de::opt_duration")]
    pub grace: Option<Duration>,
    /// Output bytes kept per worker; overrides the runtime's `output_retention`.
    #[serde(default, deserialize_with = "de::opt_byte_size")]
    pub output_retention: Option<u64>,
}

/// Where slurmrestd is: `host:port` and a path prefix (empty or starting with `/`).
#[derive(Clone)]
pub(crate) struct Endpoint {
    pub authority: String,
    pub prefix: String,
}

/// What a checked config resolves to besides itself.
pub(crate) struct Resolved {
    pub endpoint: Endpoint,
    pub token: String,
    pub output_dir: PathBuf,
}

impl std::fmt::Debug for Resolved {
    // The address, the token and the path are internal authority.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolved").finish_non_exhaustive()
    }
}

impl SlurmConfig {
    /// Checks what serde cannot, reads the token, and resolves the URL. The error names the
    /// key at fault; never the token, the URL or a path.
    pub(crate) fn check(&self, runtime: &str) -> Result<Resolved, ConfigError> {
        let fail = |key: &str, message: String| ConfigError::new(runtime, message).at(key);
        let endpoint = parse_url(&self.url).map_err(|m| fail("url", format!("`url`: {m}")))?;
        if !API_VERSIONS.contains(&self.api_version.as_str()) {
            return Err(fail(
                "api_version",
                format!(
                    "`api_version` must be one of {} (the slurmrestd versions this roster \
                     speaks)",
                    API_VERSIONS.join(", ")
                ),
            ));
        }
        if self.user.is_empty() || !self.user.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(fail(
                "user",
                "`user` is required: the Slurm user name the token was issued for (printable, \
                 no spaces)"
                    .into(),
            ));
        }
        let token = read_token(self).map_err(|(key, m)| fail(key, m))?;
        let Some(output_dir) = &self.output_dir else {
            return Err(ConfigError::new(
                runtime,
                "`output_dir` is required: the directory job output files are written to (a \
                 file system both the jobs and roster reach)",
            ));
        };
        if !output_dir.is_absolute() {
            return Err(fail(
                "output_dir",
                "`output_dir` must be an absolute path".into(),
            ));
        }
        for (key, value) in [("partition", &self.partition), ("account", &self.account)] {
            if value
                .as_ref()
                .is_some_and(|v| v.is_empty() || v.chars().any(|c| c.is_whitespace()))
            {
                return Err(fail(key, format!("`{key}` must be a name without spaces")));
            }
        }
        if self.poll_interval < Duration::from_millis(100) {
            return Err(fail(
                "poll_interval",
                "`poll_interval` must be at least 100ms".into(),
            ));
        }
        if self.request_timeout.is_zero() {
            return Err(fail(
                "request_timeout",
                "`request_timeout` must be longer than zero".into(),
            ));
        }
        if self.max_workers == 0 {
            return Err(fail(
                "max_workers",
                "`max_workers` must be at least 1".into(),
            ));
        }
        if self.grace > MAX_GRACE {
            return Err(fail("grace", "`grace` is longer than one day".into()));
        }
        for (name, profile) in &self.profiles {
            let key = |k: &str| format!("profiles.{name}.{k}");
            let fail = |k: &str, m: &str| Err(fail(&key(k), format!("`{}` {m}", key(k))));
            match (&profile.command, &profile.script) {
                (Some(_), Some(_)) => return fail("script", "and `command`: give one, not both"),
                (None, None) => return fail("command", "or `script` is required"),
                (Some(cmd), None) => match cmd.first() {
                    None => return fail("command", "must hold at least the program"),
                    Some(p) if p.is_empty() => return fail("command", "names an empty program"),
                    Some(_) if cmd.iter().any(|a| a.contains('\0')) => {
                        return fail("command", "holds a NUL character")
                    }
                    Some(_) => {}
                },
                (None, Some(script)) => {
                    if script.trim().is_empty() || script.contains('\0') {
                        return fail("script", "must be a non-empty script without NUL");
                    }
                }
            }
            for (k, v) in profile.env.iter() {
                if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                    return fail(
                        "env",
                        "names must be non-empty without '=' or NUL, values without NUL",
                    );
                }
            }
            if profile.cwd.as_ref().is_some_and(|c| !c.is_absolute()) {
                return fail("cwd", "must be an absolute path");
            }
            if profile.time_limit.is_some_and(|t| t.is_zero()) {
                return fail("time_limit", "must be longer than zero");
            }
            if profile.cpus == Some(0) {
                return fail("cpus", "must be at least 1");
            }
            if profile.memory == Some(0) {
                return fail("memory", "must be above 0");
            }
            if profile.grace.is_some_and(|g| g > MAX_GRACE) {
                return fail("grace", "is longer than one day");
            }
        }
        Ok(Resolved {
            endpoint,
            token,
            output_dir: output_dir.0.clone(),
        })
    }

    /// The token as it is now: from the environment, or read from `token_file` again.
    pub(crate) fn token(&self) -> Result<String, String> {
        read_token(self).map_err(|(_, m)| m)
    }
}

fn read_token(config: &SlurmConfig) -> Result<String, (&'static str, String)> {
    let (key, token) = match (&config.token_env, &config.token_file) {
        (Some(_), Some(_)) => {
            return Err((
                "token_file",
                "give `token_env` or `token_file`, not both".into(),
            ))
        }
        (None, None) => {
            return Err((
                "token_env",
                "a token is required: `token_env` or `token_file` (a JWT from `scontrol \
                 token`)"
                    .into(),
            ))
        }
        (Some(var), None) => (
            "token_env",
            std::env::var(var.as_str()).map_err(|_| {
                (
                    "token_env",
                    format!(
                        "`token_env`: the environment variable {:?} is not set (or not UTF-8)",
                        var.as_str()
                    ),
                )
            })?,
        ),
        (None, Some(path)) => (
            "token_file",
            std::fs::read_to_string(&**path)
                .map_err(|e| {
                    (
                        "token_file",
                        format!("`token_file`: cannot read it ({})", e.kind()),
                    )
                })?
                .trim()
                .to_string(),
        ),
    };
    // `scontrol token` prints `SLURM_JWT=…`; take that form too.
    let token = token.trim();
    let token = token
        .strip_prefix("SLURM_JWT=")
        .unwrap_or(token)
        .to_string();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err((
            key,
            format!("`{key}`: the token must be non-empty printable ASCII without spaces"),
        ));
    }
    Ok(token)
}

/// `http://host[:port][/prefix]` → its parts. Plain HTTP only.
fn parse_url(url: &str) -> Result<Endpoint, String> {
    if url.is_empty() {
        return Err("is required: slurmrestd's address, e.g. http://127.0.0.1:6820".into());
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return Err("must start with http:// (slurmrestd speaks plain HTTP)".into());
    };
    let (authority, prefix) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if authority.is_empty()
        || authority.contains('@')
        || !authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b))
    {
        return Err("needs a host (and port), without user info".into());
    }
    if prefix.contains(['?', '#']) || !prefix.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("has a path that is not a plain path prefix".into());
    }
    let authority = if authority.ends_with(']') || !authority.contains(':') {
        format!("{authority}:80")
    } else {
        authority.to_string()
    };
    Ok(Endpoint {
        authority,
        prefix: prefix.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "url = \"http://127.0.0.1:6820\"\nuser = \"u\"\ntoken_env = \"ROSTER_SLURM_CONFIG_TEST_TOKEN\"\noutput_dir = \"/srv/out\"\n";

    fn parse(text: &str) -> Result<(SlurmConfig, Resolved), String> {
        std::env::set_var("ROSTER_SLURM_CONFIG_TEST_TOKEN", "SLURM_JWT=eyJ.a.b");
        let config: SlurmConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        let resolved = config.check("hpc").map_err(|e| e.to_string())?;
        Ok((config, resolved))
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let (c, r) = parse(BASE).unwrap();
        assert_eq!(c.api_version, "v0.0.38");
        assert_eq!(c.poll_interval, Duration::from_secs(2));
        assert_eq!(c.grace, Duration::from_secs(10));
        assert_eq!(c.max_workers, 256);
        assert_eq!(c.output_retention, 1 << 20);
        assert_eq!(r.token, "eyJ.a.b", "the SLURM_JWT= form is taken");
        assert_eq!(r.endpoint.authority, "127.0.0.1:6820");
        assert_eq!(r.endpoint.prefix, "");
    }

    #[test]
    fn a_full_profile_reads() {
        let (c, _) = parse(&format!(
            "{BASE}partition = \"debug\"\naccount = \"a\"\n[profiles.shell]\ncommand = [\"/bin/sh\", \"-c\"]\n\
             cwd = \"/tmp\"\nenv = {{ A = \"1\" }}\ntime_limit = \"90s\"\ncpus = 2\nmemory = \"512MiB\"\ngrace = \"2s\"\n\
             [profiles.build]\nscript = \"make\"\n"
        ))
        .unwrap();
        let p = &c.profiles["shell"];
        assert_eq!(p.time_limit, Some(Duration::from_secs(90)));
        assert_eq!(p.memory, Some(512 << 20));
        assert_eq!(p.cpus, Some(2));
        assert_eq!(c.profiles["build"].script.as_deref(), Some("make"));
    }

    #[test]
    fn errors_name_the_key() {
        let profile = |extra: &str| format!("{BASE}[profiles.x]\ncommand = [\"sh\"]\n{extra}");
        for (text, key) in [
            (BASE.replace("http://127.0.0.1:6820", "https://h"), "`url`"),
            (format!("{BASE}api_version = \"v0.0.39\""), "`api_version`"),
            (BASE.replace("user = \"u\"", ""), "`user`"),
            (
                BASE.replace("output_dir = \"/srv/out\"", ""),
                "`output_dir`",
            ),
            (BASE.replace("/srv/out", "rel"), "`output_dir`"),
            (format!("{BASE}poll_interval = \"10ms\""), "`poll_interval`"),
            (format!("{BASE}max_workers = 0"), "`max_workers`"),
            (format!("{BASE}partition = \"a b\""), "`partition`"),
            (
                format!("{BASE}[profiles.x]\ncommand = []"),
                "`profiles.x.command`",
            ),
            (
                format!("{BASE}[profiles.x]\ncwd = \"/tmp\""),
                "`profiles.x.command`",
            ),
            (profile("script = \"x\""), "`profiles.x.script`"),
            (profile("cwd = \"rel\""), "`profiles.x.cwd`"),
            (profile("cpus = 0"), "`profiles.x.cpus`"),
            (profile("time_limit = \"0s\""), "`profiles.x.time_limit`"),
        ] {
            let err = parse(&text).unwrap_err();
            assert!(err.contains(key), "{text}: {err}");
        }
        let err = parse(&format!("{BASE}partiton = \"x\"")).unwrap_err();
        assert!(err.contains("partiton"), "{err}");
    }

    #[test]
    fn url_keeps_a_path_prefix_and_adds_port_80() {
        let e = parse_url("http://slurm.internal/rest/").unwrap();
        assert_eq!(
            (e.authority.as_str(), e.prefix.as_str()),
            ("slurm.internal:80", "/rest")
        );
        assert!(parse_url("http://u:p@h:1").is_err());
        assert!(parse_url("http://h:1/a?b").is_err());
    }

    #[test]
    fn debug_shows_no_url_token_path_nor_environment_values() {
        let (c, _) = parse(&format!(
            "{}\n[profiles.x]\ncommand = [\"sh\"]\ncwd = \"/srv/hidden\"\nenv = {{ TOKEN = \"s3cr3t\" }}\n",
            BASE.replace("127.0.0.1:6820", "private-host:6820")
        ))
        .unwrap();
        let text = format!("{c:?}");
        for secret in [
            "private-host",
            "/srv/out",
            "/srv/hidden",
            "s3cr3t",
            "ROSTER_SLURM",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(text.contains("TOKEN"), "{text}");
    }
}
