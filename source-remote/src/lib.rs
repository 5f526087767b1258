//! # source-remote
//!
//! A `RuntimeSource` over one runtime of another `roster` process, reached through its
//! public HTTP + SSE API: it lists, follows the event stream with resume, reconnects with
//! capped exponential backoff and jitter, and keeps worker ids stable across outages.
//!
//! Not built yet: this crate is a placeholder in the workspace until the remote source
//! lands (see the project README). It exports nothing.
#![warn(missing_docs)]
