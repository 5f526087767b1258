//! The worker's environment: cleared, then PATH/HOME/LANG, the profile's, the request's.
//!
//! In a test binary of its own, because it sets a variable of the test process.

mod common;

use std::collections::BTreeMap;

use anyhow::Result;
use common::*;
use worker_runtime::{Profile, Runtime, SpawnSpec, Stream};

#[tokio::test(flavor = "multi_thread")]
async fn the_hosts_environment_is_not_visible_but_the_profiles_is() -> Result<()> {
    std::env::set_var("ROSTER_TEST_SECRET", "host-secret-value");
    let mut config = config();
    config.profiles.insert(
        "with-env".into(),
        Profile {
            command: vec!["/bin/sh".into(), "-c".into()],
            env: BTreeMap::from([
                ("PROFILE_VAR".to_string(), "from-profile".to_string()),
                ("OVERRIDDEN".to_string(), "profile".to_string()),
            ])
            .into(),
            ..Default::default()
        },
    );
    let rt = Runtime::new(config)?;
    let w = rt
        .spawn(SpawnSpec {
            profile: Some("with-env".into()),
            args: vec![
                "echo secret=${ROSTER_TEST_SECRET:-unset} profile=$PROFILE_VAR \
                 request=$REQUEST_VAR overridden=$OVERRIDDEN path=${PATH:+set}"
                    .into(),
            ],
            env: BTreeMap::from([
                ("REQUEST_VAR".to_string(), "from-request".to_string()),
                ("OVERRIDDEN".to_string(), "request".to_string()),
            ])
            .into(),
            ..Default::default()
        })
        .await?;
    let out = String::from_utf8(stream_bytes(&read_to_end(&rt, w.id).await?, Stream::Stdout))?;
    assert_eq!(
        out,
        "secret=unset profile=from-profile request=from-request overridden=request path=set\n"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn descriptors_the_host_leaks_are_not_inherited_by_workers() -> Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open("/dev/null")?;
    // SAFETY: dup of an open fd; the copy (without close-on-exec) is closed below.
    let leaked = unsafe { libc::dup(file.as_raw_fd()) };
    assert!(leaked > 2);
    let rt = runtime();
    let w = rt
        .spawn(sh(&format!(
            "if [ -e /proc/$$/fd/{leaked} ]; then echo inherited; else echo clean; fi"
        )))
        .await?;
    let out = String::from_utf8(stream_bytes(&read_to_end(&rt, w.id).await?, Stream::Stdout))?;
    // SAFETY: closing the fd made above, which nothing else uses.
    unsafe { libc::close(leaked) };
    assert_eq!(out, "clean\n");
    Ok(())
}
