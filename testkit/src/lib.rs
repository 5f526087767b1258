//! # testkit
//!
//! What Roster's tests share, so that no test file writes it again: [`eventually`] (poll a
//! condition until a deadline), a real server on `127.0.0.1:0` ([`TestServer`]) with a
//! small HTTP client, an SSE client ([`SseClient`], parsing with `source-remote`'s parser),
//! and a configurable forwarding fake source ([`Fake`]).
//!
//! A dev-dependency of the workspace's test suites; not published.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let server = testkit::TestServer::start().await?;
//! let id = server.spawn_shell("echo hi").await?;
//! server.wait_worker(&id, |w| w["state"] == "exited").await?;
//! server.stop().await?;
//! # Ok(()) }
//! ```

mod eventually;
mod fake;
mod server;
mod sse;

pub use eventually::{eventually, eventually_seen, eventually_sync, POLL, WAIT};
pub use fake::Fake;
pub use server::{
    config, connect_from, header_bytes, request_to, send_request_on, send_request_to, send_to,
    shell_source, unique, Seen, TestResponse, TestServer,
};
pub use sse::{parse_events, SseClient, SseDecoder, SseEvent};
