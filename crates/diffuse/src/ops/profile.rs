//! Where the time goes: per-operation wall-clock totals for the functions in `ops`, switched
//! on by `enable()` (the bench command does; nothing is recorded otherwise). candle runs CPU
//! operations eagerly, so a function's wall time is its real cost; what the models spend
//! outside `ops` (element-wise arithmetic, reshapes, copies) is the remainder of the total.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<Vec<Total>> = Mutex::new(Vec::new());
static CHOICES: Mutex<Vec<(&'static str, u64)>> = Mutex::new(Vec::new());

/// One operation's totals.
#[derive(Debug, Clone)]
pub struct Total {
    /// The operation.
    pub name: &'static str,
    /// Its wall-clock time.
    pub time: Duration,
    /// Its calls.
    pub calls: u64,
    /// The floating-point operations its products did (0 where not counted).
    pub flops: f64,
}

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
    if let Ok(mut choices) = CHOICES.lock() {
        choices.clear();
    }
}

/// Counts a call that ran on the kernel `name` (which of an operation's paths it took), when
/// profiling is on: `--profile` lists the choices under its table.
pub fn count_choice(name: &'static str) {
    if ENABLED.load(Ordering::Relaxed) {
        if let Ok(mut choices) = CHOICES.lock() {
            match choices.iter_mut().find(|(choice, _)| *choice == name) {
                Some((_, calls)) => *calls += 1,
                None => choices.push((name, 1)),
            }
        }
    }
}

/// Every kernel choice counted, with its calls, in the order first seen.
pub fn choices() -> Vec<(&'static str, u64)> {
    CHOICES.lock().map(|c| c.clone()).unwrap_or_default()
}

/// Every operation's totals, most expensive first.
pub fn totals() -> Vec<Total> {
    let mut totals = TOTALS.lock().map(|t| t.clone()).unwrap_or_default();
    totals.sort_by(|a, b| b.time.cmp(&a.time));
    totals
}

/// Adds `flops` floating-point operations to `name`'s total (its products' multiply-adds
/// count two), when profiling is on: `--profile` shows GFLOP/s beside the time.
pub fn count_flops(name: &'static str, flops: f64) {
    if ENABLED.load(Ordering::Relaxed) {
        update(name, |total| total.flops += flops);
    }
}

fn update(name: &'static str, change: impl FnOnce(&mut Total)) {
    if let Ok(mut totals) = TOTALS.lock() {
        let index = match totals.iter().position(|total| total.name == name) {
            Some(index) => index,
            None => {
                totals.push(Total { name, time: Duration::ZERO, calls: 0, flops: 0.0 });
                totals.len() - 1
            }
        };
        change(&mut totals[index]);
    }
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
        update(self.name, |total| {
            total.time += elapsed;
            total.calls += 1;
        });
    }
}
