//! The VM's QEMU here: start it once its NIC daemons answer, announce its MACs, stop it.

use std::time::{Duration, Instant};

use super::{Context, VmRunner};
use crate::daemon::events::Events;
use crate::daemon::nics::{Need, Readiness};

impl VmRunner {
    /// Stops the VM, its NIC daemons and its disk daemons (daemon shutdown, host disabled,
    /// the peer unprotected the VM).
    pub fn shutdown(&mut self, events: &mut Events) {
        self.stop_vm(events, "ftvmd stopping");
        self.nics.stop_unwanted(Need::Nothing);
        self.serving = false;
        for slot in &mut self.disks {
            if let Some(mut disk) = slot.take() {
                disk.process.stop();
            }
        }
        self.disk_status
            .iter_mut()
            .for_each(|status| *status = None);
    }

    /// Starts QEMU here once the NIC daemons answer: at once, or in a later step
    /// ([`VmRunner::tick`] retries while `start_pending`), so that the main loop never waits.
    pub(super) fn start_vm(&mut self, context: &mut Context<'_>) {
        self.start_pending = true;
        self.try_start_vm(context);
    }

    pub(super) fn try_start_vm(&mut self, context: &mut Context<'_>) {
        if self.vm.is_some() {
            self.start_pending = false;
            return;
        }
        match self.nics.start_for_vm(context.events) {
            Readiness::Ready => self.start_pending = false,
            Readiness::Waiting => return,
            Readiness::Failed => {
                self.start_pending = false;
                return;
            }
        }
        match context.launcher.launch(&self.vm_spec) {
            Ok(vm) => {
                context.events.info(
                    &self.name,
                    format!("VM started on {} (pid {})", self.pair.me, vm.pid()),
                );
                self.vm = Some(vm);
                // The LAN must learn at once that the VM's MACs are here now; repeated,
                // as QEMU's announce-self does, in case the first frames are lost.
                let now = Instant::now();
                self.announce_at = [0, 1000, 3000]
                    .iter()
                    .map(|&ms| now + Duration::from_millis(ms))
                    .collect();
                self.announce_due();
            }
            Err(error) => context.events.error(
                &self.name,
                format!("cannot start the VM: {error}"),
                "check the qemu setting and the VM's qemu_args",
            ),
        }
    }

    /// Sends the announcements that are due.
    pub(super) fn announce_due(&mut self) {
        let now = Instant::now();
        if !self.announce_at.iter().any(|&at| at <= now) {
            return;
        }
        self.announce_at.retain(|&at| at > now);
        self.nics.announce();
    }

    /// Which NIC daemons the VM needs here now.
    pub(super) fn nic_need(&self) -> Need {
        if self.vm.is_some() || self.start_pending {
            Need::Vm
        } else if self.state.protected {
            Need::Standby
        } else {
            Need::Nothing
        }
    }

    pub(super) fn stop_vm(&mut self, events: &mut Events, why: &str) {
        self.start_pending = false;
        self.nics.cancel_start();
        if let Some(mut vm) = self.vm.take() {
            vm.stop();
            events.info(
                &self.name,
                format!("VM stopped on {} ({why})", self.pair.me),
            );
        }
        self.announce_at.clear();
        // The standby daemons stay: they relay for the peer, and serve QEMU if the VM
        // comes back here.
        self.nics.stop_unwanted(self.nic_need());
    }
}
