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

/// A host's request to the witness.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WitnessRequest {
    /// First protection of a VM: its primary holds `grant`. An existing grant is kept.
    Register {
        vm: String,
        grant: Grant<String>,
    },
    Claim {
        vm: String,
        claim: Claim<String>,
    },
    Query {
        vm: String,
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
    pub psk_file: PathBuf,
    pub host_id: String,
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

    pub fn handle(&self, request: WitnessRequest) -> WitnessReply {
        let store = match self.store.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let (vm, result) = match request {
            WitnessRequest::Register { vm, grant } => {
                let result = register(&store, &vm, grant);
                (vm, result)
            }
            WitnessRequest::Claim { vm, claim } => {
                let result = decide(&store, &vm, claim);
                (vm, result)
            }
            WitnessRequest::Query { vm } => {
                let result = store.load(&vm).map(|grant| WitnessReply::Grant {
                    vm: vm.clone(),
                    grant,
                });
                (vm, result)
            }
        };
        result.unwrap_or_else(|error| WitnessReply::Error {
            vm,
            message: error.to_string(),
        })
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

fn decide(
    store: &WitnessStore,
    vm: &str,
    claim: Claim<String>,
) -> Result<WitnessReply, StoreError> {
    let Some(grant) = store.load(vm)? else {
        return Ok(WitnessReply::Error {
            vm: vm.to_owned(),
            message: "unknown VM: its hosts must register it first".into(),
        });
    };
    let mut witness = Witness::new(grant.clone());
    let verdict = witness.decide(claim.clone());
    if witness.grant() != &grant {
        // Durable before anyone hears of it.
        store.save(vm, witness.grant())?;
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
    let psk = Psk::from_file(&config.psk_file).map_err(WitnessError::Psk)?;
    let store = WitnessStore::open(&config.state_dir)?;
    let link = LinkConfig::new(psk, config.host_id.clone());
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
            Ok(request) => arbiter.handle(request),
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
        let registered = arbiter.handle(WitnessRequest::Register {
            vm: "vm1".into(),
            grant: grant(1, "hostA"),
        });
        assert_eq!(
            registered,
            WitnessReply::Grant {
                vm: "vm1".into(),
                grant: Some(grant(1, "hostA"))
            }
        );
        let claim = |host: &str| WitnessRequest::Claim {
            vm: "vm1".into(),
            claim: Claim {
                host: host.into(),
                generation: 2,
                data_generation: 1,
            },
        };
        assert!(matches!(
            arbiter.handle(claim("hostB")),
            WitnessReply::Verdict {
                verdict: Verdict::Granted { generation: 2 },
                ..
            }
        ));
        // A witness restarted from its files still refuses the other host.
        let restarted = Arbiter::new(WitnessStore::open(dir.path()).expect("store"));
        assert!(matches!(
            restarted.handle(claim("hostA")),
            WitnessReply::Verdict {
                verdict: Verdict::Refused { current: 2, .. },
                ..
            }
        ));
        // Registering again does not overwrite the grant.
        let again = restarted.handle(WitnessRequest::Register {
            vm: "vm1".into(),
            grant: grant(1, "hostA"),
        });
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
        let unknown = arbiter.handle(WitnessRequest::Query { vm: "../x".into() });
        assert!(matches!(unknown, WitnessReply::Error { .. }), "{unknown:?}");
        let unregistered = arbiter.handle(WitnessRequest::Claim {
            vm: "vm9".into(),
            claim: Claim {
                host: "hostA".into(),
                generation: 2,
                data_generation: 1,
            },
        });
        assert!(matches!(unregistered, WitnessReply::Error { .. }));
    }
}
