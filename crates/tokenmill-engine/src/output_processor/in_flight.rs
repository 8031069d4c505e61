//! The bound on requests accepted and not yet finished.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// One request's place in the in-flight count. It is claimed when the
/// request is accepted and travels with the request's output; dropping it
/// (when the request is billed, whatever path that ends by) gives the place
/// back.
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// A place in `count` if fewer than `limit` are taken.
    pub fn claim(count: &Arc<AtomicUsize>, limit: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| InFlight(count.clone()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
