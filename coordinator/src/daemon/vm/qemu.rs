//! The VM's QEMU here: start it once its NIC daemons answer, announce its MACs, pause it
//! while this host may not acknowledge writes, resume it, stop it.
//!
//! QEMU has its own agent thread ([`Agent`]): the launch, the stop (up to 5 s of grace) and
//! the QMP `stop`/`cont` run there, in the order asked, while the deciding thread goes on.

use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Context, VmRunner};

use crate::daemon::agent::Agent;
use crate::daemon::events::Events;
use crate::daemon::nics::{Need, Readiness};
use crate::daemon::processes::{RunningVm, VmLauncher, VmSpec};
use crate::daemon::wake;
use crate::host::Mode;

/// What one job of QEMU's agent did.
#[derive(Debug)]
pub(super) enum GuestReport {
    Launched(Result<u32, String>),
    /// The VM was made known to libvirt (or could not be).
    Prepared(Result<(), String>),
    Paused(Result<(), String>),
    Resumed(Result<(), String>),
    Stopped,
    /// QEMU ended by itself: its pid and exit status.
    Ended(u32, String),
}

/// The VM's QEMU as the deciding thread sees it.
#[derive(Debug)]
pub(super) struct Guest {
    agent: Agent<Box<dyn RunningVm>, GuestReport>,
    results: Receiver<GuestReport>,
    /// QEMU's pid once its launch is reported.
    pub pid: Option<u32>,
    /// A launch is queued and not reported yet.
    launching: bool,
    /// The guest is paused here, or a pause is queued.
    pub paused: bool,
    /// The libvirt hook said the domain stopped, and ftvmd did not stop it: an operator's
    /// `virsh shutdown` or `virsh destroy`.
    pub stopped_by_operator: bool,
}

impl Guest {
    pub fn new(vm: &str) -> Result<Guest, String> {
        let (sender, results) = wake::channel();
        let agent = Agent::start(&format!("{vm}-qemu"), sender, GuestReport::Ended)
            .map_err(|error| format!("cannot start a thread: {error}"))?;
        Ok(Guest {
            agent,
            results,
            pid: None,
            launching: false,
            paused: false,
            stopped_by_operator: false,
        })
    }

    /// A launch is queued and not reported yet.
    pub fn launching(&self) -> bool {
        self.launching
    }

    /// Makes the VM known where it may run later (libvirt: defines its domain).
    pub fn prepare(&mut self, launcher: Arc<dyn VmLauncher>, spec: VmSpec) {
        self.agent.run("prepare", move |_| {
            GuestReport::Prepared(launcher.prepare(&spec).map_err(|error| error.to_string()))
        });
    }

    /// QEMU runs here or is being started.
    pub fn present(&self) -> bool {
        self.pid.is_some() || self.launching
    }

    fn launch(&mut self, launcher: Arc<dyn VmLauncher>, spec: VmSpec) {
        self.launching = true;
        self.paused = false;
        self.stopped_by_operator = false;
        self.agent.run("launch", move |child| {
            if let Some(vm) = child {
                return GuestReport::Launched(Ok(vm.pid()));
            }
            match launcher.launch(&spec) {
                Ok(vm) => {
                    let pid = vm.pid();
                    *child = Some(vm);
                    GuestReport::Launched(Ok(pid))
                }
                Err(error) => GuestReport::Launched(Err(error.to_string())),
            }
        });
    }

    fn stop(&mut self) {
        self.pid = None;
        self.launching = false;
        self.paused = false;
        self.agent.run("stop", |child| {
            if let Some(mut vm) = child.take() {
                vm.stop();
            }
            GuestReport::Stopped
        });
    }

    /// Queues a pause unless one is; false if there is nothing to pause.
    pub(super) fn pause(&mut self) -> bool {
        if !self.present() || self.paused {
            return false;
        }
        self.paused = true;
        self.agent.run("pause", |child| match child {
            Some(vm) => GuestReport::Paused(vm.pause()),
            None => GuestReport::Paused(Ok(())),
        });
        true
    }

    /// Queues a resume if the guest is paused; false if it is not.
    fn resume(&mut self) -> bool {
        if !self.present() || !self.paused {
            return false;
        }
        self.paused = false;
        self.agent.run("resume", |child| match child {
            Some(vm) => GuestReport::Resumed(vm.resume()),
            None => GuestReport::Resumed(Ok(())),
        });
        true
    }

    /// Waits for the queued jobs, stops QEMU and ends the agent (ftvmd stops).
    pub fn finish(self) {
        self.agent.finish();
    }
}

impl VmRunner {
    /// Stops the VM, its NIC daemons and its disk daemons (daemon shutdown, host disabled,
    /// the peer unprotected the VM). Never waits: the agents do the stopping.
    pub fn shutdown(&mut self, events: &mut Events) {
        self.stop_vm(events, "ftvmd stopping");
        self.stop_engine_now();
        self.nics.stop_unwanted(Need::Nothing);
        self.serving = false;
        self.pending = None;
        for disk in &mut self.disks {
            if disk.process.is_some() || !disk.idle() {
                disk.stop();
            }
            disk.process = None;
            disk.status = None;
        }
    }

    /// Waits until every agent has stopped its process (ftvmd stops).
    pub fn finish(self) {
        self.engine.finish();
        self.guest.finish();
        self.guest_agent.finish();
        self.nics.finish();
        for disk in self.disks {
            disk.finish();
        }
    }

    /// Starts QEMU here once the NIC daemons answer: at once, or in a later step
    /// ([`VmRunner::tick`] retries while `start_pending`), so that the main loop never waits.
    pub(super) fn start_vm(&mut self, context: &mut Context<'_>) {
        self.start_pending = true;
        self.try_start_vm(context);
    }

    pub(super) fn try_start_vm(&mut self, context: &mut Context<'_>) {
        if self.guest.present() {
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
        self.guest
            .launch(Arc::clone(context.launcher), self.vm_spec.clone());
    }

    /// Takes the reports of QEMU's agent.
    pub(super) fn take_guest_reports(&mut self, context: &mut Context<'_>) {
        while let Ok(report) = self.guest.results.try_recv() {
            let events = &mut *context.events;
            match report {
                GuestReport::Launched(result) => self.on_launched(result, context),
                GuestReport::Paused(Err(error)) => {
                    events.error(
                        &self.name,
                        format!("cannot pause the guest: {error}"),
                        &format!("see {}", self.vm_spec.log.display()),
                    );
                    self.on_guest_paused(Err(error), context);
                }
                GuestReport::Paused(Ok(())) => self.on_guest_paused(Ok(()), context),
                GuestReport::Resumed(Err(error)) => events.error(
                    &self.name,
                    format!("cannot resume the guest: {error}"),
                    &format!("see {}", self.vm_spec.log.display()),
                ),
                GuestReport::Resumed(Ok(())) | GuestReport::Prepared(Ok(())) => {}
                GuestReport::Prepared(Err(error)) => events.error(
                    &self.name,
                    format!("cannot define the protected domain in libvirt: {error}"),
                    "check [libvirt] uri in the configuration and that libvirtd runs",
                ),
                GuestReport::Stopped => self.on_vm_stopped(),
                GuestReport::Ended(pid, status) => {
                    if self.guest.pid != Some(pid) {
                        continue;
                    }
                    self.report_end(&status, events);
                    // One started ahead of a move: the takeover starts a fresh one.
                    self.prestarted = false;
                    self.guest.pid = None;
                    self.guest.paused = false;
                    self.announce_at.clear();
                }
            }
        }
    }

    /// The VM ended by itself: a planned stop when an operator stopped its domain through
    /// libvirt (no failover: the peer hears this host), else a failure.
    fn report_end(&mut self, status: &str, events: &mut Events) {
        let planned = self.vm_spec.domain.is_some()
            && (self.guest.stopped_by_operator
                || status.contains("(shutdown)")
                || status.contains("(destroyed)"));
        if planned {
            self.guest.stopped_by_operator = true;
            events.info(
                &self.name,
                format!(
                    "stopped by the operator through libvirt on {} ({status}): a planned \
                     stop, no failover; `virsh start {}` here starts it again",
                    self.pair.me, self.name
                ),
            );
        } else if self.vm_spec.domain.is_some() {
            self.guest.stopped_by_operator = false;
            events.error(
                &self.name,
                format!("the VM's QEMU ended: {status}"),
                "see libvirt's log of the domain (/var/log/libvirt/qemu/)",
            );
        } else {
            events.warn(
                &self.name,
                format!("the VM's QEMU ended: {status}"),
                &format!("see {}", self.vm_spec.log.display()),
            );
        }
    }

    fn on_launched(&mut self, result: Result<u32, String>, context: &mut Context<'_>) {
        if !self.guest.launching {
            return; // stopped meanwhile
        }
        self.guest.launching = false;
        match result {
            Ok(pid) => {
                self.guest.pid = Some(pid);
                if self.prestarted {
                    // Waits for the move's final checkpoint: nothing to announce or pause.
                    self.vm_spec.incoming = false;
                    context.events.info(
                        &self.name,
                        format!(
                            "QEMU started on {} (pid {pid}) ahead of the move: it waits for \
                             the final checkpoint; its disks and NIC daemons serve it nothing \
                             until the takeover",
                            self.pair.me
                        ),
                    );
                    return;
                }
                let restoring = self.on_launched_for_restore();
                if !restoring {
                    self.takeover_done(context.now);
                }
                let events = &mut *context.events;
                events.info(
                    &self.name,
                    if restoring {
                        format!(
                            "QEMU started on {} (pid {pid}) to receive the replica",
                            self.pair.me
                        )
                    } else {
                        format!("VM started on {} (pid {pid})", self.pair.me)
                    },
                );
                self.announce_again();
                if !self.guest_may_run() {
                    self.pause_guest(events, "this host holds its writes");
                }
            }
            Err(error) => {
                if std::mem::take(&mut self.prestarted) {
                    self.vm_spec.incoming = false;
                }
                context.events.error(
                    &self.name,
                    format!("cannot start the VM: {error}"),
                    "check the qemu setting and the VM's qemu_args",
                );
                self.on_launch_failed_during_restore(error, context);
            }
        }
    }

    /// The LAN must learn at once that the VM's MACs are here now; repeated, as QEMU's
    /// announce-self does, in case the first frames are lost.
    pub(super) fn announce_again(&mut self) {
        let now = Instant::now();
        self.announce_at = [0, 1000, 3000]
            .iter()
            .map(|&ms| now + Duration::from_millis(ms))
            .collect();
        self.announce_due();
    }

    /// Whether this host may let its guest run: unprotected, or a primary that mirrors or
    /// runs degraded with a grant (not one that holds for the witness or is fenced).
    pub(super) fn guest_may_run(&self) -> bool {
        !self.state.protected || matches!(self.host.mode(), Mode::Mirrored | Mode::Degraded)
    }

    /// Pauses the guest at once (QMP `stop`, queued on QEMU's agent): no guest output
    /// leaves this host while another may be taking the VM over.
    pub(super) fn pause_guest(&mut self, events: &mut Events, why: &str) {
        if self.guest.pause() {
            events.warn(
                &self.name,
                format!("guest paused on {} ({why})", self.pair.me),
                "",
            );
        }
    }

    /// Resumes a paused guest (QMP `cont`) when this host may run it again.
    pub(super) fn resume_guest(&mut self, events: &mut Events, why: &str) {
        if self.guest_may_run() && self.guest.resume() {
            events.info(
                &self.name,
                format!("guest resumed on {} ({why})", self.pair.me),
            );
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
        if self.guest.present() || self.start_pending {
            Need::Vm
        } else if self.state.protected {
            Need::Standby
        } else {
            Need::Nothing
        }
    }

    pub(super) fn stop_vm(&mut self, events: &mut Events, why: &str) {
        self.start_pending = false;
        if std::mem::take(&mut self.prestarted) {
            self.vm_spec.incoming = false;
        }
        self.nics.cancel_start();
        if self.guest.present() {
            self.guest.stop();
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
