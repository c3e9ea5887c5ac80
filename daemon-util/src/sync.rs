//! Locks that ignore poisoning: a thread that panicked while holding one must not take the
//! daemon's shared state (the connection handle, the queue workers, the memory map) with it.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};

/// Locks `mutex`, ignoring poisoning.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A value one thread sets (or replaces) and others take copies of, such as the guest memory
/// map the frontend hands the queue workers. Empty until first set.
#[derive(Debug)]
pub struct Slot<T>(RwLock<Option<T>>);

impl<T: Clone> Slot<T> {
    pub fn new() -> Slot<T> {
        Slot(RwLock::new(None))
    }

    /// A copy of the value, `None` before it was first set.
    pub fn get(&self) -> Option<T> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn set(&self, value: T) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Some(value);
    }
}

impl<T: Clone> Default for Slot<T> {
    fn default() -> Slot<T> {
        Slot::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_empty_until_set_then_holds_the_latest() {
        let slot = Slot::new();
        assert_eq!(slot.get(), None);
        slot.set(1);
        slot.set(2);
        assert_eq!(slot.get(), Some(2));
    }
}
