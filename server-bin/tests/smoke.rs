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
