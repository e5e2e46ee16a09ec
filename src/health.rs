//! What `/readyz` reports. Not "the process is up": ready once the controller's watches have
//! listed what they watch (or, as a standby, once it is waiting for the leader Lease, ready to take
//! over), and not ready again from the shutdown signal on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

#[derive(Clone, Debug, Default)]
pub struct Readiness {
    ready: Arc<AtomicBool>,
}

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Ready once `parts` parts have each called [`Synced::done`] once.
    pub fn after(&self, parts: usize) -> Synced {
        if parts == 0 {
            self.set(true);
        }
        Synced {
            readiness: self.clone(),
            remaining: Arc::new(AtomicUsize::new(parts)),
        }
    }
}

/// Counts down the parts (one watch per scope) that must have synced before the process is ready.
#[derive(Clone, Debug)]
pub struct Synced {
    readiness: Readiness,
    remaining: Arc<AtomicUsize>,
}

impl Synced {
    pub fn done(&self) {
        if self.remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.readiness.set(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_part_has_synced() {
        let readiness = Readiness::default();
        let synced = readiness.after(2);
        assert!(!readiness.is_ready());
        synced.done();
        assert!(!readiness.is_ready());
        synced.done();
        assert!(readiness.is_ready());
        readiness.set(false);
        assert!(!readiness.is_ready());
    }

    #[test]
    fn nothing_to_wait_for_is_ready_at_once() {
        let readiness = Readiness::default();
        readiness.after(0);
        assert!(readiness.is_ready());
    }
}
