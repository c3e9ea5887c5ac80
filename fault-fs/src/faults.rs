//! The faults injected now: failing rules, the write budget, the added latency, whether
//! fallocate is supported; and counts of what was injected.

use std::time::Duration;

use serde::Serialize;

/// An errno the control socket can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum InjectedErrno {
    #[serde(rename = "EIO")]
    Eio,
    #[serde(rename = "ENOSPC")]
    Enospc,
    #[serde(rename = "EOPNOTSUPP")]
    Eopnotsupp,
}

impl InjectedErrno {
    pub fn parse(name: &str) -> Option<InjectedErrno> {
        match name {
            "EIO" => Some(InjectedErrno::Eio),
            "ENOSPC" => Some(InjectedErrno::Enospc),
            "EOPNOTSUPP" => Some(InjectedErrno::Eopnotsupp),
            _ => None,
        }
    }

    pub fn raw(self) -> i32 {
        match self {
            InjectedErrno::Eio => libc::EIO,
            InjectedErrno::Enospc => libc::ENOSPC,
            InjectedErrno::Eopnotsupp => libc::EOPNOTSUPP,
        }
    }
}

/// What a file system request does, as far as the failing rules care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    /// `write`, and `fallocate` of every mode.
    Write,
    /// `fsync` and `fdatasync`.
    Sync,
}

/// Which requests a rule fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleAccess {
    Read,
    Write,
    Sync,
    Any,
}

impl RuleAccess {
    fn covers(self, access: Access) -> bool {
        match self {
            RuleAccess::Any => true,
            RuleAccess::Read => access == Access::Read,
            RuleAccess::Write => access == Access::Write,
            RuleAccess::Sync => access == Access::Sync,
        }
    }
}

/// `fail` rule: requests of `access` on `file` (any file if `None`) that touch a byte of
/// `[offset, offset + len)` (to the end of the file without `len`) fail with `errno`. A sync
/// has no range: a rule with a range never fails one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailRule {
    pub access: RuleAccess,
    pub errno: InjectedErrno,
    pub file: Option<String>,
    pub offset: Option<u64>,
    pub len: Option<u64>,
}

impl FailRule {
    fn matches(&self, access: Access, file: &str, offset: u64, len: u64) -> bool {
        if !self.access.covers(access) {
            return false;
        }
        if self.file.as_deref().is_some_and(|name| name != file) {
            return false;
        }
        if self.offset.is_none() && self.len.is_none() {
            return true;
        }
        if access == Access::Sync {
            return false;
        }
        let start = self.offset.unwrap_or(0);
        let end = self.len.map_or(u64::MAX, |len| start.saturating_add(len));
        let request_end = offset.saturating_add(len.max(1));
        offset < end && start < request_end
    }
}

/// How many errors of each kind were injected.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct InjectedCounts {
    pub eio: u64,
    pub enospc: u64,
    pub eopnotsupp: u64,
}

impl InjectedCounts {
    fn count(&mut self, errno: InjectedErrno) {
        let counter = match errno {
            InjectedErrno::Eio => &mut self.eio,
            InjectedErrno::Enospc => &mut self.enospc,
            InjectedErrno::Eopnotsupp => &mut self.eopnotsupp,
        };
        *counter = counter.saturating_add(1);
    }
}

#[derive(Debug)]
pub struct Faults {
    pub rules: Vec<FailRule>,
    /// Bytes writes may still add before the file system is full (`None`: no budget).
    pub write_budget_bytes: Option<u64>,
    /// Set by the first write the budget refuses; every later write fails until `clear`.
    pub full: bool,
    pub delay: Duration,
    pub fallocate_supported: bool,
    pub injected: InjectedCounts,
}

impl Default for Faults {
    fn default() -> Faults {
        Faults {
            rules: Vec::new(),
            write_budget_bytes: None,
            full: false,
            delay: Duration::ZERO,
            fallocate_supported: true,
            injected: InjectedCounts::default(),
        }
    }
}

impl Faults {
    /// Removes every fault; the counts stay.
    pub fn clear(&mut self) {
        *self = Faults {
            injected: self.injected,
            ..Faults::default()
        };
    }

    /// Sets a budget of `bytes` from now on (see [`Faults::charge_write`]).
    pub fn set_write_budget(&mut self, bytes: u64) {
        self.write_budget_bytes = Some(bytes);
        self.full = false;
    }

    /// The errno the first matching rule injects into this request, counted.
    pub fn check(
        &mut self,
        access: Access,
        file: &str,
        offset: u64,
        len: u64,
    ) -> Option<InjectedErrno> {
        let errno = self
            .rules
            .iter()
            .find(|rule| rule.matches(access, file, offset, len))
            .map(|rule| rule.errno)?;
        self.injected.count(errno);
        Some(errno)
    }

    /// Charges a write (or allocation) of `bytes` to the budget. It fits if the budget has
    /// that much left; the first that does not fails with ENOSPC, writes nothing and fills
    /// the file system: every later write fails too until `clear` or a new budget.
    pub fn charge_write(&mut self, bytes: u64) -> Option<InjectedErrno> {
        let remaining = self.write_budget_bytes?;
        if !self.full {
            if let Some(left) = remaining.checked_sub(bytes) {
                self.write_budget_bytes = Some(left);
                return None;
            }
            self.full = true;
        }
        self.injected.count(InjectedErrno::Enospc);
        Some(InjectedErrno::Enospc)
    }

    /// A fallocate refused as unsupported, counted.
    pub fn check_fallocate(&mut self) -> Option<InjectedErrno> {
        if self.fallocate_supported {
            return None;
        }
        self.injected.count(InjectedErrno::Eopnotsupp);
        Some(InjectedErrno::Eopnotsupp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(
        access: RuleAccess,
        file: Option<&str>,
        offset: Option<u64>,
        len: Option<u64>,
    ) -> FailRule {
        FailRule {
            access,
            errno: InjectedErrno::Eio,
            file: file.map(str::to_owned),
            offset,
            len,
        }
    }

    #[test]
    fn a_range_rule_fails_exactly_the_requests_that_touch_it() {
        let mut faults = Faults::default();
        faults.rules.push(rule(
            RuleAccess::Write,
            Some("disk"),
            Some(4096),
            Some(4096),
        ));
        assert_eq!(faults.check(Access::Write, "disk", 0, 4096), None);
        assert_eq!(faults.check(Access::Write, "disk", 8192, 10), None);
        assert_eq!(
            faults.check(Access::Write, "disk", 4095, 2),
            Some(InjectedErrno::Eio)
        );
        assert_eq!(
            faults.check(Access::Write, "disk", 8191, 1),
            Some(InjectedErrno::Eio)
        );
        assert_eq!(faults.check(Access::Read, "disk", 4096, 1), None);
        assert_eq!(faults.check(Access::Write, "other", 4096, 1), None);
        assert_eq!(faults.check(Access::Sync, "disk", 0, 0), None);
        assert_eq!(faults.injected.eio, 2);
    }

    #[test]
    fn an_open_ended_rule_fails_everything_past_its_offset() {
        let mut faults = Faults::default();
        faults.rules.push(FailRule {
            errno: InjectedErrno::Enospc,
            ..rule(RuleAccess::Any, None, Some(1 << 20), None)
        });
        assert_eq!(faults.check(Access::Write, "a", (1 << 20) - 1, 1), None);
        assert_eq!(
            faults.check(Access::Read, "b", 1 << 40, 1),
            Some(InjectedErrno::Enospc)
        );
        faults.rules.push(rule(RuleAccess::Sync, None, None, None));
        assert_eq!(
            faults.check(Access::Sync, "a", 0, 0),
            Some(InjectedErrno::Eio)
        );
    }

    #[test]
    fn the_budget_refuses_the_write_that_does_not_fit_and_every_write_after() {
        let mut faults = Faults::default();
        assert_eq!(faults.charge_write(u64::MAX), None);
        faults.set_write_budget(100);
        assert_eq!(faults.charge_write(60), None);
        assert_eq!(faults.charge_write(40), None);
        assert_eq!(faults.charge_write(1), Some(InjectedErrno::Enospc));
        faults.set_write_budget(10);
        assert_eq!(faults.charge_write(11), Some(InjectedErrno::Enospc));
        assert_eq!(faults.charge_write(1), Some(InjectedErrno::Enospc));
        assert_eq!(faults.injected.enospc, 3);
        faults.clear();
        assert_eq!(faults.charge_write(1 << 40), None);
        assert_eq!(faults.injected.enospc, 3);
    }
}
