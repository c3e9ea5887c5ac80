//! The daemon's side of `ftvm check` and `ftvm collect-logs`: what to gather, and what to
//! do with the result (answer the CLI, protect, or record events).

use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;

use super::asks::{key_files, Finished, Question, Then, Work};
use super::control::{Reply, Request};
use super::Daemon;
use crate::check::facts::Gather;
use crate::check::{vm_needs, Severity};
use crate::collect::{self, Bundle};
use crate::host::Role;

impl Daemon {
    /// What [`crate::check::facts::gather`] looks at here: every VM (so that the memory a
    /// takeover needs is counted for all), `vm` at `level` if given.
    fn gather_input(&self, vm: Option<&str>, level: Option<u8>) -> Gather {
        let vms = self
            .config
            .vm
            .iter()
            .map(|section| {
                let level = level.filter(|_| vm == Some(section.name.as_str()));
                let primary_here = self
                    .vms
                    .iter()
                    .find(|runner| runner.name == section.name)
                    .is_some_and(|runner| runner.beat().role == Role::Primary);
                (vm_needs(&self.config, section, level), primary_here)
            })
            .collect();
        Gather {
            host: self.config.host.name.clone(),
            qemu: self.config.host.qemu.clone(),
            vms,
        }
    }

    /// The work that answers the peer's question.
    pub(super) fn answer_work(&mut self, question: Question) -> Work {
        match question {
            Question::Facts { vm, level } => Work::Facts(self.gather_input(vm.as_deref(), level)),
            Question::Bundle => self.bundle_work(),
        }
    }

    fn known(&self, vm: &Option<String>) -> Result<(), Reply> {
        match vm {
            Some(name) if !self.config.vm.iter().any(|section| &section.name == name) => {
                Err(Reply::Error(super::unknown_vm(name, &self.config)))
            }
            _ => Ok(()),
        }
    }

    /// `ftvm check [--peer] [VM]`.
    pub(super) fn check(&mut self, vm: Option<String>, peer: bool, answer: Sender<Reply>) {
        if let Err(reply) = self.known(&vm) {
            let _ = answer.send(reply);
            return;
        }
        let work = Work::Facts(self.gather_input(vm.as_deref(), None));
        let question = peer.then(|| Question::Facts {
            vm: vm.clone(),
            level: None,
        });
        self.asks
            .start(vm, work, question, Then::Reply(answer), &self.io.peer);
    }

    /// `ftvm protect`: the peer and level are checked at once, then both hosts' facts; the
    /// VM is protected unless a finding blocks.
    pub(super) fn protect_after_check(
        &mut self,
        vm: String,
        level: u8,
        peer: String,
        answer: Sender<Reply>,
    ) {
        let name = Some(vm.clone());
        if peer != self.config.peer.name || !matches!(level, 1..=3) || self.known(&name).is_err() {
            // The usual refusal, with its message.
            let _ = answer.send(self.handle(Request::Protect { vm, level, peer }));
            return;
        }
        let work = Work::Facts(self.gather_input(Some(&vm), Some(level)));
        let question = Some(Question::Facts {
            vm: name.clone(),
            level: Some(level),
        });
        let then = Then::Protect {
            vm,
            level,
            peer,
            answer,
        };
        self.asks.start(name, work, question, then, &self.io.peer);
    }

    /// The peer's links came up: both hosts' facts are compared and the findings become
    /// events.
    pub(super) fn check_on_rejoin(&mut self) {
        let work = Work::Facts(self.gather_input(None, None));
        let question = Some(Question::Facts {
            vm: None,
            level: None,
        });
        self.asks
            .start(None, work, question, Then::Events, &self.io.peer);
    }

    /// `ftvm collect-logs`: this host's bundle and the peer's.
    pub(super) fn collect_logs(&mut self, answer: Sender<Reply>) {
        let work = self.bundle_work();
        self.asks.start(
            None,
            work,
            Some(Question::Bundle),
            Then::Collect(answer),
            &self.io.peer,
        );
    }

    pub(super) fn finished(&mut self, finished: Finished) {
        match finished {
            Finished::Collect { bundles, answer } => {
                let _ = answer.send(Reply::Bundles(bundles));
            }
            Finished::Check { report, then } => match then {
                Then::Reply(answer) => {
                    let _ = answer.send(Reply::Check(Box::new(report)));
                }
                Then::Collect(answer) => {
                    let _ = answer.send(Reply::Error("collect-logs: facts instead of logs".into()));
                }
                Then::Protect {
                    vm,
                    level,
                    peer,
                    answer,
                } => {
                    let blocking: Vec<String> = report
                        .findings
                        .iter()
                        .filter(|finding| finding.severity == Severity::Blocking)
                        .map(crate::check::Finding::line)
                        .collect();
                    let reply = if blocking.is_empty() {
                        self.handle(Request::Protect { vm, level, peer })
                    } else {
                        Reply::Error(format!(
                            "{vm} not protected: `ftvm check` found {} blocking problem(s):\n{}\n\
                             fix them, then `ftvm check --peer {vm}` and protect again",
                            blocking.len(),
                            blocking.join("\n")
                        ))
                    };
                    let _ = answer.send(reply);
                }
                Then::Events => {
                    if report.findings.is_empty() {
                        self.io.events.info(
                            "",
                            format!(
                                "`ftvm check` with {}: every VM can run on both hosts",
                                self.config.peer.name
                            ),
                        );
                    }
                    for finding in report.findings {
                        let what = if finding.host.is_empty() {
                            format!("check: {}", finding.what)
                        } else {
                            format!("check on {}: {}", finding.host, finding.what)
                        };
                        match finding.severity {
                            Severity::Blocking => {
                                self.io.events.error(&finding.vm, what, &finding.remedy);
                            }
                            Severity::Warning => {
                                self.io.events.warn(&finding.vm, what, &finding.remedy);
                            }
                        }
                    }
                }
            },
        }
    }

    /// How this host's bundle is made (on a thread): status and events now, the rest there.
    fn bundle_work(&mut self) -> Work {
        let status = self.handle(Request::Status);
        let events = self.handle(Request::Events);
        let config = self.config.clone();
        let gather = self.gather_input(None, None);
        Work::Bundle(Box::new(move || {
            let mut bundle = Bundle {
                host: config.host.name.clone(),
                ..Bundle::default()
            };
            for (path, reply) in [("status.json", status), ("events.json", events)] {
                bundle.add(
                    path,
                    serde_json::to_string_pretty(&reply).unwrap_or_default(),
                );
            }
            let facts = crate::check::facts::gather(&gather);
            bundle.add(
                "facts.json",
                serde_json::to_string_pretty(&facts).unwrap_or_default(),
            );
            host_files(&mut bundle, &config);
            bundle
        }))
    }
}

/// Configuration, daemon logs, state files, versions, kernel and network facts.
fn host_files(bundle: &mut Bundle, config: &crate::config::Config) {
    let keys = key_files(config);
    match config_path() {
        Some(path) if !collect::is_key_file(&path, &keys) => match std::fs::read_to_string(&path) {
            Ok(text) => bundle.add("ftvmd.toml", collect::redact(&text)),
            Err(error) => bundle.notes.push(format!(
                "ftvmd.toml: not collected: {}: {error}",
                path.display()
            )),
        },
        _ => bundle
            .notes
            .push("ftvmd.toml: not collected: ftvmd's command line names no --config".into()),
    }
    // ftvmd logs to stderr: a file (started by hand or a test) or the journal (systemd).
    match std::fs::read_link("/proc/self/fd/2") {
        Ok(target) if target.is_file() => bundle.add_tail("ftvmd.log", &target),
        _ => bundle.add_command(
            "ftvmd.journal",
            "journalctl",
            &[
                "--unit",
                "ftvmd",
                "--since",
                "-2h",
                "--no-pager",
                "--output",
                "short-iso",
            ],
        ),
    }
    for file in collect::state_files(&config.host.state_dir, &keys) {
        let relative = file
            .strip_prefix(&config.host.state_dir)
            .unwrap_or(&file)
            .display()
            .to_string();
        bundle.add_tail(&format!("state/{relative}"), &file);
    }
    bundle.add("versions.txt", versions(config));
    bundle.add("kernel.txt", collect::kernel_facts());
    bundle.add_command("network.txt", "ip", &["-details", "address"]);
}

/// The `--config` of this process's command line (ftvmd's), made absolute.
fn config_path() -> Option<PathBuf> {
    let command_line = std::fs::read("/proc/self/cmdline").ok()?;
    let words: Vec<String> = command_line
        .split(|byte| *byte == 0)
        .map(|word| String::from_utf8_lossy(word).into_owned())
        .collect();
    let path = words.iter().enumerate().find_map(|(index, word)| {
        if word == "--config" {
            words.get(index + 1).cloned()
        } else {
            word.strip_prefix("--config=").map(str::to_owned)
        }
    })?;
    let path = PathBuf::from(path);
    Some(if path.is_absolute() {
        path
    } else {
        std::env::current_dir().ok()?.join(path)
    })
}

fn versions(config: &crate::config::Config) -> String {
    let mut text = format!("ftvmd {}\n", env!("CARGO_PKG_VERSION"));
    let bin_dir = config.host.bin_dir.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("/usr/bin"))
    });
    for daemon in ["vhost-blk-mirror", "vhost-net-ft", "ftvm-checkpoint"] {
        let binary = bin_dir.join(daemon);
        let line = collect::run(&binary.to_string_lossy(), &["--version"])
            .unwrap_or_else(|error| format!("{error}\n"));
        text.push_str(&line);
    }
    let qemu = collect::run(&config.host.qemu.to_string_lossy(), &["--version"])
        .unwrap_or_else(|error| format!("{error}\n"));
    text.push_str(qemu.lines().next().unwrap_or_default());
    text.push('\n');
    text
}
