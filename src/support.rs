//! Small crate-internal helpers shared by several modules.

use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

/// Tokio's clock as a std `Instant`: identical to `Instant::now()` normally, and it follows
/// tokio's paused test clock, so time-based tests run instantly.
pub(crate) fn clock_now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Locks a mutex, recovering from poisoning. Every mutex in this crate guards state whose
/// updates are single assignments or appends (buckets, counters, health, queues), so a
/// panic elsewhere cannot leave it half-updated; recovering beats cascading the panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
