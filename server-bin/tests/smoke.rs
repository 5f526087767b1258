//! The harness itself works: a spawn's output comes back over SSE.
mod common;

use common::TestServer;

#[tokio::test]
async fn echo_output_is_read_back_over_sse() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let id = server.spawn_shell("echo hello-roster").await?;
    let mut stream = server.sse(&format!("/v1/workers/{id}/output"), &[]).await?;
    let mut text = String::new();
    let mut last = None;
    for ev in stream.rest(common::WAIT).await? {
        if ev.event == "output" {
            text.push_str(ev.data["data"].as_str().unwrap_or_default());
        }
        last = Some(ev.event);
    }
    assert_eq!(text, "hello-roster\n");
    assert_eq!(last.as_deref(), Some("end"));
    server.stop().await?;
    Ok(())
}

/// The harness's own leak search can fail: a worker that prints the state directory puts it
/// in a body, and `stop` refuses.
#[tokio::test]
async fn the_harness_search_finds_what_a_client_got() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let dir = server.dir.path().display().to_string();
    let id = server.spawn_shell(&format!("echo '{dir}'")).await?;
    let mut stream = server.sse(&format!("/v1/workers/{id}/output"), &[]).await?;
    stream.rest(common::WAIT).await?;
    let err = server
        .stop()
        .await
        .expect_err("the search must see the path");
    assert!(err.to_string().contains(&dir), "{err}");
    Ok(())
}
