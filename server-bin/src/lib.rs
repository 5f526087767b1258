//! # server-bin
//!
//! The `roster` HTTP server as a library (`run`, `serve`) plus a thin `main`: the API of
//! the contract, Server-Sent Events streams, config, tokens and safe defaults.
//!
//! Not built yet: this crate is a placeholder in the workspace until the server lands
//! (see the project README). It exports nothing.
#![warn(missing_docs)]
