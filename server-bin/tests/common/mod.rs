//! What the tests of this package share: testkit (the server on 127.0.0.1:0, its HTTP and SSE
//! clients, `eventually`), and the `roster` binary as a child process.
#![allow(dead_code, unused_imports)]

pub mod process;

pub use testkit::*;
