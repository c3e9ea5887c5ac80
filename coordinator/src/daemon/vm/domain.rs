//! A VM that is a protected libvirt domain: what the libvirt hook asks and tells.

use std::sync::Arc;

use super::{Context, VmRunner};
use crate::daemon::processes::VmLauncher;
use crate::host::Role;

impl VmRunner {
    /// Protected with `ftvm protect --domain`: it runs through libvirt.
    pub fn is_domain(&self) -> bool {
        self.vm_spec.domain.is_some()
    }

    pub fn role(&self) -> Role {
        self.host.role()
    }

    /// The VM runs here or is being started.
    pub fn guest_present(&self) -> bool {
        self.guest.present()
    }

    /// The A-link ports of its disks.
    pub fn replication_ports(&self) -> Vec<u16> {
        self.disks
            .iter()
            .filter_map(|disk| disk.spec.listen.first().map(|address| address.port()))
            .collect()
    }

    /// Makes the VM known to libvirt here (a job on the VM's agent: no wait).
    pub fn prepare_launch(&mut self, launcher: &Arc<dyn VmLauncher>) {
        self.guest
            .prepare(Arc::clone(launcher), self.vm_spec.clone());
    }

    /// The libvirt hook's `operation` on this VM's domain: `prepare`/`start` is answered
    /// (`Err` refuses the start, with the reason `virsh start` prints); `stopped`/`release`
    /// of a domain ftvmd did not stop is the operator's planned stop.
    pub fn libvirt_hook(
        &mut self,
        operation: &str,
        context: &mut Context<'_>,
    ) -> Result<String, String> {
        match operation {
            "prepare" | "start" => self.may_start_here(context),
            "stopped" | "release" => {
                if self.guest.pid.is_some() {
                    self.guest.stopped_by_operator = true;
                }
                Ok(String::new())
            }
            _ => Ok(String::new()),
        }
    }

    fn may_start_here(&mut self, context: &mut Context<'_>) -> Result<String, String> {
        let (vm, me, peer) = (
            self.name.clone(),
            self.pair.me.clone(),
            self.pair.peer.clone(),
        );
        if self.guest.launching() {
            return Ok(format!("ftvmd starts {vm} on {me}"));
        }
        let state = self.state_word();
        if !self.state.protected || self.host.role() == Role::Secondary {
            return Err(format!(
                "{vm} is protected and this host ({me}) keeps only its replica \
                 ({state}); its primary is {peer}. Start it there, or move it here with \
                 `ftvm failover {vm}` on {peer}"
            ));
        }
        if !self.guest_may_run() {
            return Err(format!(
                "{me} is the primary of {vm} but may not run it now ({state}: its \
                 writes wait for the witness, or this copy is fenced); ftvmd starts it when \
                 it may"
            ));
        }
        if !self.serving {
            return Err(format!(
                "the disks of {vm} are not ready on {me} yet ({state}); ftvmd starts \
                 it itself once they are"
            ));
        }
        // The operator starts it on its primary: ftvmd takes the running domain over.
        self.guest.stopped_by_operator = false;
        self.start_vm(context);
        Ok(format!("{vm} may start on {me}"))
    }
}
