//! The routing table: every route the server serves, in one place.
//!
//! The table is the single source of truth: the dispatcher, the `405` answers, the metrics'
//! route labels and the OpenAPI test all read it.

use http::Method;

use crate::auth::Scope;

/// What a route does. `dispatch` in `api.rs` maps each to its handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /`: the web console.
    Console,
    /// `GET` or `HEAD /healthz`.
    Healthz,
    /// `GET` or `HEAD /readyz`.
    Readyz,
    /// `GET /metrics`.
    Metrics,
    /// `GET /v1/openapi.json`.
    OpenApi,
    /// `GET /v1/runtimes`.
    ListRuntimes,
    /// `GET /v1/runtimes/{runtime_id}`.
    GetRuntime,
    /// `GET /v1/runtimes/{runtime_id}/profiles`.
    Profiles,
    /// `POST /v1/runtimes/{runtime_id}/workers`.
    Spawn,
    /// `GET /v1/workers`.
    ListWorkers,
    /// `GET /v1/workers/{worker_id}`.
    GetWorker,
    /// `DELETE /v1/workers/{worker_id}`.
    RemoveWorker,
    /// `POST /v1/workers/{worker_id}/input`.
    Input,
    /// `POST /v1/workers/{worker_id}/stop`.
    Stop,
    /// `GET /v1/workers/{worker_id}/output` (SSE).
    Output,
    /// `GET /v1/events` (SSE).
    Events,
    /// `POST /v1/admin/reload`: read the config file again.
    Reload,
}

/// Who may call a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone who reaches the port with an allowed `Host` (liveness, the static console page,
    /// the API document): these reveal nothing about workers.
    Open,
    /// A token of at least this scope, when tokens are configured.
    Token(Scope),
}

/// One row of the table.
#[derive(Clone, Debug)]
pub struct Route {
    /// The method.
    pub method: Method,
    /// The path template; `{name}` matches one non-empty segment.
    pub template: &'static str,
    /// What it does.
    pub endpoint: Endpoint,
    /// Who may call it.
    pub access: Access,
}

const READ: Access = Access::Token(Scope::Read);
const OPERATE: Access = Access::Token(Scope::Operate);

const fn route(
    method: Method,
    template: &'static str,
    endpoint: Endpoint,
    access: Access,
) -> Route {
    Route {
        method,
        template,
        endpoint,
        access,
    }
}

/// Every route of the API (SPEC §4).
#[rustfmt::skip]
pub const ROUTES: &[Route] = &[
    route(Method::GET,    "/",                                       Endpoint::Console,      Access::Open),
    route(Method::GET,    "/healthz",                                Endpoint::Healthz,      Access::Open),
    route(Method::HEAD,   "/healthz",                                Endpoint::Healthz,      Access::Open),
    route(Method::GET,    "/readyz",                                 Endpoint::Readyz,       Access::Open),
    route(Method::HEAD,   "/readyz",                                 Endpoint::Readyz,       Access::Open),
    route(Method::GET,    "/metrics",                                Endpoint::Metrics,      READ),
    route(Method::GET,    "/v1/openapi.json",                        Endpoint::OpenApi,      Access::Open),
    route(Method::GET,    "/v1/runtimes",                            Endpoint::ListRuntimes, READ),
    route(Method::GET,    "/v1/runtimes/{runtime_id}",               Endpoint::GetRuntime,   READ),
    route(Method::GET,    "/v1/runtimes/{runtime_id}/profiles",      Endpoint::Profiles,     READ),
    route(Method::POST,   "/v1/runtimes/{runtime_id}/workers",       Endpoint::Spawn,        OPERATE),
    route(Method::GET,    "/v1/workers",                             Endpoint::ListWorkers,  READ),
    route(Method::GET,    "/v1/workers/{worker_id}",                 Endpoint::GetWorker,    READ),
    route(Method::DELETE, "/v1/workers/{worker_id}",                 Endpoint::RemoveWorker, OPERATE),
    route(Method::POST,   "/v1/workers/{worker_id}/input",           Endpoint::Input,        OPERATE),
    route(Method::POST,   "/v1/workers/{worker_id}/stop",            Endpoint::Stop,         OPERATE),
    route(Method::GET,    "/v1/workers/{worker_id}/output",          Endpoint::Output,       READ),
    route(Method::GET,    "/v1/events",                              Endpoint::Events,       READ),
    // `operate`, the strongest scope there is: whoever may start processes may change the
    // runtimes they run in.
    route(Method::POST,   "/v1/admin/reload",                        Endpoint::Reload,       OPERATE),
];

/// The route label of a request that matched no template.
pub const UNMATCHED: &str = "unmatched";

/// What the table says about a request.
#[derive(Debug)]
pub enum Resolution<'p> {
    /// A route matched; the template's `{…}` segments in order.
    Found(&'static Route, Vec<&'p str>),
    /// The path exists, but not with this method; the allowed methods.
    WrongMethod(&'static str, Vec<Method>),
    /// No template matches the path.
    NotFound,
}

/// Looks a request up in [`ROUTES`].
pub fn resolve<'p>(method: &Method, path: &'p str) -> Resolution<'p> {
    let mut allowed = Vec::new();
    let mut template = None;
    for route in ROUTES {
        let Some(params) = matches(route.template, path) else {
            continue;
        };
        if route.method == *method {
            return Resolution::Found(route, params);
        }
        template.get_or_insert(route.template);
        allowed.push(route.method.clone());
    }
    match template {
        Some(t) => Resolution::WrongMethod(t, allowed),
        None => Resolution::NotFound,
    }
}

fn matches<'p>(template: &str, path: &'p str) -> Option<Vec<&'p str>> {
    if template == "/" {
        return (path == "/").then(Vec::new);
    }
    let mut params = Vec::new();
    let mut want = template.split('/');
    let mut have = path.split('/');
    loop {
        match (want.next(), have.next()) {
            (None, None) => return Some(params),
            (Some(w), Some(h)) if w.starts_with('{') && !h.is_empty() => params.push(h),
            (Some(w), Some(h)) if w == h => {}
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_whole_segments_only() {
        let Resolution::Found(r, p) = resolve(&Method::GET, "/v1/workers/w_1/output") else {
            panic!("no match");
        };
        assert_eq!(r.endpoint, Endpoint::Output);
        assert_eq!(p, vec!["w_1"]);
        assert!(matches!(
            resolve(&Method::GET, "/v1/workers/"),
            Resolution::NotFound
        ));
        assert!(matches!(
            resolve(&Method::GET, "/v1/workers/a/b/c"),
            Resolution::NotFound
        ));
        assert!(matches!(
            resolve(&Method::GET, "/v1/runtimes/"),
            Resolution::NotFound
        ));
        assert!(matches!(resolve(&Method::GET, ""), Resolution::NotFound));
    }

    #[test]
    fn a_known_path_with_another_method_lists_the_allowed_ones() {
        match resolve(&Method::PUT, "/v1/workers/w_1") {
            Resolution::WrongMethod(t, allowed) => {
                assert_eq!(t, "/v1/workers/{worker_id}");
                assert_eq!(allowed, vec![Method::GET, Method::DELETE]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_route_is_unique() {
        for (i, a) in ROUTES.iter().enumerate() {
            for b in &ROUTES[i + 1..] {
                assert!(
                    !(a.method == b.method && a.template == b.template),
                    "{} {} twice",
                    a.method,
                    a.template
                );
            }
        }
    }
}
