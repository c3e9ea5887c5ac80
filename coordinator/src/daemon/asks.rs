//! Requests answered later, from facts gathered off the deciding thread and from the
//! peer: `ftvm check` (and the check before `ftvm protect`, and the one when the peer
//! rejoins) and `ftvm collect-logs`. The main loop starts them ([`Asks::start`]), hands
//! the peer's questions to threads ([`Asks::serve`]) and, every step, finishes what is
//! complete ([`Asks::poll`]).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use log::warn;
use serde::{Deserialize, Serialize};

use super::control::{CheckReport, Reply};
use super::links::{PeerLink, PeerMessage};
use crate::check::facts::{self, Gather};
use crate::check::{Comparison, HostFacts};
use crate::collect::Bundle;

/// How long the peer has to answer (within the CLI's 30 s).
const PEER_DEADLINE: Duration = Duration::from_secs(25);
/// Questions from the peer served at once; more wait their turn.
const MAX_SERVING: usize = 2;
/// Questions from the peer waiting for their turn; more are refused (answered so).
const MAX_WAITING: usize = 16;

/// What one host asks the other.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Question {
    /// Its facts for `ftvm check`; `level`: the level `vm` is checked for (`ftvm protect
    /// --level`), else each VM's own.
    Facts {
        vm: Option<String>,
        level: Option<u8>,
    },
    /// Its part of `ftvm collect-logs`.
    Bundle,
}

/// The answer, in the payload of [`PeerMessage::Answer`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Answer {
    Facts(Box<HostFacts>),
    Bundle(Box<Bundle>),
    /// The question was not served (too many at once).
    Refused(String),
}

/// What to do with a finished check.
pub enum Then {
    /// Answer `ftvm check`.
    Reply(Sender<Reply>),
    /// `ftvm protect`: protect unless a finding blocks; the main loop does it.
    Protect {
        vm: String,
        level: u8,
        peer: String,
        answer: Sender<Reply>,
    },
    /// The peer rejoined: the findings become events.
    Events,
    /// Answer `ftvm collect-logs`.
    Collect(Sender<Reply>),
}

/// A finished request for the main loop to act on.
pub enum Finished {
    Check {
        report: CheckReport,
        then: Then,
    },
    Collect {
        bundles: Vec<Bundle>,
        answer: Sender<Reply>,
    },
}

/// How a local part is made (on a thread).
pub enum Work {
    Facts(Gather),
    Bundle(Box<dyn FnOnce() -> Bundle + Send>),
}

struct Pending {
    id: u64,
    vm: Option<String>,
    then: Then,
    local: Option<Answer>,
    /// `None`: not asked; `Some(Err)`: why there is no answer; `Some(Ok)`: the answer,
    /// and this host's clock when it came.
    peer: Option<Result<(Answer, u64), String>>,
    asked_peer: bool,
    deadline: Instant,
}

/// Answers made on threads, by the id of their request.
type Channel = (Sender<(u64, Answer)>, Receiver<(u64, Answer)>);

pub struct Asks {
    next_id: u64,
    pending: Vec<Pending>,
    local: Channel,
    /// Answers to the peer's questions, made on threads.
    serving: Channel,
    serving_count: usize,
    waiting: VecDeque<(u64, Work)>,
    /// Refusals to send (more questions than [`MAX_WAITING`]).
    refused: Vec<(u64, Answer)>,
    peer_name: String,
}

impl Asks {
    pub fn new(peer_name: &str) -> Asks {
        Asks {
            next_id: 1,
            pending: Vec::new(),
            local: mpsc::channel(),
            serving: mpsc::channel(),
            serving_count: 0,
            waiting: VecDeque::new(),
            refused: Vec::new(),
            peer_name: peer_name.to_owned(),
        }
    }

    /// Starts a request: `work` on a thread, and `question` to the peer if given (a peer
    /// that is not reachable is noted, not waited for).
    pub fn start(
        &mut self,
        vm: Option<String>,
        work: Work,
        question: Option<Question>,
        then: Then,
        peer: &PeerLink,
    ) {
        let id = self.next_id;
        self.next_id += 1;
        let sender = self.local.0.clone();
        spawn("ftvm-ask", move || {
            let _ = sender.send((id, make(work)));
        });
        let mut pending = Pending {
            id,
            vm,
            then,
            local: None,
            peer: None,
            asked_peer: question.is_some(),
            deadline: Instant::now() + PEER_DEADLINE,
        };
        if let Some(question) = question {
            // Once, on one link: each copy would cost the peer a QEMU probe.
            if !peer.send_once(&PeerMessage::Ask { id, question }, Vec::new()) {
                pending.peer = Some(Err(format!("all A-links to {} are down", self.peer_name)));
            }
        }
        self.pending.push(pending);
    }

    /// The peer asked: the answer is made on a thread (at most [`MAX_SERVING`] at once, the
    /// others wait their turn, up to [`MAX_WAITING`]) and sent by [`Asks::poll`].
    pub fn serve(&mut self, id: u64, work: Work) {
        if self.serving_count < MAX_SERVING {
            self.serving_count += 1;
            let sender = self.serving.0.clone();
            spawn("ftvm-answer", move || {
                let _ = sender.send((id, make(work)));
            });
        } else if self.waiting.len() < MAX_WAITING {
            self.waiting.push_back((id, work));
        } else {
            self.refused.push((
                id,
                Answer::Refused(format!(
                    "{} questions are being answered or waiting already",
                    MAX_SERVING + MAX_WAITING
                )),
            ));
        }
    }

    /// The peer's answer to `id` (its payload).
    pub fn answered(&mut self, id: u64, payload: &[u8]) {
        let Some(pending) = self.pending.iter_mut().find(|pending| pending.id == id) else {
            return;
        };
        if pending.peer.is_some() {
            return;
        }
        pending.peer = Some(match postcard::from_bytes::<Answer>(payload) {
            Ok(Answer::Refused(why)) => Err(format!("{} refused: {why}", self.peer_name)),
            Ok(answer) => Ok((answer, facts::unix_ms())),
            Err(error) => Err(format!("its answer is malformed: {error}")),
        });
    }

    /// Sends finished answers to the peer and returns the requests that are complete.
    pub fn poll(&mut self, peer: &PeerLink) -> Vec<Finished> {
        while let Ok((id, mut answer)) = self.serving.1.try_recv() {
            self.serving_count = self.serving_count.saturating_sub(1);
            // The clock as it leaves, for the asking host's comparison.
            if let Answer::Facts(facts) = &mut answer {
                facts.unix_ms = facts::unix_ms();
            }
            answer_peer(peer, id, &answer);
        }
        for (id, answer) in self.refused.drain(..) {
            answer_peer(peer, id, &answer);
        }
        while self.serving_count < MAX_SERVING {
            let Some((id, work)) = self.waiting.pop_front() else {
                break;
            };
            self.serve(id, work);
        }
        while let Ok((id, answer)) = self.local.1.try_recv() {
            if let Some(pending) = self.pending.iter_mut().find(|pending| pending.id == id) {
                pending.local = Some(answer);
            }
        }
        let now = Instant::now();
        for pending in &mut self.pending {
            if pending.asked_peer && pending.peer.is_none() && now >= pending.deadline {
                pending.peer = Some(Err(format!(
                    "{} did not answer within {} s",
                    self.peer_name,
                    PEER_DEADLINE.as_secs()
                )));
            }
        }
        let (done, waiting): (Vec<Pending>, Vec<Pending>) =
            self.pending.drain(..).partition(|pending| {
                pending.local.is_some() && (!pending.asked_peer || pending.peer.is_some())
            });
        self.pending = waiting;
        done.into_iter()
            .filter_map(|pending| finish(pending, &self.peer_name))
            .collect()
    }
}

fn answer_peer(peer: &PeerLink, id: u64, answer: &Answer) {
    let payload = postcard::to_allocvec(answer).unwrap_or_default();
    if !peer.send_once(&PeerMessage::Answer { id }, payload) {
        warn!("cannot answer the peer's question {id}: no A-link is up");
    }
}

fn spawn(name: &str, work: impl FnOnce() + Send + 'static) {
    if let Err(error) = std::thread::Builder::new().name(name.into()).spawn(work) {
        warn!("cannot start a thread: {error}");
    }
}

fn make(work: Work) -> Answer {
    match work {
        Work::Facts(input) => Answer::Facts(Box::new(facts::gather(&input))),
        Work::Bundle(make) => Answer::Bundle(Box::new(make())),
    }
}

fn finish(pending: Pending, peer_name: &str) -> Option<Finished> {
    let Pending {
        vm,
        then,
        local,
        peer,
        ..
    } = pending;
    match (then, local?) {
        (Then::Collect(answer), Answer::Bundle(bundle)) => {
            let mut bundles = vec![*bundle];
            match peer {
                Some(Ok((Answer::Bundle(theirs), _))) => bundles.push(*theirs),
                Some(Ok(_)) => bundles[0].notes.push(format!(
                    "{peer_name}: not collected: an answer of the wrong kind"
                )),
                Some(Err(why)) => bundles[0]
                    .notes
                    .push(format!("{peer_name}: not collected: {why}")),
                None => {}
            }
            Some(Finished::Collect { bundles, answer })
        }
        (then, Answer::Facts(local)) => {
            let peer_facts: Option<Result<(HostFacts, u64), String>> =
                peer.map(|peer| match peer {
                    Ok((Answer::Facts(facts), received)) => Ok((*facts, received)),
                    Ok(_) => Err("an answer of the wrong kind".into()),
                    Err(why) => Err(why),
                });
            let findings = crate::check::compare(&Comparison {
                local: &local,
                peer: peer_facts.as_ref().map(|peer| {
                    peer.as_ref()
                        .map(|(facts, at)| (facts, *at))
                        .map_err(Clone::clone)
                }),
                peer_name,
                vm: vm.as_deref(),
            });
            let mut hosts = vec![*local];
            if let Some(Ok((facts, _))) = peer_facts {
                hosts.push(facts);
            }
            Some(Finished::Check {
                report: CheckReport { findings, hosts },
                then,
            })
        }
        (_, _) => None,
    }
}

/// The files a bundle leaves out whatever their name: the configured key files.
pub fn key_files(config: &crate::config::Config) -> Vec<PathBuf> {
    vec![
        config.peer.psk_file.clone(),
        config.witness.psk_file.clone(),
    ]
}
