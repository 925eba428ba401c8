//! A child process that is killed (by its PID, through `Child::kill`) and
//! reaped when its owner drops it, so that a failing test or benchmark never
//! leaves a server behind. Shared by tests/common and benches/load.rs (which
//! includes this file with `#[path]`): one implementation for both.

use std::ops::{Deref, DerefMut};
use std::process::Child;

/// A [`Child`] killed and waited for on drop; derefs to the `Child`.
pub struct KillOnDrop(pub Child);

impl Deref for KillOnDrop {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Already exited (and reaped) is fine: kill then fails, wait returns.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
