//! A fake source for tests that forwards every trait method to a real source, with the
//! answers a test wants to change configured: capabilities switched off, a fixed health,
//! hooks that answer an operation instead of the real source, output streams held open
//! until shutdown (as an observing source's are), and a shutdown that never returns.

use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use registry_core::{
    Capabilities, OutputEvent, OutputRequest, OutputStream, RegistryError, RuntimeSource,
    SourceEvents, SourceHealth, SourceKey, SourceWorker, SpawnRequest,
};
use tokio::sync::mpsc;

/// A hook's answer: `Some` answers the call, `None` forwards it to the real source.
type Hook<A, T> = Box<dyn Fn(A) -> Option<Result<T, RegistryError>> + Send + Sync>;

/// The source `S` with some of its answers changed. Built with [`Fake::new`] and the
/// `with_…` methods; every method not changed is `S`'s own.
pub struct Fake<S> {
    inner: S,
    caps: Capabilities,
    health: Option<Box<dyn Fn() -> SourceHealth + Send + Sync>>,
    list: Option<Hook<(), Vec<SourceWorker>>>,
    stop: Option<Hook<Option<Duration>, ()>>,
    input: Option<Hook<Bytes, ()>>,
    remove: Option<Hook<(), ()>>,
    held_output: Option<Mutex<Vec<mpsc::Sender<OutputEvent>>>>,
    hang_on_shutdown: bool,
}

impl<S: RuntimeSource> Fake<S> {
    /// Forwards everything to `inner`.
    pub fn new(inner: S) -> Self {
        Fake {
            caps: inner.capabilities(),
            inner,
            health: None,
            list: None,
            stop: None,
            input: None,
            remove: None,
            held_output: None,
            hang_on_shutdown: false,
        }
    }

    /// The real source.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Switches capabilities off (`off` edits the real source's): the capabilities say so,
    /// and the operations answer `Unsupported` ("no spawn here", …) without reaching the
    /// real source, as a source that lacks them would.
    pub fn with_capabilities(mut self, off: impl FnOnce(&mut Capabilities)) -> Self {
        off(&mut self.caps);
        self
    }

    /// `health` answers what `health` makes, always.
    pub fn with_health(
        mut self,
        health: impl Fn() -> SourceHealth + Send + Sync + 'static,
    ) -> Self {
        self.health = Some(Box::new(health));
        self
    }

    /// `list` asks `hook` first.
    pub fn with_list(
        mut self,
        hook: impl Fn() -> Option<Result<Vec<SourceWorker>, RegistryError>> + Send + Sync + 'static,
    ) -> Self {
        self.list = Some(Box::new(move |()| hook()));
        self
    }

    /// `stop` asks `hook` (with the grace) first.
    pub fn with_stop(
        mut self,
        hook: impl Fn(Option<Duration>) -> Option<Result<(), RegistryError>> + Send + Sync + 'static,
    ) -> Self {
        self.stop = Some(Box::new(hook));
        self
    }

    /// `input` asks `hook` (with the bytes) first.
    pub fn with_input(
        mut self,
        hook: impl Fn(Bytes) -> Option<Result<(), RegistryError>> + Send + Sync + 'static,
    ) -> Self {
        self.input = Some(Box::new(hook));
        self
    }

    /// `remove` asks `hook` first.
    pub fn with_remove(
        mut self,
        hook: impl Fn() -> Option<Result<(), RegistryError>> + Send + Sync + 'static,
    ) -> Self {
        self.remove = Some(Box::new(move |()| hook()));
        self
    }

    /// `output` of a worker the real source knows is a stream that sends nothing and ends
    /// (without `End`) only when the source shuts down, as an observing source lets go of
    /// its connections.
    pub fn with_held_output(mut self) -> Self {
        self.held_output = Some(Mutex::new(Vec::new()));
        self
    }

    /// `shutdown` ends the held output streams and then never returns (an upstream that
    /// does not answer).
    pub fn with_hanging_shutdown(mut self) -> Self {
        self.hang_on_shutdown = true;
        self
    }

    fn check(&self, has: bool, what: &str) -> Result<(), RegistryError> {
        if has {
            Ok(())
        } else {
            Err(RegistryError::Unsupported(format!("no {what} here")))
        }
    }
}

impl<S> fmt::Debug for Fake<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fake")
            .field("caps", &self.caps)
            .field("health", &self.health.is_some())
            .field("list", &self.list.is_some())
            .field("stop", &self.stop.is_some())
            .field("input", &self.input.is_some())
            .field("remove", &self.remove.is_some())
            .field("held_output", &self.held_output.is_some())
            .field("hang_on_shutdown", &self.hang_on_shutdown)
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl<S: RuntimeSource> RuntimeSource for Fake<S> {
    fn capabilities(&self) -> Capabilities {
        self.caps
    }
    async fn health(&self) -> SourceHealth {
        match &self.health {
            Some(health) => health(),
            None => self.inner.health().await,
        }
    }
    async fn list(&self) -> Result<Vec<SourceWorker>, RegistryError> {
        if let Some(answer) = self.list.as_ref().and_then(|hook| hook(())) {
            return answer;
        }
        self.inner.list().await
    }
    async fn get(&self, key: &SourceKey) -> Result<SourceWorker, RegistryError> {
        self.inner.get(key).await
    }
    async fn spawn(&self, request: SpawnRequest) -> Result<SourceWorker, RegistryError> {
        self.check(self.caps.spawn, "spawn")?;
        self.inner.spawn(request).await
    }
    async fn stop(&self, key: &SourceKey, grace: Option<Duration>) -> Result<(), RegistryError> {
        self.check(self.caps.stop, "stop")?;
        if let Some(answer) = self.stop.as_ref().and_then(|hook| hook(grace)) {
            return answer;
        }
        self.inner.stop(key, grace).await
    }
    async fn input(&self, key: &SourceKey, data: Bytes) -> Result<(), RegistryError> {
        self.check(self.caps.input, "input")?;
        if let Some(answer) = self.input.as_ref().and_then(|hook| hook(data.clone())) {
            return answer;
        }
        self.inner.input(key, data).await
    }
    async fn remove(&self, key: &SourceKey) -> Result<(), RegistryError> {
        self.check(self.caps.remove, "removal")?;
        if let Some(answer) = self.remove.as_ref().and_then(|hook| hook(())) {
            return answer;
        }
        self.inner.remove(key).await
    }
    async fn events(&self) -> Result<SourceEvents, RegistryError> {
        self.inner.events().await
    }
    async fn output(
        &self,
        key: &SourceKey,
        request: OutputRequest,
    ) -> Result<OutputStream, RegistryError> {
        self.check(self.caps.output, "output")?;
        if let Some(held) = &self.held_output {
            self.inner.get(key).await?;
            let (tx, rx) = mpsc::channel(16);
            held.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
            return Ok(rx);
        }
        self.inner.output(key, request).await
    }
    async fn shutdown(&self, grace: Option<Duration>) {
        if let Some(held) = &self.held_output {
            // Lets go of its connections: every output stream ends.
            held.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
        if self.hang_on_shutdown {
            std::future::pending::<()>().await;
        }
        self.inner.shutdown(grace).await;
    }
}
