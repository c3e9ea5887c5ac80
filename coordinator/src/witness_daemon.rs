//! `ftvm-witness`: the third host's daemon. Hosts connect over the replication link
//! (authenticated with the witness's pre-shared key), register their VMs, and claim
//! generations; every decision is written and synced before it is answered.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use log::{info, warn};
use replication_link::{LinkConfig, LinkListener, ListenerEvent, Psk, Session};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::witness::{Claim, Grant, Verdict, Witness};
use crate::witness_store::{StoreError, WitnessStore};
use crate::Generation;

/// The two hosts of a pair, in name order: the witness keeps each pair's VMs apart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPair([String; 2]);

impl HostPair {
    pub fn new(one: &str, other: &str) -> HostPair {
        let (first, second) = if one <= other {
            (one, other)
        } else {
            (other, one)
        };
        HostPair([first.to_owned(), second.to_owned()])
    }

    pub fn contains(&self, host: &str) -> bool {
        self.0.iter().any(|member| member == host)
    }
}

/// A host's request to the witness.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WitnessRequest {
    /// First protection of a VM: its primary holds `grant`. An existing grant is kept.
    Register {
        pair: HostPair,
        vm: String,
        grant: Grant<String>,
    },
    /// The claimant must be the authenticated sender.
    Claim {
        pair: HostPair,
        vm: String,
        claim: Claim<String>,
    },
    Query {
        pair: HostPair,
        vm: String,
    },
    /// The holder of `generation` runs the VM unprotected (`standalone`): until it says
    /// otherwise, no other host may claim it. Only the holder may ask.
    Standalone {
        pair: HostPair,
        vm: String,
        generation: Generation,
        standalone: bool,
    },
}

/// The witness's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WitnessReply {
    /// The VM's grant after `Register` or `Query` (`None`: never registered).
    Grant {
        vm: String,
        grant: Option<Grant<String>>,
    },
    Verdict {
        vm: String,
        verdict: Verdict<String>,
    },
    /// The answer to `Standalone`: the VM's mode and generation now. Protecting again
    /// grants the holder the next generation, so that the returning copy counts as
    /// outdated until it has resynced what the holder wrote alone.
    Standalone {
        vm: String,
        standalone: bool,
        generation: Generation,
    },
    Error {
        vm: String,
        message: String,
    },
}

#[derive(Debug, Error)]
pub enum WitnessError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot read the pre-shared key")]
    Psk(#[source] replication_link::PskError),
    #[error("cannot read the host key {path}")]
    HostKey {
        path: PathBuf,
        #[source]
        source: replication_link::PskError,
    },
    #[error("cannot read the key directory {path}")]
    KeyDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the key directory {0} has no HOST.psk file")]
    NoHostKeys(PathBuf),
    #[error("cannot listen on {addresses:?}")]
    Listen {
        addresses: Vec<SocketAddr>,
        #[source]
        source: replication_link::ListenerError,
    },
}

/// `ftvm-witness`'s settings.
#[derive(Clone, Debug)]
pub struct WitnessConfig {
    pub listen: Vec<SocketAddr>,
    pub state_dir: PathBuf,
    pub keys: WitnessKeys,
    pub host_id: String,
}

/// How hosts authenticate to the witness.
#[derive(Clone, Debug)]
pub enum WitnessKeys {
    /// One key for every host (`--psk-file`): any host that has it can connect under any
    /// host's name.
    Shared(PathBuf),
    /// A key per host (`--psk-dir DIR`: `DIR/HOST.psk`, the same file as that host's
    /// `[witness] psk_file`): a host can only connect under its own name, so it can claim
    /// nothing for another host, not even one of another pair.
    PerHost(PathBuf),
}

impl WitnessKeys {
    /// The listener's link configuration.
    fn link_config(&self, host_id: &str) -> Result<LinkConfig, WitnessError> {
        let dir = match self {
            WitnessKeys::Shared(path) => {
                let psk = Psk::from_file(path).map_err(WitnessError::Psk)?;
                return Ok(LinkConfig::new(psk, host_id));
            }
            WitnessKeys::PerHost(dir) => dir,
        };
        let key_dir_error = |source| WitnessError::KeyDir {
            path: dir.clone(),
            source,
        };
        let mut keys = std::collections::BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(key_dir_error)? {
            let path = entry.map_err(key_dir_error)?.path();
            if path.extension().is_none_or(|extension| extension != "psk") {
                continue;
            }
            let Some(host) = path.file_stem().and_then(|stem| stem.to_str()) else {
                continue;
            };
            let psk = Psk::from_file(&path).map_err(|source| WitnessError::HostKey {
                path: path.clone(),
                source,
            })?;
            keys.insert(host.to_owned(), psk);
        }
        let Some(any) = keys.values().next().cloned() else {
            return Err(WitnessError::NoHostKeys(dir.clone()));
        };
        info!(
            "a key per host: {}",
            keys.keys().cloned().collect::<Vec<_>>().join(", ")
        );
        let mut config = LinkConfig::new(any, host_id);
        config.client_keys = Some(Arc::new(keys));
        Ok(config)
    }
}

/// Decides requests; one lock makes each decide-and-persist atomic.
pub struct Arbiter {
    store: Mutex<WitnessStore>,
}

impl Arbiter {
    pub fn new(store: WitnessStore) -> Arbiter {
        Arbiter {
            store: Mutex::new(store),
        }
    }

    /// Answers `request` from the host authenticated as `sender` (`None`: not checked,
    /// for tests of the rules alone). A host may only speak for pairs it belongs to, and
    /// only claim for itself.
    pub fn handle(&self, request: WitnessRequest, sender: Option<&str>) -> WitnessReply {
        let root = match self.store.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let (pair, vm) = match &request {
            WitnessRequest::Register { pair, vm, .. }
            | WitnessRequest::Claim { pair, vm, .. }
            | WitnessRequest::Query { pair, vm }
            | WitnessRequest::Standalone { pair, vm, .. } => (pair.clone(), vm.clone()),
        };
        let refuse = |message: String| WitnessReply::Error {
            vm: vm.clone(),
            message,
        };
        if let Some(sender) = sender {
            if !pair.contains(sender) {
                return refuse(format!("host {sender:?} is not in the pair {:?}", pair.0));
            }
        }
        let store = match root.for_pair(&pair.0[0], &pair.0[1]) {
            Ok(store) => store,
            Err(error) => return refuse(error.to_string()),
        };
        let result = match request {
            WitnessRequest::Register { grant, .. } => {
                if !pair.contains(&grant.holder) {
                    return refuse(format!(
                        "holder {:?} is not in the pair {:?}",
                        grant.holder, pair.0
                    ));
                }
                register(&store, &vm, grant)
            }
            WitnessRequest::Claim { claim, .. } => {
                if sender.is_some_and(|sender| sender != claim.host) || !pair.contains(&claim.host)
                {
                    return refuse(format!(
                        "a host may only claim for itself (claim for {:?})",
                        claim.host
                    ));
                }
                decide(&store, &vm, claim)
            }
            WitnessRequest::Query { .. } => store.load(&vm).map(|grant| WitnessReply::Grant {
                vm: vm.clone(),
                grant,
            }),
            WitnessRequest::Standalone {
                generation,
                standalone,
                ..
            } => set_standalone(&store, &vm, sender, generation, standalone),
        };
        result.unwrap_or_else(|error| refuse(error.to_string()))
    }
}

fn register(
    store: &WitnessStore,
    vm: &str,
    grant: Grant<String>,
) -> Result<WitnessReply, StoreError> {
    let current = match store.load(vm)? {
        Some(existing) => existing,
        None => {
            store.save(vm, &grant)?;
            info!(
                "{vm}: registered, {} primary at generation {}",
                grant.holder, grant.generation
            );
            grant
        }
    };
    Ok(WitnessReply::Grant {
        vm: vm.to_owned(),
        grant: Some(current),
    })
}

fn set_standalone(
    store: &WitnessStore,
    vm: &str,
    sender: Option<&str>,
    generation: Generation,
    standalone: bool,
) -> Result<WitnessReply, StoreError> {
    let error = |message: String| WitnessReply::Error {
        vm: vm.to_owned(),
        message,
    };
    let Some((grant, current)) = store.load_entry(vm)? else {
        return Ok(error("unknown VM: its hosts must register it first".into()));
    };
    let holder_asks = sender.is_none_or(|sender| sender == grant.holder);
    if !holder_asks || grant.generation != generation {
        return Ok(error(format!(
            "only the holder of the current generation ({}, held by {}) may change the \
             VM's protection",
            grant.generation, grant.holder
        )));
    }
    let mut grant = grant;
    if current != standalone {
        if !standalone {
            grant.generation += 1;
        }
        store.save_entry(vm, &grant, standalone)?;
        info!(
            "{vm}: {} runs it {} at generation {}",
            grant.holder,
            if standalone {
                "unprotected (no other host may claim it)"
            } else {
                "protected again"
            },
            grant.generation
        );
    }
    Ok(WitnessReply::Standalone {
        vm: vm.to_owned(),
        standalone,
        generation: grant.generation,
    })
}

fn decide(
    store: &WitnessStore,
    vm: &str,
    claim: Claim<String>,
) -> Result<WitnessReply, StoreError> {
    let Some((grant, standalone)) = store.load_entry(vm)? else {
        return Ok(WitnessReply::Error {
            vm: vm.to_owned(),
            message: "unknown VM: its hosts must register it first".into(),
        });
    };
    if standalone && claim.host != grant.holder {
        info!(
            "{vm}: {} refused generation {}: {} runs the VM unprotected",
            claim.host, claim.generation, grant.holder
        );
        return Ok(WitnessReply::Verdict {
            vm: vm.to_owned(),
            verdict: Verdict::Refused {
                current: grant.generation,
                holder: grant.holder,
            },
        });
    }
    let mut witness = Witness::new(grant.clone());
    let verdict = witness.decide(claim.clone());
    if witness.grant() != &grant {
        // Durable before anyone hears of it.
        store.save_entry(vm, witness.grant(), standalone)?;
        info!(
            "{vm}: generation {} granted to {}",
            claim.generation, claim.host
        );
    } else if let Verdict::Refused { current, holder } = &verdict {
        info!(
            "{vm}: {} refused generation {} (current {current}, held by {holder})",
            claim.host, claim.generation
        );
    }
    Ok(WitnessReply::Verdict {
        vm: vm.to_owned(),
        verdict,
    })
}

/// Serves hosts until the process is stopped.
pub fn run(config: &WitnessConfig) -> Result<(), WitnessError> {
    let link = config.keys.link_config(&config.host_id)?;
    let store = WitnessStore::open(&config.state_dir)?;
    let listener =
        LinkListener::bind(config.listen.clone(), link).map_err(|source| WitnessError::Listen {
            addresses: config.listen.clone(),
            source,
        })?;
    info!(
        "witness serving on {:?}, state in {}",
        listener.local_addrs(),
        config.state_dir.display()
    );
    let arbiter = Arc::new(Arbiter::new(store));
    loop {
        let Some(event) = listener.next_event(Duration::from_secs(3600)) else {
            continue;
        };
        let (ListenerEvent::NewSession(session) | ListenerEvent::PeerRestarted { session, .. }) =
            event;
        info!("host {:?} connected", session.peer_id());
        let arbiter = arbiter.clone();
        let spawned = thread::Builder::new()
            .name("witness-session".into())
            .spawn(move || serve(session, &arbiter));
        if let Err(error) = spawned {
            warn!("cannot serve a host: {error}");
        }
    }
}

/// Answers one host's requests until its session ends.
fn serve(session: Session, arbiter: &Arbiter) {
    loop {
        let message = match session.recv(Duration::from_secs(1)) {
            Ok(Some(message)) => message,
            Ok(None) => continue,
            Err(_) => return,
        };
        let reply = match message.header::<WitnessRequest>() {
            Ok(request) => arbiter.handle(request, session.peer_id().as_deref()),
            Err(error) => WitnessReply::Error {
                vm: String::new(),
                message: format!("malformed request: {error}"),
            },
        };
        if let Err(error) = session.send_typed(&reply, Vec::new()) {
            warn!("cannot answer host {:?}: {error}", session.peer_id());
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> HostPair {
        HostPair::new("hostA", "hostB")
    }

    fn grant(generation: u64, holder: &str) -> Grant<String> {
        Grant {
            generation,
            holder: holder.into(),
        }
    }

    #[test]
    fn decisions_are_persisted_and_survive_a_new_arbiter() {
        let dir = tempfile::tempdir().expect("tempdir");
        let arbiter = Arbiter::new(WitnessStore::open(dir.path()).expect("store"));
        let registered = arbiter.handle(
            WitnessRequest::Register {
                pair: pair(),
                vm: "vm1".into(),
                grant: grant(1, "hostA"),
            },
            Some("hostA"),
        );
        assert_eq!(
            registered,
            WitnessReply::Grant {
                vm: "vm1".into(),
                grant: Some(grant(1, "hostA"))
            }
        );
        let claim = |host: &str| WitnessRequest::Claim {
            pair: pair(),
            vm: "vm1".into(),
            claim: Claim {
                host: host.into(),
                generation: 2,
                data_generation: 1,
            },
        };
        assert!(matches!(
            arbiter.handle(claim("hostB"), Some("hostB")),
            WitnessReply::Verdict {
                verdict: Verdict::Granted { generation: 2 },
                ..
            }
        ));
        // A witness restarted from its files still refuses the other host.
        let restarted = Arbiter::new(WitnessStore::open(dir.path()).expect("store"));
        assert!(matches!(
            restarted.handle(claim("hostA"), Some("hostA")),
            WitnessReply::Verdict {
                verdict: Verdict::Refused { current: 2, .. },
                ..
            }
        ));
        // Registering again does not overwrite the grant.
        let again = restarted.handle(
            WitnessRequest::Register {
                pair: pair(),
                vm: "vm1".into(),
                grant: grant(1, "hostA"),
            },
            Some("hostB"),
        );
        assert_eq!(
            again,
            WitnessReply::Grant {
                vm: "vm1".into(),
                grant: Some(grant(2, "hostB"))
            }
        );
    }

    #[test]
    fn bad_requests_get_an_error_reply() {
        let dir = tempfile::tempdir().expect("tempdir");
        let arbiter = Arbiter::new(WitnessStore::open(dir.path()).expect("store"));
        let unknown = arbiter.handle(
            WitnessRequest::Query {
                pair: pair(),
                vm: "../x".into(),
            },
            None,
        );
        assert!(matches!(unknown, WitnessReply::Error { .. }), "{unknown:?}");
        let claim = |host: &str| WitnessRequest::Claim {
            pair: pair(),
            vm: "vm9".into(),
            claim: Claim {
                host: host.into(),
                generation: 2,
                data_generation: 1,
            },
        };
        let unregistered = arbiter.handle(claim("hostA"), Some("hostA"));
        assert!(matches!(unregistered, WitnessReply::Error { .. }));
        // A host may not claim for its peer, nor speak for a pair it is not in.
        let impersonated = arbiter.handle(claim("hostB"), Some("hostA"));
        assert!(
            matches!(&impersonated, WitnessReply::Error { message, .. } if message.contains("only claim for itself")),
            "{impersonated:?}"
        );
        let outsider = arbiter.handle(claim("hostA"), Some("hostC"));
        assert!(
            matches!(&outsider, WitnessReply::Error { message, .. } if message.contains("not in the pair")),
            "{outsider:?}"
        );
    }

    #[test]
    fn an_unprotected_vm_cannot_be_claimed_by_the_other_host() {
        let dir = tempfile::tempdir().expect("tempdir");
        let arbiter = Arbiter::new(WitnessStore::open(dir.path()).expect("store"));
        let register = WitnessRequest::Register {
            pair: pair(),
            vm: "vm1".into(),
            grant: grant(1, "hostA"),
        };
        arbiter.handle(register, Some("hostA"));
        let standalone = |on: bool, generation: u64| WitnessRequest::Standalone {
            pair: pair(),
            vm: "vm1".into(),
            generation,
            standalone: on,
        };
        // Only the holder may change the protection.
        let by_peer = arbiter.handle(standalone(true, 1), Some("hostB"));
        assert!(matches!(by_peer, WitnessReply::Error { .. }), "{by_peer:?}");
        assert_eq!(
            arbiter.handle(standalone(true, 1), Some("hostA")),
            WitnessReply::Standalone {
                vm: "vm1".into(),
                standalone: true,
                generation: 1
            }
        );
        let claim = |host: &str, generation: u64, data_generation: u64| WitnessRequest::Claim {
            pair: pair(),
            vm: "vm1".into(),
            claim: Claim {
                host: host.into(),
                generation,
                data_generation,
            },
        };
        assert!(matches!(
            arbiter.handle(claim("hostB", 2, 1), Some("hostB")),
            WitnessReply::Verdict {
                verdict: Verdict::Refused { current: 1, .. },
                ..
            }
        ));
        // Protecting again grants the holder the next generation: the other copy, still
        // at 1, is outdated until it resyncs.
        assert_eq!(
            arbiter.handle(standalone(false, 1), Some("hostA")),
            WitnessReply::Standalone {
                vm: "vm1".into(),
                standalone: false,
                generation: 2
            }
        );
        assert!(matches!(
            arbiter.handle(claim("hostB", 3, 1), Some("hostB")),
            WitnessReply::Verdict {
                verdict: Verdict::Refused { current: 2, .. },
                ..
            }
        ));
        assert!(matches!(
            arbiter.handle(claim("hostB", 3, 2), Some("hostB")),
            WitnessReply::Verdict {
                verdict: Verdict::Granted { generation: 3 },
                ..
            }
        ));
    }

    #[test]
    fn two_pairs_may_protect_vms_of_the_same_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let arbiter = Arbiter::new(WitnessStore::open(dir.path()).expect("store"));
        for (a, b) in [("hostA", "hostB"), ("hostC", "hostD")] {
            let registered = arbiter.handle(
                WitnessRequest::Register {
                    pair: HostPair::new(b, a),
                    vm: "vm1".into(),
                    grant: grant(1, a),
                },
                Some(a),
            );
            assert_eq!(
                registered,
                WitnessReply::Grant {
                    vm: "vm1".into(),
                    grant: Some(grant(1, a))
                }
            );
        }
        let won = arbiter.handle(
            WitnessRequest::Claim {
                pair: HostPair::new("hostC", "hostD"),
                vm: "vm1".into(),
                claim: Claim {
                    host: "hostD".into(),
                    generation: 2,
                    data_generation: 1,
                },
            },
            Some("hostD"),
        );
        assert!(matches!(
            won,
            WitnessReply::Verdict {
                verdict: Verdict::Granted { generation: 2 },
                ..
            }
        ));
        // The other pair's vm1 is untouched.
        let other = arbiter.handle(
            WitnessRequest::Query {
                pair: HostPair::new("hostA", "hostB"),
                vm: "vm1".into(),
            },
            Some("hostB"),
        );
        assert_eq!(
            other,
            WitnessReply::Grant {
                vm: "vm1".into(),
                grant: Some(grant(1, "hostA"))
            }
        );
        assert!(dir.path().join("hostC+hostD/vm1.grant.json").exists());
    }
}
