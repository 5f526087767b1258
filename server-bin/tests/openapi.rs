//! `/v1/openapi.json` is kept true: every route served is documented, and every documented
//! route is served (the real server answers it with something other than "no such route").
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
