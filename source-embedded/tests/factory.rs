//! The `embedded` kind as a server builds it: registered, then built from a config table.

use std::path::PathBuf;
use std::time::Duration;

use registry_core::{
    OutputEvent, OutputRequest, RuntimeId, SourceConfig, SourceFactories, SpawnRequest, WorkerState,
};
use source_embedded::{EmbeddedConfig, EmbeddedSource, KIND};

fn table(text: &str) -> SourceConfig {
    SourceConfig {
        runtime_id: RuntimeId::new("local").unwrap(),
        table: text.parse().expect("test TOML parses"),
        state_dir: PathBuf::from("/nonexistent").into(),
    }
}

fn factories() -> SourceFactories {
    let mut factories = SourceFactories::new();
    factories
        .add::<EmbeddedSource>()
        .expect("first registration");
    factories
}

#[tokio::test]
async fn register_then_build_from_a_toml_table_gives_a_working_source() -> anyhow::Result<()> {
    let factories = factories();
    assert_eq!(factories.kinds(), [KIND]);
    let source = factories.build(
        "embedded",
        table(
            r#"
            max_workers = 4
            output_retention = "64KiB"
            retain_finished = "5m"
            grace = "2s"
            [profiles.shell]
            command = ["/bin/sh", "-c"]
            "#,
        ),
    )?;
    let worker = source
        .spawn(SpawnRequest {
            profile: Some("shell".into()),
            args: vec!["echo built".into()],
            ..Default::default()
        })
        .await?;
    let mut output = source
        .output(
            &worker.key,
            OutputRequest {
                after: 0,
                follow: true,
            },
        )
        .await?;
    let mut text = Vec::new();
    let mut ended = false;
    while let Some(event) = tokio::time::timeout(Duration::from_secs(10), output.recv()).await? {
        match event {
            OutputEvent::Chunk(chunk) => text.extend_from_slice(&chunk.data),
            OutputEvent::Gap { from, to } => panic!("unexpected gap {from}..={to}"),
            OutputEvent::End => ended = true,
        }
    }
    assert!(
        ended,
        "the output stream of an ended worker must end with End"
    );
    assert_eq!(text, b"built\n");
    assert_eq!(source.get(&worker.key).await?.state, WorkerState::Exited);
    source.shutdown(None).await;
    Ok(())
}

#[tokio::test]
async fn unknown_key_in_the_table_is_an_error_naming_it() {
    let err = factories()
        .build("embedded", table("max_workers = 4\nmax_wrokers = 5"))
        .unwrap_err();
    assert!(err.message.contains("max_wrokers"), "{err}");
    assert_eq!(err.runtime, "local");
    let err = factories()
        .build(
            "embedded",
            table("[profiles.shell]\ncommand = [\"/bin/sh\"]\ncwdd = \"/tmp\""),
        )
        .unwrap_err();
    assert!(err.message.contains("cwdd"), "{err}");
}

#[tokio::test]
async fn invalid_values_are_errors_that_say_what_is_wrong() {
    let err = factories()
        .build("embedded", table("grace = \"soon\""))
        .unwrap_err();
    assert!(err.message.contains("not a duration"), "{err}");
    let err = factories()
        .build("embedded", table("event_retention = 0"))
        .unwrap_err();
    assert!(err.message.contains("event_retention"), "{err}");
    let err = factories()
        .build("embedded", table("[profiles.empty]\ncommand = []"))
        .unwrap_err();
    assert!(err.message.contains("empty"), "{err}");
}

#[test]
fn registering_the_kind_twice_is_refused() {
    let mut factories = factories();
    let err = factories.add::<EmbeddedSource>().unwrap_err();
    assert_eq!(err.code(), "conflict");
    assert_eq!(factories.kinds(), [KIND]);
}

#[test]
fn config_defaults_match_the_contract() {
    let parsed: EmbeddedConfig = table("").parse().unwrap();
    assert_eq!(parsed, EmbeddedConfig::default());
    assert_eq!(parsed.output_retention, 1024 * 1024);
    assert_eq!(parsed.retain_finished, Duration::from_secs(3600));
    assert_eq!(parsed.grace, Duration::from_secs(10));
    assert!(!parsed.allow_commands);

    let parsed: EmbeddedConfig = table(
        "output_retention = \"64KiB\"\nretain_finished = \"5m\"\ngrace = \"1500ms\"\n\
         max_pending_input = 100\nallow_commands = true",
    )
    .parse()
    .unwrap();
    assert_eq!(parsed.output_retention, 64 * 1024);
    assert_eq!(parsed.retain_finished, Duration::from_secs(300));
    assert_eq!(parsed.grace, Duration::from_millis(1500));
    assert_eq!(parsed.max_pending_input, 100);
    assert!(parsed.allow_commands);
}
