//! Bounds on one spawn request and on a stop's grace period.
//!
//! They keep the memory one request costs bounded: [`Runtime::spawn`](crate::Runtime::spawn)
//! refuses a request beyond them with
//! [`RuntimeError::InvalidRequest`](crate::RuntimeError::InvalidRequest), whose message names
//! the field (never its value). Bytes are counted as the UTF-8 length of each string.

use std::time::Duration;

/// Longest single argv entry (of `command` or `args`): the kernel's own limit per string.
pub const MAX_ARG_BYTES: usize = 128 << 10;

/// Most bytes of `command`, `args` and `env` together; an `env` entry counts its name and
/// its value.
pub const MAX_ARGV_BYTES: usize = 256 << 10;

/// Longest initial `stdin` text.
pub const MAX_STDIN_BYTES: usize = 1 << 20;

/// Longest `name`, `request_id`, label key and label value.
pub const MAX_SHORT_TEXT: usize = 256;

/// Most labels.
pub const MAX_LABELS: usize = 64;

/// Longest grace period between SIGTERM and SIGKILL: one day. A longer one (from a stop, a
/// profile or the config) is cut to this, whether the worker is starting or running.
pub const MAX_GRACE: Duration = Duration::from_secs(24 * 60 * 60);
