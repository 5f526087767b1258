//! A reload's new table for an `embedded` runtime: a change of profiles alone is taken in
//! place (new spawns use it, a running worker goes on); any other change asks for a new
//! runtime and changes nothing.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use registry_core::{
    OutputEvent, OutputRequest, RuntimeId, RuntimeSource, SourceConfig, SpawnRequest, WorkerState,
};
use source_embedded::{EmbeddedConfig, EmbeddedSource};

const WAIT: Duration = Duration::from_secs(10);

fn table(text: &str) -> Result<SourceConfig> {
    Ok(SourceConfig {
        runtime_id: RuntimeId::new("local")?,
        table: toml::from_str::<toml::Table>(text)?.into(),
        state_dir: PathBuf::from("/nonexistent").into(),
    })
}

fn spawn(profile: &str, args: &[&str]) -> SpawnRequest {
    SpawnRequest {
        profile: Some(profile.into()),
        args: args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    }
}

async fn all_output(source: &EmbeddedSource, key: &registry_core::SourceKey) -> Result<String> {
    let mut out = source
        .output(
            key,
            OutputRequest {
                after: 0,
                follow: true,
            },
        )
        .await?;
    let mut text = Vec::new();
    let read = async {
        while let Some(event) = out.recv().await {
            if let OutputEvent::Chunk(c) = event {
                text.extend_from_slice(&c.data);
            }
        }
    };
    tokio::time::timeout(WAIT, read).await?;
    Ok(String::from_utf8_lossy(&text).into_owned())
}

#[tokio::test]
async fn a_profile_change_applies_to_new_spawns_and_running_workers_go_on() -> Result<()> {
    const FIRST: &str = "[profiles.a]\ncommand = [\"/bin/sh\", \"-c\"]\n";
    let config: EmbeddedConfig = toml::from_str(FIRST)?;
    let source = EmbeddedSource::new(config)?;
    let long = source.spawn(spawn("a", &["sleep 30"])).await?;

    // `a` changed (an env added), `b` added.
    let next = "[profiles.a]\ncommand = [\"/bin/sh\", \"-c\"]\nenv = { WHO = \"new-a\" }\n\
                [profiles.b]\ncommand = [\"/bin/echo\", \"from-b\"]\n";
    assert!(source.reconfigure(&table(next)?).await?);

    let b = source.spawn(spawn("b", &[])).await?;
    assert_eq!(all_output(&source, &b.key).await?, "from-b\n");
    let a = source.spawn(spawn("a", &["echo $WHO"])).await?;
    assert_eq!(all_output(&source, &a.key).await?, "new-a\n");
    assert_eq!(source.get(&long.key).await?.state, WorkerState::Running);

    // A profile removed: new spawns can't use it; the running worker still goes on.
    let fewer = "[profiles.b]\ncommand = [\"/bin/echo\", \"from-b\"]\n";
    assert!(source.reconfigure(&table(fewer)?).await?);
    let err = source.spawn(spawn("a", &["true"])).await.unwrap_err();
    assert_eq!(err.code(), "invalid_request", "{err}");
    assert_eq!(source.get(&long.key).await?.state, WorkerState::Running);
    source.shutdown(Some(Duration::from_secs(1))).await;
    Ok(())
}

#[tokio::test]
async fn any_other_change_asks_for_a_new_runtime_and_changes_nothing() -> Result<()> {
    const FIRST: &str = "[profiles.a]\ncommand = [\"/bin/echo\", \"first\"]\n";
    let source = EmbeddedSource::new(toml::from_str(FIRST)?)?;
    let other = "max_workers = 3\n[profiles.a]\ncommand = [\"/bin/echo\", \"second\"]\n";
    assert!(!source.reconfigure(&table(other)?).await?);
    let a = source.spawn(spawn("a", &[])).await?;
    assert_eq!(all_output(&source, &a.key).await?, "first\n");
    // The same table again is taken (nothing to change).
    assert!(source.reconfigure(&table(FIRST)?).await?);
    source.shutdown(Some(Duration::from_secs(1))).await;
    Ok(())
}
