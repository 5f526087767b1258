//! Inputs found by trying to break the server: each once made it misbehave, and each test
//! failed before its fix.
mod common;

use anyhow::Result;
use common::TestServer;
use http::StatusCode;

const SPAWN: &str = "/v1/runtimes/local/workers";

#[tokio::test]
async fn names_ending_in_wide_characters_get_an_error_not_an_empty_reply() -> Result<()> {
    let server = TestServer::start().await?;
    for profile in ["¡", "b¡", "日本語", "«x»", "🎉"] {
        let body = serde_json::json!({ "profile": profile, "args": ["true"] }).to_string();
        let resp = server.post(SPAWN, &body).await?;
        assert_eq!(
            resp.status,
            StatusCode::BAD_REQUEST,
            "{profile}: {}",
            resp.text()
        );
        assert_eq!(resp.code(), "invalid_request", "{profile}: {}", resp.text());
        assert!(resp.text().contains(profile), "{profile}: {}", resp.text());
    }
    // The server keeps serving.
    let resp = server.get("/v1/runtimes").await?;
    assert_eq!(resp.status, StatusCode::OK);
    server.stop().await?;
    Ok(())
}
