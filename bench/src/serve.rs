//! The daemons the bench runs as child processes of itself: Roster (as the `roster`
//! binary would, from a config file) and the bare hyper baseline.

use std::convert::Infallible;
use std::path::Path;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use server_bin::{Config, ServeOptions};
use tokio::net::TcpListener;

/// `serve-roster --config FILE`: what `roster serve --config FILE` does, but it binds
/// first and prints `listening ADDR` so that the config may say port 0.
pub async fn roster(config: &Path) -> Result<()> {
    let config = Config::load(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let tokens = config.load_tokens().map_err(|e| anyhow::anyhow!("{e}"))?;
    config
        .check_listen(&tokens)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let listener = TcpListener::bind(config.server.listen)
        .await
        .context("binding the listen address")?;
    let registry = server_bin::build_registry(&config, &server_bin::default_factories()).await?;
    println!("listening {}", listener.local_addr()?);
    let options = ServeOptions::from_config(&config.server, tokens);
    server_bin::serve_with(listener, registry, options, server_bin::shutdown_signal()).await
}

/// `bare-hyper --body FILE`: hyper 1.x on the same tokio runtime shape as Roster, answering
/// every request `200` with the file's bytes as JSON. The floor for `get`.
pub async fn bare_hyper(body: &Path) -> Result<()> {
    let bytes = Bytes::from(std::fs::read(body)?);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("listening {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let bytes = bytes.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_req| {
                let bytes = bytes.clone();
                async move {
                    let resp = http::Response::builder()
                        .header("content-type", "application/json")
                        .body(Full::new(bytes))
                        .expect("a static response");
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
