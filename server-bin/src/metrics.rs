//! Placeholder metrics (replaced by the full module).
#![allow(missing_docs, dead_code)]
use std::sync::Arc;
use std::time::Duration;
#[derive(Debug, Default)]
pub struct Metrics;
#[derive(Debug)]
pub struct StreamGuard;
impl Metrics {
    pub fn new() -> Metrics {
        Metrics
    }
    pub fn observe_request(&self, _m: &http::Method, _r: &'static str, _s: u16, _e: Duration) {}
    pub fn stream_opened(self: &Arc<Self>, _s: &'static str) -> StreamGuard {
        StreamGuard
    }
    pub fn render(&self, _r: &registry_core::Registry) -> String {
        String::new()
    }
}
