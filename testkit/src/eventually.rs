//! Waiting for a condition the way every test should: poll it until a deadline, never a
//! bare sleep, and fail with what was waited for.

use std::future::Future;
use std::time::Duration;

use anyhow::{bail, Result};
use tokio::time::{sleep, Instant};

/// How long a test waits for anything before it fails.
pub const WAIT: Duration = Duration::from_secs(15);

/// The pause between two looks at a polled condition.
pub const POLL: Duration = Duration::from_millis(20);

/// Polls `probe` every [`POLL`] until it gives `Some`, and returns that; fails after
/// `within` naming `what`, or at once when `probe` fails. The probe runs at least once,
/// also with a zero `within`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    poll(what, within, || {
        let look = probe();
        async move { Ok(look.await?.ok_or(None)) }
    })
    .await
}

/// [`eventually`] for a probe that says what it saw when it found nothing
/// (`Ok(Err(seen))`); the error after `within` ends with the last thing seen.
pub async fn eventually_seen<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<std::result::Result<T, String>>>,
{
    poll(what, within, || {
        let look = probe();
        async move { Ok(look.await?.map_err(Some)) }
    })
    .await
}

/// The one polling loop: `Ok(Err(seen))` is "not yet", with what was seen if anything.
async fn poll<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<std::result::Result<T, Option<String>>>>,
{
    let deadline = Instant::now() + within;
    loop {
        let seen = match probe().await? {
            Ok(found) => return Ok(found),
            Err(seen) => seen,
        };
        if Instant::now() >= deadline {
            match seen {
                Some(seen) => bail!("{what}: not within {within:?}; last seen: {seen}"),
                None => bail!("{what}: not within {within:?}"),
            }
        }
        sleep(POLL).await;
    }
}

/// [`eventually`] for a condition that is a plain `bool` to look at.
pub async fn eventually_sync(
    what: &str,
    within: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<()> {
    eventually(what, within, || {
        std::future::ready(Ok(cond().then_some(())))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn gives_what_the_probe_found_once_it_finds_it() {
        let mut looks = 0;
        let found = eventually("the third look", WAIT, || {
            looks += 1;
            std::future::ready(Ok((looks == 3).then_some(looks)))
        })
        .await
        .unwrap();
        assert_eq!(found, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn fails_after_the_deadline_naming_what_it_waited_for() {
        let err = eventually_sync("a thing that never happens", Duration::from_secs(1), || {
            false
        })
        .await
        .unwrap_err();
        assert!(
            err.to_string().contains("a thing that never happens"),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_probe_fails_at_once() {
        let err = eventually::<(), _, _>("x", WAIT, || {
            std::future::ready(Err(anyhow::anyhow!("broken")))
        })
        .await
        .unwrap_err();
        assert_eq!(err.to_string(), "broken");
    }
}
