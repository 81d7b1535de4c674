//! Where the time goes: per-operation wall-clock totals for the functions in `ops`, switched
//! on by `enable()` (the bench command does; nothing is recorded otherwise). candle runs CPU
//! operations eagerly, so a function's wall time is its real cost; what the models spend
//! outside `ops` (element-wise arithmetic, reshapes, copies) is the remainder of the total.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<Vec<(&'static str, Duration, u64)>> = Mutex::new(Vec::new());

/// Starts recording (and clears what was recorded).
pub fn enable() {
    reset();
    ENABLED.store(true, Ordering::Relaxed);
}

/// Clears the totals.
pub fn reset() {
    if let Ok(mut totals) = TOTALS.lock() {
        totals.clear();
    }
}

/// (operation, total time, calls), most expensive first.
pub fn totals() -> Vec<(&'static str, Duration, u64)> {
    let mut totals = TOTALS.lock().map(|t| t.clone()).unwrap_or_default();
    totals.sort_by(|a, b| b.1.cmp(&a.1));
    totals
}

/// Records the time until it is dropped under `name`, when profiling is on.
pub struct Timer {
    name: &'static str,
    start: Option<Instant>,
}

/// A timer that records under `name` when dropped (a no-op while profiling is off).
pub fn timer(name: &'static str) -> Timer {
    Timer { name, start: ENABLED.load(Ordering::Relaxed).then(Instant::now) }
}

impl Drop for Timer {
    fn drop(&mut self) {
        let Some(start) = self.start else { return };
        let elapsed = start.elapsed();
        if let Ok(mut totals) = TOTALS.lock() {
            match totals.iter_mut().find(|(name, ..)| *name == self.name) {
                Some(entry) => {
                    entry.1 += elapsed;
                    entry.2 += 1;
                }
                None => totals.push((self.name, elapsed, 1)),
            }
        }
    }
}
