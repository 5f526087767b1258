//! # source-local
//!
//! A `RuntimeSource` over workers that an older launcher started on this host: it follows
//! descriptor files (`*.json`: pid, start time, optional name, input socket and log file)
//! in a spool directory, checks that each pid is still the same process, tails the log as
//! output, writes input to the socket and stops by signal. It cannot spawn.
//!
//! Not built yet: this crate is a placeholder in the workspace until the local source lands
//! (see the project README). It exports nothing.
#![warn(missing_docs)]
