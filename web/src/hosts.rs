//! The console's side of each managed host: how it reaches that host's ftvmd (the control
//! API over TCP, or the control socket of the console's own host), a poll loop per host,
//! and the page's view of every pair built from what the hosts last said.
//!
//! Nothing here can touch failover: the console only asks ftvmd, as `ftvm` does, from its
//! own process, and shares no lock or file with it. A host that does not answer is shown
//! as unreachable; the others go on.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use control_protocol::disk::Replication;
use coordinator::api::ApiClient;
use coordinator::daemon::control::{self, HostStatus, Reply, Request};
use coordinator::daemon::events::Event;
use coordinator::host::Role;
use daemon_util::lock;
use serde::Serialize;
use tokio::sync::watch;

use crate::config::{self, Config};

/// How often each host is asked for its status (the page is live within this).
const STATUS_PERIOD: Duration = Duration::from_millis(250);
/// How often each host is asked for its events.
const EVENTS_PERIOD: Duration = Duration::from_secs(1);
/// How long a status question may take before the host counts as unreachable.
const STATUS_TIMEOUT: Duration = Duration::from_secs(3);
/// How long an operator's action may take to be answered.
pub const ACTION_TIMEOUT: Duration = Duration::from_secs(40);
/// Events kept per host on the page.
const EVENTS_SHOWN: usize = 50;

enum Link {
    Api(ApiClient),
    Local(PathBuf),
}

/// One managed host.
pub struct HostLink {
    pub pair: String,
    pub name: String,
    link: Link,
}

impl std::fmt::Debug for HostLink {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "HostLink({}/{})", self.pair, self.name)
    }
}

impl HostLink {
    fn new(pair: &str, host: &config::Host, client_id: &str) -> Result<HostLink, String> {
        let link = match (&host.control_socket, &host.api_key_file) {
            (Some(socket), _) => Link::Local(socket.clone()),
            (None, Some(key_file)) => Link::Api(
                ApiClient::connect(host.api.clone(), key_file, client_id)
                    .map_err(|error| format!("host {}: {error}", host.name))?,
            ),
            (None, None) => return Err(format!("host {}: no way to reach it", host.name)),
        };
        Ok(HostLink {
            pair: pair.to_owned(),
            name: host.name.clone(),
            link,
        })
    }

    /// Asks the host's ftvmd (blocking: call from a blocking thread).
    pub fn ask(&self, request: &Request, timeout: Duration) -> Result<Reply, String> {
        match &self.link {
            Link::Api(client) => client.request(request, timeout),
            Link::Local(socket) => control::request(socket, request),
        }
    }
}

/// What one host said last.
#[derive(Clone, Debug, Default)]
struct Heard {
    status: Option<HostStatus>,
    /// Why the last status question failed.
    error: Option<String>,
    events: Vec<Event>,
}

/// Every managed host, what each said last, and the page's view of it.
#[derive(Debug)]
pub struct Hosts {
    pub links: Vec<Arc<HostLink>>,
    pairs: Vec<(String, [String; 2])>,
    heard: Mutex<HashMap<(String, String), Heard>>,
    view: watch::Sender<Arc<String>>,
}

impl Hosts {
    pub fn new(config: &Config) -> Result<Arc<Hosts>, String> {
        let mut links = Vec::new();
        let mut pairs = Vec::new();
        for pair in &config.pairs {
            for host in &pair.hosts {
                links.push(Arc::new(HostLink::new(
                    &pair.name,
                    host,
                    &config.client_id,
                )?));
            }
            pairs.push((
                pair.name.clone(),
                [pair.hosts[0].name.clone(), pair.hosts[1].name.clone()],
            ));
        }
        let (view, _) = watch::channel(Arc::new(String::from("{}")));
        Ok(Arc::new(Hosts {
            links,
            pairs,
            heard: Mutex::new(HashMap::new()),
            view,
        }))
    }

    /// The host `name` of pair `pair`.
    pub fn find(&self, pair: &str, name: &str) -> Option<Arc<HostLink>> {
        self.links
            .iter()
            .find(|link| link.pair == pair && link.name == name)
            .cloned()
    }

    /// The page's view, as JSON, each time it changes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<String>> {
        self.view.subscribe()
    }

    /// The view now.
    pub fn view(&self) -> Arc<String> {
        self.view.borrow().clone()
    }

    /// Starts a poll loop per host and the loop that renders the view.
    pub fn start(self: &Arc<Self>) {
        for link in &self.links {
            let (hosts, link) = (Arc::clone(self), Arc::clone(link));
            tokio::spawn(async move { hosts.poll(link).await });
        }
        let hosts = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(STATUS_PERIOD);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let text = Arc::new(hosts.render());
                hosts.view.send_if_modified(|view| {
                    let changed = **view != *text;
                    if changed {
                        *view = Arc::clone(&text);
                    }
                    changed
                });
            }
        });
    }

    async fn poll(self: Arc<Self>, link: Arc<HostLink>) {
        let key = (link.pair.clone(), link.name.clone());
        let mut ticker = tokio::time::interval(STATUS_PERIOD);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut events_due = tokio::time::Instant::now();
        loop {
            ticker.tick().await;
            let want_events = tokio::time::Instant::now() >= events_due;
            let asking = Arc::clone(&link);
            let answer = tokio::task::spawn_blocking(move || {
                let status = asking.ask(&Request::Status, STATUS_TIMEOUT);
                let events = want_events.then(|| asking.ask(&Request::Events, STATUS_TIMEOUT));
                (status, events)
            })
            .await;
            let Ok((status, events)) = answer else {
                continue;
            };
            if want_events {
                events_due = tokio::time::Instant::now() + EVENTS_PERIOD;
            }
            let mut heard = lock(&self.heard);
            let entry = heard.entry(key.clone()).or_default();
            match status {
                Ok(Reply::Status(status)) => {
                    entry.status = Some(*status);
                    entry.error = None;
                }
                Ok(other) => {
                    entry.status = None;
                    entry.error = Some(format!("unexpected answer: {other:?}"));
                }
                Err(error) => {
                    entry.status = None;
                    entry.error = Some(error);
                }
            }
            if let Some(Ok(Reply::Events(mut list))) = events {
                let keep = list.len().saturating_sub(EVENTS_SHOWN);
                entry.events = list.split_off(keep);
            }
        }
    }

    fn render(&self) -> String {
        let heard = lock(&self.heard).clone();
        let pairs: Vec<PairView> = self
            .pairs
            .iter()
            .map(|(pair, names)| pair_view(pair, names, &heard))
            .collect();
        serde_json::to_string(&View { pairs }).unwrap_or_else(|_| "{}".into())
    }
}

#[derive(Debug, Serialize)]
struct View {
    pairs: Vec<PairView>,
}

#[derive(Debug, Serialize)]
struct PairView {
    name: String,
    hosts: Vec<HostView>,
    vms: Vec<VmView>,
    events: Vec<EventView>,
}

#[derive(Debug, Serialize)]
struct HostView {
    name: String,
    reachable: bool,
    error: Option<String>,
    peer_reachable: bool,
    links_up: usize,
    links: usize,
    witness_reachable: bool,
    disabled: bool,
}

#[derive(Debug, Serialize)]
struct VmView {
    name: String,
    level: u8,
    state: String,
    primary: Option<String>,
    secondary: Option<String>,
    generation: u64,
    sync_percent: Option<f64>,
    /// `ok`, `degraded` or `down`.
    health: &'static str,
    /// Why it is not `ok`.
    reasons: Vec<String>,
    /// The disks' replication links on the primary: `up` of each.
    disk_links: Vec<Vec<bool>>,
    /// Per NIC, each host's path for the guest's frames.
    nics: Vec<NicView>,
    migrating: bool,
}

#[derive(Debug, Serialize)]
struct NicView {
    mac: String,
    /// (host, "local" | "peer" | "-") for each host that runs the NIC's daemon.
    paths: Vec<(String, String)>,
}

#[derive(Debug, Serialize)]
struct EventView {
    unix_ms: u64,
    host: String,
    severity: String,
    vm: String,
    what: String,
    advice: String,
}

fn pair_view(
    pair: &str,
    names: &[String; 2],
    heard: &HashMap<(String, String), Heard>,
) -> PairView {
    let statuses: Vec<(&String, Option<&HostStatus>, Option<&Heard>)> = names
        .iter()
        .map(|name| {
            let entry = heard.get(&(pair.to_owned(), name.clone()));
            (name, entry.and_then(|heard| heard.status.as_ref()), entry)
        })
        .collect();
    let hosts = statuses
        .iter()
        .map(|(name, status, entry)| match status {
            Some(status) => HostView {
                name: (*name).clone(),
                reachable: true,
                error: None,
                peer_reachable: status.peer_reachable,
                links_up: status.links_up,
                links: status.links,
                witness_reachable: status.witness_reachable,
                disabled: status.disabled,
            },
            None => HostView {
                name: (*name).clone(),
                reachable: false,
                error: Some(
                    entry
                        .and_then(|heard| heard.error.clone())
                        .unwrap_or_else(|| "not asked yet".into()),
                ),
                peer_reachable: false,
                links_up: 0,
                links: 0,
                witness_reachable: false,
                disabled: false,
            },
        })
        .collect::<Vec<_>>();
    let mut vm_names: Vec<&str> = statuses
        .iter()
        .filter_map(|(_, status, _)| *status)
        .flat_map(|status| status.vms.iter().map(|vm| vm.name.as_str()))
        .collect();
    vm_names.sort_unstable();
    vm_names.dedup();
    let vms = vm_names
        .into_iter()
        .filter_map(|name| vm_view(name, &statuses, &hosts))
        .collect();
    let mut events: Vec<EventView> = statuses
        .iter()
        .filter_map(|(host, _, entry)| entry.map(|heard| (host, heard)))
        .flat_map(|(host, heard)| {
            heard.events.iter().map(|event| EventView {
                unix_ms: event.unix_ms,
                host: (*host).clone(),
                severity: format!("{:?}", event.severity),
                vm: event.vm.clone(),
                what: event.what.clone(),
                advice: event.advice.clone(),
            })
        })
        .collect();
    events.sort_by_key(|event| std::cmp::Reverse(event.unix_ms));
    events.truncate(EVENTS_SHOWN);
    PairView {
        name: pair.to_owned(),
        hosts,
        vms,
        events,
    }
}

fn vm_view(
    name: &str,
    statuses: &[(&String, Option<&HostStatus>, Option<&Heard>)],
    hosts: &[HostView],
) -> Option<VmView> {
    let seen: Vec<(&String, &coordinator::daemon::vm::VmStatus)> = statuses
        .iter()
        .filter_map(|(host, status, _)| {
            status.and_then(|status| {
                status
                    .vms
                    .iter()
                    .find(|vm| vm.name == name)
                    .map(|vm| (*host, vm))
            })
        })
        .collect();
    // The primary's word counts; a secondary's while the primary is not heard.
    let (_, vm) = seen
        .iter()
        .find(|(_, vm)| vm.role == Role::Primary)
        .or_else(|| seen.first())
        .copied()?;
    let mut reasons = Vec::new();
    if vm.state != "Protected" {
        reasons.push(format!("state {}", vm.state));
    }
    for host in hosts {
        if !host.reachable {
            reasons.push(format!("{} not reachable", host.name));
        } else {
            if host.links_up < host.links {
                reasons.push(format!(
                    "{}: {} of {} A-links up",
                    host.name, host.links_up, host.links
                ));
            }
            if !host.witness_reachable {
                reasons.push(format!("{}: witness unreachable", host.name));
            }
        }
    }
    let disk_links = vm
        .disks
        .iter()
        .map(|disk| {
            let links = match disk.as_ref().map(|disk| &disk.replication) {
                Some(Replication::Primary(primary)) => Some(&primary.links),
                Some(Replication::Secondary(secondary)) => Some(&secondary.links),
                _ => None,
            };
            links
                .and_then(|links| links["links"].as_array())
                .map(|links| links.iter().map(|link| link["up"] == true).collect())
                .unwrap_or_default()
        })
        .collect::<Vec<Vec<bool>>>();
    if disk_links.iter().any(|links| links.iter().any(|up| !up)) {
        reasons.push("a disk's A-link is down".into());
    }
    let nics = vm
        .nics
        .iter()
        .enumerate()
        .map(|(index, nic)| NicView {
            mac: nic.mac.clone(),
            paths: seen
                .iter()
                .filter_map(|(host, vm)| {
                    let nic = vm.nics.get(index)?;
                    nic.pid?;
                    let path = nic
                        .path
                        .map_or_else(|| "-".to_owned(), |path| format!("{path:?}").to_lowercase());
                    Some(((*host).clone(), path))
                })
                .collect(),
        })
        .collect();
    let health = if seen.iter().all(|(_, vm)| vm.vm_pid.is_none()) {
        reasons.push("not running on either host".into());
        "down"
    } else if reasons.is_empty() {
        "ok"
    } else {
        "degraded"
    };
    Some(VmView {
        name: name.to_owned(),
        level: vm.level,
        state: vm.state.clone(),
        primary: vm.primary.clone(),
        secondary: vm.secondary.clone(),
        generation: vm.generation,
        sync_percent: vm.sync_percent,
        health,
        reasons,
        disk_links,
        nics,
        migrating: vm.migration.is_some(),
    })
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}
