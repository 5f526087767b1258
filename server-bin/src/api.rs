//! The handlers of the API: one function per endpoint, and `dispatch`, which maps the routing
//! table's endpoints onto them.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, LOCATION};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use registry_core::limits::MAX_SHORT_TEXT;
use registry_core::{
    HealthState, RegistryError, RuntimeId, SpawnRequest, WorkerFilter, WorkerId, WorkerState,
    WorkerView, MAX_PAGE,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::error::ApiError;
use crate::routes::Endpoint;
use crate::server::{App, ConnAbort};
use crate::sse;
use crate::wire::{self as h, Body};

/// Default page size of `GET /v1/workers`.
const DEFAULT_LIMIT: usize = 100;

/// The web console (one static page).
const CONSOLE: &str = include_str!("console.html");
/// The API document.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Runs the handler of `endpoint`. `params` are the route template's `{…}` segments.
pub async fn dispatch(
    app: &Arc<App>,
    endpoint: Endpoint,
    params: &[String],
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let param = |i: usize| params.get(i).map(String::as_str).unwrap_or_default();
    match endpoint {
        Endpoint::Console => Ok(h::with_type(
            StatusCode::OK,
            "text/html; charset=utf-8",
            CONSOLE,
        )),
        Endpoint::Healthz => Ok(h::json(StatusCode::OK, &json!({ "status": "ok" }))),
        Endpoint::Readyz => readyz(app),
        Endpoint::Metrics => Ok(h::with_type(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            app.metrics.render(&app.registry),
        )),
        Endpoint::OpenApi => Ok(h::with_type(StatusCode::OK, "application/json", OPENAPI)),
        Endpoint::ListRuntimes => {
            no_query(&req)?;
            Ok(h::json(
                StatusCode::OK,
                &json!({ "runtimes": app.registry.runtimes() }),
            ))
        }
        Endpoint::GetRuntime => {
            no_query(&req)?;
            let id = runtime_id(param(0))?;
            Ok(h::json(StatusCode::OK, &app.registry.runtime(&id)?))
        }
        Endpoint::Profiles => {
            no_query(&req)?;
            let id = runtime_id(param(0))?;
            let profiles = app.registry.profiles(&id).await?;
            Ok(h::json(StatusCode::OK, &json!({ "profiles": profiles })))
        }
        Endpoint::Spawn => spawn(app, param(0), req).await,
        Endpoint::ListWorkers => list_workers(app, &req),
        Endpoint::GetWorker => {
            no_query(&req)?;
            Ok(h::json(
                StatusCode::OK,
                &*app.registry.worker_shared(&worker_id(param(0))?)?,
            ))
        }
        Endpoint::RemoveWorker => {
            no_query(&req)?;
            app.registry.remove(&worker_id(param(0))?).await?;
            let mut resp = Response::new(h::empty());
            *resp.status_mut() = StatusCode::NO_CONTENT;
            Ok(resp)
        }
        Endpoint::Input => input(app, param(0), req).await,
        Endpoint::Stop => stop(app, param(0), req).await,
        Endpoint::Output => output(app, param(0), &req).await,
        Endpoint::Events => events(app, &req),
        Endpoint::Reload => reload(app, req).await,
    }
}

/// The reload body: none, or `{}` (there are no options yet).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReloadBody {}

async fn reload(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    no_query(&req)?;
    let _: Option<ReloadBody> = json_body(app, req, true).await?;
    let outcome = crate::reload::reload(app).await?;
    Ok(h::json(StatusCode::OK, &outcome))
}

fn readyz(app: &Arc<App>) -> Result<Response<Body>, ApiError> {
    if app.is_stopping() {
        return Err(RegistryError::unavailable("the server is shutting down", None).into());
    }
    if app.registry.is_ready() {
        Ok(h::json(StatusCode::OK, &json!({ "status": "ready" })))
    } else {
        Err(RegistryError::unavailable(
            "a runtime has not answered its first connection yet",
            Some(Duration::from_secs(1)),
        )
        .into())
    }
}

/// A runtime id from the path. A name that can't be a runtime id names no runtime.
fn runtime_id(text: &str) -> Result<RuntimeId, RegistryError> {
    RuntimeId::new(text).map_err(|_| not_a_runtime(text))
}

fn not_a_runtime(text: &str) -> RegistryError {
    RegistryError::RuntimeNotFound(format!("no runtime is named {:?}", shorten(text)))
}

/// A worker id from the path; a malformed one is `worker_not_found` with a message that says
/// what ids look like.
fn worker_id(text: &str) -> Result<WorkerId, RegistryError> {
    text.parse()
}

fn shorten(text: &str) -> String {
    text.chars().take(64).collect()
}

/// The query's pairs, decoded; a name outside `known` is `invalid_request`.
fn query(req: &Request<Incoming>, known: &[&str]) -> Result<Vec<(String, String)>, RegistryError> {
    let pairs: Vec<(String, String)> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
    for (k, _) in &pairs {
        if !known.contains(&k.as_str()) {
            let takes = if known.is_empty() {
                "no query parameters".to_string()
            } else {
                known
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(RegistryError::InvalidRequest(format!(
                "unknown query parameter `{}`; this route takes {takes}",
                shorten(k)
            )));
        }
    }
    Ok(pairs)
}

fn no_query(req: &Request<Incoming>) -> Result<(), RegistryError> {
    query(req, &[]).map(drop)
}

/// The one value of a parameter that may be given once.
fn single<'a>(pairs: &'a [(String, String)], name: &str) -> Result<Option<&'a str>, RegistryError> {
    let mut values = pairs
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str());
    let first = values.next();
    if values.next().is_some() {
        return Err(RegistryError::InvalidRequest(format!(
            "query parameter `{name}` is given more than once"
        )));
    }
    Ok(first)
}

/// Reads the request's JSON body into `T` (see [`h::parse_json`]); `None` only for an absent
/// body where it is `optional`.
async fn json_body<T: DeserializeOwned>(
    app: &Arc<App>,
    req: Request<Incoming>,
    optional: bool,
) -> Result<Option<T>, ApiError> {
    let (parts, body) = req.into_parts();
    let bytes = h::read_body(
        &parts.headers,
        body,
        app.options.max_body,
        app.options.body_timeout,
    )
    .await?;
    // Shutdown may have begun while the body arrived: nothing changes from now on.
    if app.is_stopping() {
        return Err(RegistryError::unavailable("the server is shutting down", None).into());
    }
    h::parse_json(&parts.headers, &bytes, optional)
}

/// [`json_body`] for a body that must be there.
async fn required_body<T: DeserializeOwned>(
    app: &Arc<App>,
    req: Request<Incoming>,
) -> Result<T, ApiError> {
    json_body(app, req, false)
        .await?
        .ok_or_else(|| ApiError::InvalidJson("the request body is empty".into()))
}

async fn spawn(
    app: &Arc<App>,
    runtime: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    no_query(&req)?;
    let runtime = runtime_id(runtime)?;
    // The runtime must exist before its body is worth reading.
    app.registry.runtime(&runtime)?;
    let request: SpawnRequest = required_body(app, req).await?;
    let worker = app.registry.spawn(&runtime, request).await?;
    let mut resp = h::json(StatusCode::CREATED, &worker);
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/workers/{}", worker.id)) {
        resp.headers_mut().insert(LOCATION, location);
    }
    Ok(resp)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputBody {
    data: String,
}

async fn input(
    app: &Arc<App>,
    id: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    no_query(&req)?;
    let id = worker_id(id)?;
    let input: InputBody = required_body(app, req).await?;
    let n = input.data.len();
    app.registry.input(&id, Bytes::from(input.data)).await?;
    Ok(h::json(
        StatusCode::ACCEPTED,
        &json!({ "accepted_bytes": n }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StopBody {
    #[serde(default)]
    grace_ms: Option<u64>,
}

/// The longest grace a stop may ask for (the core's, a day): longer is surely a mistake.
const MAX_GRACE_MS: u64 = registry_core::limits::MAX_GRACE.as_secs() * 1000;

async fn stop(
    app: &Arc<App>,
    id: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    no_query(&req)?;
    let id = worker_id(id)?;
    let stop: Option<StopBody> = json_body(app, req, true).await?;
    let grace = match stop.and_then(|s| s.grace_ms) {
        Some(ms) if ms > MAX_GRACE_MS => {
            return Err(RegistryError::InvalidRequest(format!(
                "`grace_ms` must be at most {MAX_GRACE_MS}"
            ))
            .into())
        }
        Some(ms) => Some(Duration::from_millis(ms)),
        None => None,
    };
    let worker = app.registry.stop(&id, grace).await?;
    Ok(h::json(StatusCode::ACCEPTED, &worker))
}

fn list_workers(app: &Arc<App>, req: &Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let pairs = query(
        req,
        &[
            "runtime", "state", "label", "name", "q", "limit", "page", "health",
        ],
    )?;
    let mut filter = WorkerFilter::default();
    if let Some(r) = single(&pairs, "runtime")? {
        let id = runtime_id(r)?;
        app.registry.runtime(&id)?;
        filter.runtime = Some(id);
    }
    // One state, or several separated by commas (`running,starting`): any of them.
    if let Some(list) = single(&pairs, "state")? {
        for s in list.split(',') {
            let state = WorkerState::parse(s.trim())?;
            if !filter.states.contains(&state) {
                filter.states.push(state);
            }
        }
    }
    if let Some(h) = single(&pairs, "health")? {
        filter.health = Some(HealthState::parse(h)?);
    }
    for (field, value) in [
        ("name", single(&pairs, "name")?),
        ("q", single(&pairs, "q")?),
    ] {
        if value.is_some_and(|v| v.chars().count() > MAX_SHORT_TEXT) {
            return Err(RegistryError::InvalidRequest(format!(
                "`{field}` is longer than {MAX_SHORT_TEXT} characters"
            ))
            .into());
        }
    }
    filter.name = single(&pairs, "name")?.map(str::to_string);
    filter.text = single(&pairs, "q")?
        .filter(|q| !q.is_empty())
        .map(str::to_string);
    // Every label must match: `label=team=a&label=team=b` matches nothing.
    for (_, label) in pairs.iter().filter(|(k, _)| k == "label") {
        let (k, v) = label.split_once('=').ok_or_else(|| {
            RegistryError::InvalidRequest(format!(
                "`label` must look like key=value, not {:?}",
                shorten(label)
            ))
        })?;
        if !filter.labels.iter().any(|(fk, fv)| fk == k && fv == v) {
            filter.labels.push((k.to_string(), v.to_string()));
        }
    }
    let limit = match single(&pairs, "limit")? {
        Some(l) => l.parse::<usize>().map_err(|_| {
            RegistryError::InvalidRequest(format!(
                "`limit` must be a number between 1 and {MAX_PAGE}"
            ))
        })?,
        None => DEFAULT_LIMIT,
    };
    let page = app
        .registry
        .list_shared(&filter, limit, single(&pairs, "page")?)?;
    // Serialized once, straight from the shared views.
    #[derive(Serialize)]
    struct PageBody<'a> {
        workers: Vec<&'a WorkerView>,
        next_page: Option<&'a str>,
    }
    Ok(h::json(
        StatusCode::OK,
        &PageBody {
            workers: page.workers.iter().map(|w| &**w).collect(),
            next_page: page.next_page.as_deref(),
        },
    ))
}

/// The request's `Last-Event-ID`, where it holds more than whitespace: an empty one is the
/// same as none, so the query's `after` or `cursor` is read.
fn last_event_id(req: &Request<Incoming>) -> Option<&hyper::header::HeaderValue> {
    req.headers()
        .get("last-event-id")
        .filter(|v| !v.as_bytes().iter().all(u8::is_ascii_whitespace))
}

async fn output(
    app: &Arc<App>,
    id: &str,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let pairs = query(req, &["after", "follow"])?;
    let id = worker_id(id)?;
    // Seqs are int64 in the document: a number past i64::MAX is refused like any other
    // that names no seq, not read as a u64 the document doesn't allow.
    let seq = |text: &str, what: &str| {
        text.parse::<i64>()
            .ok()
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| {
                RegistryError::InvalidRequest(format!(
                    "{what} must be an output seq (a whole number from 0), not {:?}",
                    shorten(text)
                ))
            })
    };
    // The header wins: a browser resends it on reconnect while the URL keeps its first `after`.
    // A header that names no seq of this worker (malformed, or from before a restart) is
    // answered from the start of what is retained, as for every resume that can't be served;
    // a malformed `after`, which a client wrote itself, is refused.
    // An empty `Last-Event-ID` is no id (as in the SSE standard's reconnection): `after` rules.
    let (after, from_start_if_unknown) = match last_event_id(req) {
        Some(v) => (
            v.to_str()
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok())
                .unwrap_or(0),
            true,
        ),
        None => match single(&pairs, "after")? {
            Some(a) => (seq(a, "`after`")?, false),
            None => (0, false),
        },
    };
    let follow = match single(&pairs, "follow")? {
        None | Some("1") => true,
        Some("0") => false,
        Some(other) => {
            return Err(RegistryError::InvalidRequest(format!(
                "`follow` must be 0 or 1, not {:?}",
                shorten(other)
            ))
            .into())
        }
    };
    let abort = req.extensions().get::<ConnAbort>().cloned();
    Ok(sse::output(app, id, after, follow, from_start_if_unknown, abort).await?)
}

fn events(app: &Arc<App>, req: &Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let pairs = query(req, &["runtime", "cursor"])?;
    let runtime = match single(&pairs, "runtime")? {
        Some(r) => {
            let id = runtime_id(r)?;
            app.registry.runtime(&id)?;
            Some(id)
        }
        None => None,
    };
    // The header wins, as for output. A malformed cursor is answered in the stream (reset).
    let cursor = match last_event_id(req) {
        Some(v) => Some(v.to_str().unwrap_or("").to_string()),
        None => single(&pairs, "cursor")?.map(str::to_string),
    };
    let abort = req.extensions().get::<ConnAbort>().cloned();
    Ok(sse::events(app, cursor.as_deref(), runtime, abort))
}
