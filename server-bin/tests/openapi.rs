//! `/v1/openapi.json` is kept true: every route served is documented, and every documented
//! route is served (the real server answers it with something other than "no such route");
//! its references resolve, and its error codes and states are the core's.
mod common;

use std::collections::BTreeSet;

use anyhow::{Context as _, Result};
use common::TestServer;
use http::Method;
use serde_json::Value;
use server_bin::routes::ROUTES;

fn documented(doc: &Value) -> Result<BTreeSet<(String, String)>> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().context("paths")? {
        for method in ["get", "post", "put", "patch", "delete", "head", "options"] {
            if item.get(method).is_some() {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    Ok(out)
}

fn served() -> BTreeSet<(String, String)> {
    ROUTES
        .iter()
        .map(|r| (r.method.to_string(), r.template.to_string()))
        .collect()
}

#[test]
fn every_served_route_is_documented_and_every_documented_route_is_served() -> Result<()> {
    let doc: Value = serde_json::from_str(server_bin::OPENAPI)?;
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    let documented = documented(&doc)?;
    let served = served();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "served but not documented: {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "documented but not served: {unserved:?}"
    );
    Ok(())
}

#[tokio::test]
async fn the_served_document_is_the_one_the_server_routes_by() -> Result<()> {
    let server = TestServer::start().await?;
    let resp = server.get("/v1/openapi.json").await?;
    assert_eq!(resp.status, 200);
    let doc = resp.json()?;
    let id = server.spawn_shell("true").await?;
    server.wait_worker(&id, |w| w["state"] == "exited").await?;
    for (method, template) in documented(&doc)? {
        let path = template
            .replace("{runtime_id}", "local")
            .replace("{worker_id}", &id);
        let method: Method = method.parse()?;
        let body = (method == Method::POST).then_some("{}");
        // Only the status and the code matter: streams are not read to their end.
        let resp = server.send(method.clone(), &path, &[], body).await?;
        let status = resp.status();
        let code = if status.is_success() {
            String::new()
        } else {
            let bytes = http_body_util::BodyExt::collect(resp.into_body())
                .await?
                .to_bytes();
            let v: Value = serde_json::from_slice(&bytes)?;
            v["error"]["code"].as_str().unwrap_or_default().to_string()
        };
        assert_ne!(code, "route_not_found", "{method} {path}");
        assert_ne!(status, 405, "{method} {path}");
    }
    // And an undocumented path is not served.
    assert_eq!(server.get("/v1/nothing").await?.code(), "route_not_found");
    server.stop().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The document itself
// ---------------------------------------------------------------------------------------

fn doc() -> Value {
    serde_json::from_str(server_bin::OPENAPI).expect("openapi.json is JSON")
}

fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                if k == "$ref" {
                    out.push(v.as_str().expect("a $ref is a string"));
                } else {
                    refs(v, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[test]
fn every_ref_resolves() {
    let doc = doc();
    assert_eq!(doc["openapi"], "3.0.3");
    assert_eq!(doc["info"]["title"], "Roster");
    assert_eq!(doc["info"]["version"], "0.1.0");
    let mut found = Vec::new();
    refs(&doc, &mut found);
    assert!(found.len() > 20, "{}", found.len());
    for r in found {
        let pointer = r
            .strip_prefix("#/components/")
            .unwrap_or_else(|| panic!("{r} is not a local component"));
        let target = doc["components"].pointer(&format!("/{pointer}"));
        assert!(target.is_some_and(Value::is_object), "{r} does not resolve");
    }
}

#[test]
fn the_paths_are_the_api() {
    let doc = doc();
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if method != "parameters" {
                ops.insert(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    let want: BTreeSet<String> = [
        "GET /v1/runtimes",
        "GET /v1/runtimes/{runtime_id}",
        "GET /v1/runtimes/{runtime_id}/profiles",
        "POST /v1/runtimes/{runtime_id}/workers",
        "GET /v1/workers",
        "GET /v1/workers/{worker_id}",
        "DELETE /v1/workers/{worker_id}",
        "POST /v1/workers/{worker_id}/input",
        "POST /v1/workers/{worker_id}/stop",
        "GET /v1/workers/{worker_id}/output",
        "GET /v1/events",
        "POST /v1/admin/reload",
        "GET /healthz",
        "HEAD /healthz",
        "GET /readyz",
        "HEAD /readyz",
        "GET /metrics",
        "GET /v1/openapi.json",
        "GET /",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(ops, want);
}

#[test]
fn errors_are_the_error_schema_with_the_contract_codes() {
    let doc = doc();
    let codes: Vec<&str> = doc["components"]["schemas"]["Error"]["properties"]["error"]
        ["properties"]["code"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let table: Vec<&str> = server_bin::ERRORS.iter().map(|(code, _)| *code).collect();
    assert_eq!(codes, table);
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            assert!(op["operationId"].is_string(), "{method} {path}");
            for (status, resp) in op["responses"].as_object().unwrap() {
                if status.starts_with('4') || status.starts_with('5') {
                    let mut found = Vec::new();
                    refs(resp, &mut found);
                    let is_error = |r: &&str| {
                        *r == "#/components/schemas/Error"
                            || r.starts_with("#/components/responses/")
                    };
                    assert!(
                        !found.is_empty() && found.iter().all(is_error),
                        "{method} {path} {status}"
                    );
                    checked += 1;
                }
            }
        }
    }
    for (name, resp) in doc["components"]["responses"].as_object().unwrap() {
        assert_eq!(
            resp["content"]["application/json"]["schema"]["$ref"], "#/components/schemas/Error",
            "{name}"
        );
    }
    assert!(checked > 15, "{checked}");
}

#[test]
fn the_states_match_the_model() {
    let doc = doc();
    let states: Vec<&str> = doc["components"]["schemas"]["WorkerState"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let model: Vec<&str> = registry_core::WorkerState::ALL
        .iter()
        .map(|s| s.as_str())
        .collect();
    assert_eq!(states, model);
}
