//! Who may call: bearer tokens with scopes, and the `Host` and `Origin` checks that keep a web
//! page in the user's browser from driving the API (SPEC §7).

use std::fmt;
use std::net::IpAddr;

use http::header::{AUTHORIZATION, HOST, ORIGIN};
use http::{HeaderMap, Method};
use registry_core::RegistryError;

use crate::config::{LoadedToken, Scope};
use crate::routes::Access;

/// The configured tokens, kept only as BLAKE3 hashes: a presented token is hashed and
/// compared with every stored hash, in constant time (`blake3::Hash`'s equality is), and
/// without stopping at the first match, so timing says nothing about which or how much matched.
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
    pub fn authorize(
        &self,
        headers: &HeaderMap,
        access: Access,
    ) -> Result<Option<&str>, RegistryError> {
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
                RegistryError::Unauthorized(
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
            found.ok_or_else(|| RegistryError::Unauthorized("the token is not valid".into()))?;
        if !scope.allows(needed) {
            return Err(RegistryError::Forbidden(format!(
                "the token {name:?} has the read scope; this request needs the operate scope"
            )));
        }
        Ok(Some(name))
    }
}

/// The names and origins a request may come with.
#[derive(Debug, Clone, Default)]
pub struct Allowed {
    /// Host names (without port) accepted besides the loopback names.
    pub hosts: Vec<String>,
    /// Origins (`scheme://host[:port]`) accepted besides the server's own.
    pub origins: Vec<String>,
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
    pub fn check_host(&self, headers: &HeaderMap) -> Result<(), RegistryError> {
        if headers.get_all(HOST).iter().count() > 1 {
            return Err(RegistryError::InvalidRequest(
                "the request has more than one Host header".into(),
            ));
        }
        let Some(host) = headers.get(HOST).and_then(|v| v.to_str().ok()) else {
            return Err(RegistryError::InvalidRequest(
                "the request has no Host header".into(),
            ));
        };
        if self.host_allowed(&host_name(host)) {
            Ok(())
        } else {
            Err(RegistryError::Forbidden(
                "the Host header does not name this server; add the name to `allowed_hosts` in the [server] config".into(),
            ))
        }
    }

    /// A request line in absolute form (`GET http://name/…`) must name this server too.
    pub fn check_target(&self, uri: &http::Uri) -> Result<(), RegistryError> {
        match uri.authority() {
            Some(a) if !self.host_allowed(&host_name(a.as_str())) => Err(RegistryError::Forbidden(
                "the request names another host; add the name to `allowed_hosts` in the [server] config".into(),
            )),
            _ => Ok(()),
        }
    }

    /// A request that changes something and carries an `Origin` must come from the server's
    /// own origin or a configured one: a web page elsewhere can't spawn processes here.
    /// Requests without `Origin` (curl, other programs) pass: browsers always send it on
    /// such requests.
    pub fn check_origin(&self, method: &Method, headers: &HeaderMap) -> Result<(), RegistryError> {
        if matches!(*method, Method::GET | Method::HEAD) {
            return Ok(());
        }
        let refused = || {
            RegistryError::OriginNotAllowed(
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
            hosts: vec!["roster.internal".into()],
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
            origins: vec!["https://console.example".into()],
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
