//! Who may call: token scopes, the host names and origins a request may come with, and
//! the checks of a request against them (SPEC §7) — bearer tokens, `Host` and `Origin`,
//! which keep a web page in the user's browser from driving the API.
//!
//! The config deserializes straight into [`Scope`], [`AllowedHost`] and [`AllowedOrigin`],
//! so an entry is read in exactly the form these checks compare.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::ops::Deref;
use std::str::FromStr;

use http::header::{AUTHORIZATION, HOST, ORIGIN};
use http::{HeaderMap, Method};
use registry_core::RegistryError;

use crate::error::ApiError;
use serde::{Deserialize, Serialize};

use crate::config::LoadedToken;
use crate::routes::Access;

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// GET requests and event streams.
    Read,
    /// Everything `read` may, plus spawn, input, stop and delete.
    Operate,
}

impl Scope {
    /// Whether a token of this scope may do what needs `needed`: `operate` allows both
    /// scopes, `read` allows only `read`.
    pub fn allows(self, needed: Scope) -> bool {
        match self {
            Scope::Operate => true,
            Scope::Read => needed == Scope::Read,
        }
    }
}

/// A host name accepted in `Host` besides the loopback names (an `allowed_hosts` entry),
/// in the form a `Host` header is compared in: lower case, without trailing dots, an IPv6
/// address without its brackets.
///
/// Parsing refuses an entry that could never match, with a message naming it: an empty
/// one, one with a port (the port is not compared), one that is not a bare host name.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct AllowedHost(String);

impl FromStr for AllowedHost {
    type Err = String;
    fn from_str(entry: &str) -> Result<Self, String> {
        allowed_host(entry).map(AllowedHost)
    }
}

impl TryFrom<String> for AllowedHost {
    type Error = String;
    fn try_from(entry: String) -> Result<Self, String> {
        entry.parse()
    }
}

/// An origin (`scheme://host[:port]`) accepted on requests with a body besides the
/// server's own (an `allowed_origins` entry). Compared exactly, without case.
///
/// Parsing refuses what is not an origin (a path, a trailing slash, no scheme) and a port
/// a browser never sends in an `Origin` (empty, or the scheme's default), naming the fix.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct AllowedOrigin(String);

impl FromStr for AllowedOrigin {
    type Err = String;
    fn from_str(origin: &str) -> Result<Self, String> {
        if !is_origin(origin) {
            return Err(format!(
                "{origin:?} is not an origin; write scheme://host[:port] without a path or a \
                 trailing slash, e.g. \"https://console.example\""
            ));
        }
        if let Some(port) = origin_port(origin).filter(|p| is_default_port(origin, p)) {
            let port = if port.is_empty() {
                "an empty port".to_string()
            } else {
                format!("the default port {port}")
            };
            return Err(format!(
                "{origin:?} has {port}, which browsers never send in an Origin; drop the \
                 port, e.g. \"{}\"",
                without_port(origin)
            ));
        }
        Ok(AllowedOrigin(origin.to_string()))
    }
}

impl TryFrom<String> for AllowedOrigin {
    type Error = String;
    fn try_from(origin: String) -> Result<Self, String> {
        origin.parse()
    }
}

/// Both read as the text they hold: `Debug`, comparison with a `&str`, `Deref` to `str`.
macro_rules! text_newtype {
    ($($name:ident),*) => {$(
        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    )*};
}

text_newtype!(AllowedHost, AllowedOrigin);

/// The configured tokens, kept only as BLAKE3 hashes: a presented token is hashed and
/// compared with every stored hash, in constant time (`blake3::Hash`'s equality is), and
/// without stopping at the first match, so timing says nothing about which or how much matched.
///
/// Two sets are equal when they hold the same names, scopes and secrets in the same order
/// (a reload compares the new set with the one in force).
#[derive(PartialEq, Eq)]
pub struct Tokens {
    entries: Vec<(String, Scope, blake3::Hash)>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens")
            .field(
                "names",
                &self.entries.iter().map(|e| &e.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Tokens {
    /// Tokens from the loaded config.
    pub fn new(tokens: &[LoadedToken]) -> Tokens {
        Tokens {
            entries: tokens
                .iter()
                .map(|t| (t.name.clone(), t.scope, blake3::hash(t.secret.as_bytes())))
                .collect(),
        }
    }

    /// Whether any token is configured (without tokens the server is loopback-only and open).
    pub fn enabled(&self) -> bool {
        !self.entries.is_empty()
    }

    /// Checks a request's credential against what the route needs. Returns the token's name
    /// for the log (never the token).
    pub fn authorize(&self, headers: &HeaderMap, access: Access) -> Result<Option<&str>, ApiError> {
        let Access::Token(needed) = access else {
            return Ok(None);
        };
        if !self.enabled() {
            return Ok(None);
        }
        let presented = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .ok_or_else(|| {
                ApiError::Unauthorized(
                    "this server needs a token: send `Authorization: Bearer <token>`".into(),
                )
            })?;
        let hash = blake3::hash(presented.as_bytes());
        let mut found = None;
        for (name, scope, stored) in &self.entries {
            if *stored == hash {
                found = Some((name.as_str(), *scope));
            }
        }
        let (name, scope) =
            found.ok_or_else(|| ApiError::Unauthorized("the token is not valid".into()))?;
        if !scope.allows(needed) {
            return Err(RegistryError::Forbidden(format!(
                "the token {name:?} has the read scope; this request needs the operate scope"
            ))
            .into());
        }
        Ok(Some(name))
    }
}

/// A request names one server and carries one credential: a second `Host` or
/// `Authorization` line is `400 invalid_request` (RFC 9110 §11.6.2 gives `Authorization`
/// one value, RFC 9112 §3.2 `Host`), so that no check reads one line while another part
/// of the chain reads the other.
pub fn check_single_credentials(headers: &HeaderMap) -> Result<(), ApiError> {
    for (name, what) in [(HOST, "Host"), (AUTHORIZATION, "Authorization")] {
        if headers.get_all(name).iter().nth(1).is_some() {
            return Err(RegistryError::InvalidRequest(format!(
                "the request has more than one {what} header; send exactly one"
            ))
            .into());
        }
    }
    Ok(())
}

/// The names and origins a request may come with.
#[derive(Debug, Clone, Default)]
pub struct Allowed {
    /// Host names (without port) accepted besides the loopback names.
    pub hosts: Vec<AllowedHost>,
    /// Origins (`scheme://host[:port]`) accepted besides the server's own.
    pub origins: Vec<AllowedOrigin>,
}

/// The host part of a `Host` header or an origin's authority, lower-cased, without the port.
fn host_name(authority: &str) -> String {
    let authority = authority.trim();
    let host = if let Some(rest) = authority.strip_prefix('[') {
        // [v6]:port
        rest.split(']').next().unwrap_or("")
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, p)| {
            if p.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                authority
            }
        })
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

fn is_loopback_name(host: &str) -> bool {
    host == "localhost"
        || host.ends_with(".localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl Allowed {
    fn host_allowed(&self, host: &str) -> bool {
        is_loopback_name(host) || self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
    }

    /// `Host` must name this server: a loopback name or a configured one. Anything else is
    /// a DNS-rebinding page or a misdirected client: `403`.
    pub fn check_host(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if headers.get_all(HOST).iter().count() > 1 {
            return Err(RegistryError::InvalidRequest(
                "the request has more than one Host header".into(),
            )
            .into());
        }
        let Some(host) = headers.get(HOST).and_then(|v| v.to_str().ok()) else {
            return Err(
                RegistryError::InvalidRequest("the request has no Host header".into()).into(),
            );
        };
        if self.host_allowed(&host_name(host)) {
            Ok(())
        } else {
            Err(RegistryError::Forbidden(
                "the Host header does not name this server; add the name to `allowed_hosts` in the [server] config".into(),
            ).into())
        }
    }

    /// A request line in absolute form (`GET http://name/…`) must name this server too.
    pub fn check_target(&self, uri: &http::Uri) -> Result<(), ApiError> {
        match uri.authority() {
            Some(a) if !self.host_allowed(&host_name(a.as_str())) => Err(RegistryError::Forbidden(
                "the request names another host; add the name to `allowed_hosts` in the [server] config".into(),
            ).into()),
            _ => Ok(()),
        }
    }

    /// A request that changes something and carries an `Origin` must come from the server's
    /// own origin or a configured one: a web page elsewhere can't spawn processes here.
    /// Requests without `Origin` (curl, other programs) pass: browsers always send it on
    /// such requests.
    pub fn check_origin(&self, method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
        if matches!(*method, Method::GET | Method::HEAD) {
            return Ok(());
        }
        let refused = || {
            ApiError::OriginNotAllowed(
                "requests from this web origin are not allowed; add it to `allowed_origins` in the [server] config".into(),
            )
        };
        // One Origin only: a second line must not slip past the check of the first.
        let mut origins = headers.get_all(ORIGIN).iter();
        let Some(origin) = origins.next() else {
            return Ok(());
        };
        if origins.next().is_some() {
            return Err(refused());
        }
        let origin = origin.to_str().map_err(|_| refused())?.trim();
        if self
            .origins
            .iter()
            .any(|o| o.trim_end_matches('/').eq_ignore_ascii_case(origin))
        {
            return Ok(());
        }
        // Same origin: http://<the Host header>, with that host allowed.
        let host = headers
            .get(HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let authority = origin.strip_prefix("http://").ok_or_else(refused)?;
        if !host.is_empty()
            && authority.eq_ignore_ascii_case(host)
            && self.host_allowed(&host_name(authority))
        {
            return Ok(());
        }
        Err(refused())
    }
}

/// `entry` of `allowed_hosts` in the form the server compares a `Host` header in: lower
/// case, without trailing dots, an IPv6 address without its brackets. An entry that could
/// never match is an error message naming it: an empty one, one with a port (the port is
/// not compared), one that is not a bare host name.
fn allowed_host(entry: &str) -> Result<String, String> {
    let not_a_name = || {
        format!(
            "{entry:?} is not a host name; write the bare name, e.g. \"roster.internal\", or \
             an IP address"
        )
    };
    if entry.contains(['/', '@']) || entry.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(not_a_name());
    }
    let lower = entry.to_ascii_lowercase();
    let host = match lower.strip_prefix('[') {
        Some(rest) => match rest.strip_suffix(']') {
            Some(inside) if inside.parse::<Ipv6Addr>().is_ok() => inside,
            _ if rest.contains("]:") => return Err(with_port(entry)),
            _ => return Err(not_a_name()),
        },
        None => lower.trim_end_matches('.'),
    };
    if host.is_empty() {
        return Err(format!(
            "{entry:?} is empty; write a host name, e.g. \"roster.internal\""
        ));
    }
    if host.contains(':') && host.parse::<Ipv6Addr>().is_err() {
        return Err(
            if host.contains(['[', ']']) || host.matches(':').count() > 1 {
                not_a_name()
            } else {
                with_port(entry)
            },
        );
    }
    if host.contains(['[', ']']) {
        return Err(not_a_name());
    }
    Ok(host.to_string())
}

/// The message for an `allowed_hosts` entry with a port.
fn with_port(entry: &str) -> String {
    format!(
        "{entry:?} has a port, but a Host header is compared without its port, so this \
         entry would never match; drop the port, e.g. \"roster.internal\" or \"[fd00::1]\""
    )
}

/// The port of an origin written `scheme://host:port` (empty for `scheme://host:`), or
/// `None` without one.
fn origin_port(origin: &str) -> Option<&str> {
    let (_, authority) = origin.split_once("://")?;
    let after_host = match authority.strip_prefix('[') {
        Some(rest) => &rest[rest.find(']')? + 1..],
        None => authority,
    };
    after_host.rsplit_once(':').map(|(_, port)| port)
}

/// Whether `port`, written in `origin`, is one a browser leaves out of an `Origin`: empty,
/// or the default port of an `http` or `https` origin.
fn is_default_port(origin: &str, port: &str) -> bool {
    if port.is_empty() {
        return true;
    }
    let scheme = origin.split_once("://").map_or("", |(s, _)| s);
    let default = if scheme.eq_ignore_ascii_case("http") {
        80
    } else if scheme.eq_ignore_ascii_case("https") {
        443
    } else {
        return false;
    };
    port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>() == Ok(default)
}

/// `origin` without its port (and the `:` before it).
fn without_port(origin: &str) -> &str {
    match origin_port(origin) {
        Some(port) => &origin[..origin.len() - port.len() - 1],
        None => origin,
    }
}

/// Whether `origin` is `scheme://host[:port]` with nothing after the authority and, if it
/// has a port, a port number (an empty port is left to the caller, which says to drop it).
fn is_origin(origin: &str) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        && !authority.is_empty()
        && !authority.contains(['/', '?', '#', '@'])
        && !authority
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        && origin_port(origin).is_none_or(|port| {
            port.is_empty()
                || (port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok())
        })
}

/// Whether `ip` is a loopback address, an IPv4-mapped IPv6 one included.
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn h(pairs: &[(http::HeaderName, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        m
    }

    #[test]
    fn host_names_are_read_without_port_and_case() {
        assert_eq!(host_name("LocalHost:7411"), "localhost");
        assert_eq!(host_name("[::1]:80"), "::1");
        assert_eq!(host_name("127.0.0.1"), "127.0.0.1");
        assert_eq!(host_name("roster.internal."), "roster.internal");
    }

    #[test]
    fn only_loopback_and_configured_hosts_pass() {
        let a = Allowed {
            hosts: vec!["roster.internal".parse().unwrap()],
            origins: vec![],
        };
        for ok in [
            "localhost:1",
            "127.0.0.1:7411",
            "[::1]:7411",
            "ROSTER.internal:9",
        ] {
            assert!(a.check_host(&h(&[(HOST, ok)])).is_ok(), "{ok}");
        }
        for bad in ["evil.example", "127.0.0.1.evil.example:7411", "10.0.0.1"] {
            assert_eq!(
                a.check_host(&h(&[(HOST, bad)])).unwrap_err().code(),
                "forbidden",
                "{bad}"
            );
        }
    }

    #[test]
    fn an_absolute_request_target_must_name_this_server() {
        let a = Allowed::default();
        assert!(a.check_target(&"/v1/runtimes".parse().unwrap()).is_ok());
        assert!(a
            .check_target(&"http://127.0.0.1:7411/v1/runtimes".parse().unwrap())
            .is_ok());
        let e = a
            .check_target(&"http://evil.example/v1/runtimes".parse().unwrap())
            .unwrap_err();
        assert_eq!(e.code(), "forbidden");
    }

    #[test]
    fn foreign_origins_cannot_change_anything() {
        let a = Allowed {
            hosts: vec![],
            origins: vec!["https://console.example".parse().unwrap()],
        };
        let same = h(&[(HOST, "127.0.0.1:7411"), (ORIGIN, "http://127.0.0.1:7411")]);
        assert!(a.check_origin(&Method::POST, &same).is_ok());
        let listed = h(&[
            (HOST, "127.0.0.1:7411"),
            (ORIGIN, "https://console.example"),
        ]);
        assert!(a.check_origin(&Method::POST, &listed).is_ok());
        for bad in [
            "http://evil.example",
            "null",
            "http://127.0.0.1:9999",
            "https://127.0.0.1:7411",
        ] {
            let m = h(&[(HOST, "127.0.0.1:7411"), (ORIGIN, bad)]);
            assert_eq!(
                a.check_origin(&Method::POST, &m).unwrap_err().code(),
                "origin_not_allowed",
                "{bad}"
            );
            assert!(a.check_origin(&Method::GET, &m).is_ok());
        }
        assert!(a
            .check_origin(&Method::POST, &h(&[(HOST, "localhost")]))
            .is_ok());
    }

    #[test]
    fn scopes_are_enforced_and_tokens_compared_whole() {
        let tokens = Tokens::new(&[
            LoadedToken {
                name: "ro".into(),
                scope: Scope::Read,
                secret: "read-secret-0123456789".into(),
            },
            LoadedToken {
                name: "rw".into(),
                scope: Scope::Operate,
                secret: "operate-secret-0123456789".into(),
            },
        ]);
        let read = Access::Token(Scope::Read);
        let operate = Access::Token(Scope::Operate);
        let bearer = |t: &str| h(&[(AUTHORIZATION, &format!("Bearer {t}"))]);
        assert_eq!(
            tokens
                .authorize(&HeaderMap::new(), read)
                .unwrap_err()
                .code(),
            "unauthorized"
        );
        assert_eq!(
            tokens
                .authorize(&bearer("read-secret-012345678"), read)
                .unwrap_err()
                .code(),
            "unauthorized"
        );
        assert_eq!(
            tokens
                .authorize(&bearer("read-secret-0123456789"), read)
                .unwrap(),
            Some("ro")
        );
        assert_eq!(
            tokens
                .authorize(&bearer("read-secret-0123456789"), operate)
                .unwrap_err()
                .code(),
            "forbidden"
        );
        assert_eq!(
            tokens
                .authorize(&bearer("operate-secret-0123456789"), operate)
                .unwrap(),
            Some("rw")
        );
        assert!(tokens.authorize(&HeaderMap::new(), Access::Open).is_ok());
        assert!(!format!("{tokens:?}").contains("secret-0123"));
    }
}
