//! A mirrored disk across two test hosts: `vhost-blk-mirror` as secondary in hostB and as
//! primary in hostA, joined by both A-links.

use std::path::PathBuf;
use std::time::Duration;

use crate::blk::{BlkDaemon, BlkOptions};
use crate::guest::{Disk, GuestConfig};
use crate::hosts::Hosts;
use crate::{create_image, scratch_dir};

/// Port the secondary listens on, on both A-link addresses.
pub const REPLICATION_PORT: u16 = 7400;
/// The A-link addresses of hostB (see `ci/hosts.sh`).
pub const HOST_B_LINKS: [&str; 2] = ["10.77.1.2", "10.77.2.2"];

/// Two daemons mirroring one disk. Fields drop in order: daemons, then hosts, then files.
#[derive(Debug)]
pub struct MirrorPair {
    pub primary: Option<BlkDaemon>,
    pub secondary: Option<BlkDaemon>,
    pub primary_options: BlkOptions,
    pub secondary_options: BlkOptions,
    pub hosts: Hosts,
    pub dir: tempfile::TempDir,
}

impl MirrorPair {
    /// Creates hosts, images and key; starts nothing yet.
    pub fn new(name: &str, size_bytes: u64, queues: u16) -> MirrorPair {
        let hosts = Hosts::up();
        let dir = scratch_dir(name);
        let psk = dir.path().join("pair.psk");
        std::fs::write(&psk, format!("ftvm test key for {name} 0123456789abcdef\n"))
            .expect("write psk");
        // As an operator would: a key readable by others makes the daemons warn.
        std::fs::set_permissions(&psk, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod psk");
        let mut primary_options = BlkOptions::in_dir(dir.path(), "primary");
        primary_options.queues = queues;
        primary_options.serial = Some(format!("{name}-disk"));
        primary_options.netns = Some(hosts.namespace("hostA"));
        primary_options.extra_args = role_args("primary", "--peer", &psk);
        let mut secondary_options = BlkOptions::in_dir(dir.path(), "secondary");
        secondary_options.queues = queues;
        secondary_options.serial = Some(format!("{name}-disk"));
        secondary_options.netns = Some(hosts.namespace("hostB"));
        secondary_options.extra_args = role_args("secondary", "--listen", &psk);
        create_image(&primary_options.image, size_bytes);
        create_image(&secondary_options.image, size_bytes);
        MirrorPair {
            primary: None,
            secondary: None,
            primary_options,
            secondary_options,
            hosts,
            dir,
        }
    }

    pub fn start_secondary(&mut self) {
        let log = self.dir.path().join("secondary.log");
        self.secondary = Some(BlkDaemon::start(&self.secondary_options, &log));
    }

    pub fn start_primary(&mut self) {
        let log = self.dir.path().join("primary.log");
        self.primary = Some(BlkDaemon::start(&self.primary_options, &log));
    }

    pub fn primary(&self) -> &BlkDaemon {
        self.primary.as_ref().expect("primary is running")
    }

    pub fn secondary(&self) -> &BlkDaemon {
        self.secondary.as_ref().expect("secondary is running")
    }

    /// Kills the secondary with SIGKILL (a crash, as far as it can tell).
    pub fn kill_secondary(&mut self) {
        if let Some(mut secondary) = self.secondary.take() {
            secondary.process.kill();
        }
    }

    /// Kills the primary with SIGKILL.
    pub fn kill_primary(&mut self) {
        if let Some(mut primary) = self.primary.take() {
            primary.process.kill();
        }
    }

    /// The secondary's image as it is on disk now.
    pub fn secondary_image(&self) -> Vec<u8> {
        std::fs::read(&self.secondary_options.image).expect("read the secondary's image")
    }

    /// Waits until both copies are UpToDate with nothing in flight or out of sync.
    pub fn wait_in_sync(&self, timeout: Duration) -> serde_json::Value {
        self.secondary()
            .wait_replication(timeout, "secondary UpToDate", |r| {
                r["disk_state"] == "UpToDate"
            });
        self.primary()
            .wait_replication(timeout, "primary in sync", |r| {
                r["disk_state"] == "UpToDate"
                    && r["in_flight_requests"] == 0
                    && r["out_of_sync_bytes"] == 0
            })
    }

    /// Panics naming the first differing offset unless both images are byte-identical.
    pub fn assert_images_identical(&self) {
        let primary = std::fs::read(&self.primary_options.image).expect("read primary image");
        let secondary = std::fs::read(&self.secondary_options.image).expect("read secondary");
        assert_eq!(primary.len(), secondary.len(), "image sizes differ");
        if let Some(offset) = primary.iter().zip(&secondary).position(|(a, b)| a != b) {
            panic!(
                "images differ, first at byte {offset} (block {})",
                offset / 4096
            );
        }
    }

    /// Starts the secondary, then the primary, and waits until both are in sync.
    pub fn start_in_sync(&mut self, timeout: Duration) {
        self.start_secondary();
        self.start_primary();
        self.wait_in_sync(timeout);
    }

    /// `repair` on a primary whose local disk failed: waits until its copy is rebuilt and
    /// both copies are in sync, then checks they are byte-identical.
    pub fn repair_primary(&self, timeout: Duration) {
        let reply = self.primary().command("repair");
        assert_eq!(reply["ok"], true, "repair refused: {reply}");
        self.primary()
            .wait_replication(timeout, "local disk rebuilt", |r| {
                r["local_disk"] == "Healthy"
            });
        self.wait_in_sync(timeout);
        self.assert_images_identical();
    }

    /// A guest in hostA whose disk is the primary's.
    pub fn guest_config(&self, name: &str) -> GuestConfig {
        let mut config = GuestConfig::new(name, "");
        config.disks.push(Disk {
            socket: self.primary_options.socket.clone(),
            queues: self.primary_options.queues,
        });
        config.netns = Some(self.hosts.namespace("hostA"));
        config
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }
}

fn role_args(role: &str, address_flag: &str, psk: &std::path::Path) -> Vec<String> {
    let mut args = vec!["--role".to_owned(), role.to_owned()];
    for address in HOST_B_LINKS {
        args.push(address_flag.to_owned());
        args.push(format!("{address}:{REPLICATION_PORT}"));
    }
    args.push("--psk-file".to_owned());
    args.push(psk.display().to_string());
    args.push("--host-id".to_owned());
    args.push(role.to_owned());
    args
}
