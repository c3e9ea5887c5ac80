//! A real headless browser on a test host: Debian's `chromium` driven through its
//! `chromedriver` (WebDriver), both run inside the host's network namespace, so the browser
//! reaches only the test's own addresses. Chromium runs as root without its sandbox (it
//! refuses root otherwise) and with its background networking off.
//!
//! The WebDriver client (`fantoccini`, in the tests) must run on a thread that has joined
//! the same namespace: [`in_namespace`] runs a closure there.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::hosts::Hosts;
use crate::process::{signal, Process};
use crate::wait::Wait;

/// chromedriver's port, on the namespace's loopback.
pub const WEBDRIVER_PORT: u16 = 9515;

/// chromedriver (and the chromium it starts) on one test host; every process that appeared
/// in that namespace since it started is killed by PID when dropped.
#[derive(Debug)]
pub struct Browser {
    driver: Option<Process>,
    namespace: String,
    /// The namespace's processes before chromedriver (not the browser's).
    before: Vec<u32>,
    pub profile: PathBuf,
}

impl Browser {
    /// Starts chromedriver on `host` (a namespace of `hosts` where the test starts nothing
    /// else while the browser runs, e.g. `client`), logging to `dir/chromedriver.log`; waits until it
    /// answers.
    pub fn start(hosts: &Hosts, host: &str, dir: &Path) -> Browser {
        for tool in ["chromium", "chromedriver"] {
            assert!(
                std::process::Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .output()
                    .is_ok_and(|output| output.status.success()),
                "{tool} is missing: apt-get install chromium chromium-driver (ci/install-deps.sh)"
            );
        }
        let before = hosts.pids(host);
        let mut command = hosts.command(host, "chromedriver");
        command.arg(format!("--port={WEBDRIVER_PORT}"));
        command.arg("--allowed-ips=127.0.0.1");
        let driver = Process::spawn("chromedriver", command, &dir.join("chromedriver.log"));
        let namespace = hosts.namespace(host);
        let browser = Browser {
            driver: Some(driver),
            namespace: namespace.clone(),
            before,
            profile: dir.join("chromium-profile"),
        };
        let address = format!("127.0.0.1:{WEBDRIVER_PORT}");
        // Under load chromedriver may take a while to listen.
        let up = crate::net::try_connect_in(&namespace, &address, Duration::from_secs(60));
        assert!(
            up.is_some(),
            "chromedriver does not listen on {address} in {namespace}"
        );
        browser
    }

    /// WebDriver's URL as seen from inside the namespace.
    pub fn webdriver_url(&self) -> String {
        format!("http://127.0.0.1:{WEBDRIVER_PORT}")
    }

    /// The capabilities of a headless chromium that accepts the console's self-signed
    /// certificate, with a profile of its own.
    pub fn capabilities(&self, profile: &str) -> serde_json::Map<String, serde_json::Value> {
        let profile = self.profile.join(profile);
        let json = serde_json::json!({
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-default-apps",
                    "--disable-extensions",
                    "--window-size=1400,900",
                    format!("--user-data-dir={}", profile.display()),
                ]
            }
        });
        json.as_object().cloned().unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(mut driver) = self.driver.take() {
            driver.kill();
        }
        // The chromium processes chromedriver started (they outlive a killed driver).
        let what = format!("the browser's processes in {} to end", self.namespace);
        let pids = || {
            let mut pids = crate::netns::namespace_pids(&self.namespace);
            pids.retain(|pid| !self.before.contains(pid));
            pids
        };
        for pid in pids() {
            signal(pid, libc::SIGKILL);
        }
        let gone = Wait::up_to(Duration::from_secs(10))
            .every(Duration::from_millis(100))
            .holds(|| pids().is_empty());
        if !gone && !std::thread::panicking() {
            panic!("timed out waiting for {what}");
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Runs `body` on a thread that has joined network namespace `namespace` (so that every
/// socket it opens, and every thread it starts, is there); returns its result, or re-raises
/// its panic.
pub fn in_namespace<T: Send>(namespace: &str, body: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{namespace}");
    std::thread::scope(|scope| {
        let thread = scope.spawn(move || {
            let file = std::fs::File::open(&path)
                .unwrap_or_else(|error| panic!("cannot open {path}: {error}"));
            // SAFETY: setns on a namespace file we hold open; it changes only this thread's
            // network namespace (and that of threads it starts later).
            let joined = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                joined,
                0,
                "setns {path}: {}",
                std::io::Error::last_os_error()
            );
            body()
        });
        match thread.join() {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}
