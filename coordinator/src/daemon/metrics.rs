//! `/metrics`: ftvmd's state in the Prometheus text format (issue 15), served on
//! `[host] metrics_listen` when it is set.
//!
//! Each scrape asks the main loop for the same snapshot `ftvm status` shows and renders it
//! with the `prometheus-client` crate; no state lives here. Names and labels follow the
//! Prometheus conventions (base units, `_total` counters, one `state` label set to 1 for
//! the current state); `docs/METRICS.md` lists them.
//!
//! The server is a thread with a plain HTTP/1.0 exchange per connection: a `GET` (or
//! `HEAD`) of `/metrics` answers 200, any other path 404, any other method 405. A request
//! head is read up to 8 KiB with a 5 s timeout; a slow or hostile client holds only its
//! own connection, and the main loop only for the time of one snapshot.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{self, Sender};
use std::thread;
use std::time::Duration;

use control_protocol::disk;
use log::{debug, info};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::alerts::AgentStatus;
use super::control::{HostStatus, Pending, Reply, Request};
use super::links::ALinkStatus;
use super::nics::NicRelay;
use crate::host::Role;

/// Longest request head read.
const MAX_HEAD_BYTES: usize = 8 * 1024;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a scrape waits for the main loop's snapshot.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(5);
/// The content type of the text format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Binds `listen` and serves `/metrics` on a thread; snapshots come from the main loop
/// through `requests` (the control socket's channel).
pub fn serve(listen: SocketAddr, requests: Sender<Pending>) -> Result<(), String> {
    let listener = TcpListener::bind(listen)
        .map_err(|error| format!("cannot serve metrics on {listen}: {error}"))?;
    info!("metrics on http://{listen}/metrics");
    thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        if let Err(error) = answer(stream, &requests) {
                            debug!("metrics client: {error}");
                        }
                    }
                    Err(error) => debug!("metrics: accept: {error}"),
                }
            }
        })
        .map(|_| ())
        .map_err(|error| format!("cannot start a thread: {error}"))
}

fn answer(mut stream: TcpStream, requests: &Sender<Pending>) -> io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let head = read_head(&mut stream)?;
    let line = head.lines().next().unwrap_or_default();
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => match snapshot(requests) {
            Ok(status) => match render(&status) {
                Ok(text) => ("200 OK", text),
                Err(error) => ("500 Internal Server Error", format!("{error}\n")),
            },
            Err(error) => ("503 Service Unavailable", format!("{error}\n")),
        },
        ("GET" | "HEAD", _) => ("404 Not Found", "only /metrics is here\n".to_owned()),
        _ => ("405 Method Not Allowed", "GET /metrics\n".to_owned()),
    };
    let mut response = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        response.push_str(&body);
    }
    stream.write_all(response.as_bytes())
}

/// Reads until the blank line that ends the head, at most [`MAX_HEAD_BYTES`].
fn read_head(stream: &mut TcpStream) -> io::Result<String> {
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|window| window == b"\r\n\r\n")
        && !head.windows(2).any(|window| window == b"\n\n")
    {
        if head.len() >= MAX_HEAD_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
        let read = stream.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        head.extend_from_slice(&buffer[..read]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

fn snapshot(requests: &Sender<Pending>) -> Result<HostStatus, String> {
    let (answer, answered) = mpsc::channel();
    requests
        .send((Request::Status, answer))
        .map_err(|_| "ftvmd is stopping".to_owned())?;
    match answered.recv_timeout(SNAPSHOT_TIMEOUT) {
        Ok(Reply::Status(status)) => Ok(*status),
        Ok(_) => Err("unexpected answer from ftvmd's main loop".into()),
        Err(_) => Err("ftvmd's main loop did not answer in time".into()),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabels {
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabels {
    vm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmStateLabels {
    vm: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DiskLabels {
    vm: String,
    disk: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NicLabels {
    vm: String,
    mac: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Every state word a VM can show (`ftvm status`): each gets a series, 1 for the current.
const STATES: &[&str] = &[
    "Protected",
    "Syncing",
    "Holding",
    "Degraded",
    "Fenced",
    "RemoteOnly",
    "Rebuilding",
    "Standby",
    "Inconsistent",
    "Failed",
    "Waiting",
    "Unprotected",
    "Unknown",
];

/// The metrics of one snapshot, in the text format.
pub fn render(status: &HostStatus) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("ftvm");
    let host = HostLabels {
        host: status.host.clone(),
    };
    let flag = |value: bool| i64::from(value);

    let peer_reachable = Family::<HostLabels, Gauge>::default();
    peer_reachable
        .get_or_create(&host)
        .set(flag(status.peer_reachable));
    registry.register(
        "peer_reachable",
        "The peer host is heard on at least one A-link (1) or not (0)",
        peer_reachable,
    );
    let links_up = Family::<HostLabels, Gauge>::default();
    links_up.get_or_create(&host).set(status.links_up as i64);
    registry.register("alinks_up", "A-links to the peer that are up", links_up);
    let links = Family::<HostLabels, Gauge>::default();
    links.get_or_create(&host).set(status.links as i64);
    registry.register("alinks", "A-links to the peer configured", links);
    let witness = Family::<HostLabels, Gauge>::default();
    witness
        .get_or_create(&host)
        .set(flag(status.witness_reachable));
    registry.register(
        "witness_reachable",
        "The quorum witness answers (1) or not (0)",
        witness,
    );
    let keys = Family::<HostLabels, Gauge>::default();
    keys.get_or_create(&host)
        .set(status.pair_key.held.len() as i64);
    registry.register(
        "pair_keys_held",
        "Pair keys this host accepts: 2 while a key rotation is under way",
        keys,
    );
    let disabled = Family::<HostLabels, Gauge>::default();
    disabled.get_or_create(&host).set(flag(status.disabled));
    registry.register(
        "host_disabled",
        "The host is disabled for maintenance (ftvm host disable)",
        disabled,
    );

    let level = Family::<VmLabels, Gauge>::default();
    let primary = Family::<VmLabels, Gauge>::default();
    let state = Family::<VmStateLabels, Gauge>::default();
    let generation = Family::<VmLabels, Gauge>::default();
    let sync = Family::<VmLabels, FloatGauge>::default();
    let running = Family::<VmLabels, Gauge>::default();
    let paused = Family::<VmLabels, Gauge>::default();
    let migrating = Family::<VmLabels, Gauge>::default();
    let read_bytes = Family::<DiskLabels, Counter>::default();
    let written_bytes = Family::<DiskLabels, Counter>::default();
    let io_errors = Family::<DiskLabels, Counter>::default();
    let rejected = Family::<DiskLabels, Counter>::default();
    let in_flight = Family::<DiskLabels, Gauge>::default();
    let out_of_sync = Family::<DiskLabels, Gauge>::default();
    let resync_total = Family::<DiskLabels, Gauge>::default();
    let resync_done = Family::<DiskLabels, Gauge>::default();
    let resync_rate = Family::<DiskLabels, Gauge>::default();
    let local_healthy = Family::<DiskLabels, Gauge>::default();
    let nic_via_peer = Family::<NicLabels, Gauge>::default();
    let nic_uplink_up = Family::<NicLabels, Gauge>::default();
    let mut nic_relay = NicRelayFamilies::default();
    let committed_epoch = Family::<VmLabels, Gauge>::default();
    let epochs_rate = Family::<VmLabels, FloatGauge>::default();
    let pause_p50 = Family::<VmLabels, FloatGauge>::default();
    let pause_p99 = Family::<VmLabels, FloatGauge>::default();
    let lag = Family::<VmLabels, Gauge>::default();
    let restorable = Family::<VmLabels, Gauge>::default();
    let mut write_latency = CountedHistograms::<DiskLabels>::default();
    let takeovers = Family::<VmLabels, Counter>::default();
    let takeover_duration = Family::<VmLabels, FloatGauge>::default();

    for vm in &status.vms {
        let labels = VmLabels {
            vm: vm.name.clone(),
        };
        level.get_or_create(&labels).set(i64::from(vm.level));
        primary
            .get_or_create(&labels)
            .set(flag(vm.role == Role::Primary));
        let known = STATES.contains(&vm.state.as_str());
        for word in STATES
            .iter()
            .copied()
            .chain((!known).then_some(vm.state.as_str()))
        {
            state
                .get_or_create(&VmStateLabels {
                    vm: vm.name.clone(),
                    state: word.to_owned(),
                })
                .set(flag(word == vm.state));
        }
        generation
            .get_or_create(&labels)
            .set(i64::try_from(vm.generation).unwrap_or(i64::MAX));
        if let Some(percent) = vm.sync_percent {
            sync.get_or_create(&labels).set(percent / 100.0);
        }
        running
            .get_or_create(&labels)
            .set(flag(vm.vm_pid.is_some() && !vm.vm_prestarted));
        paused.get_or_create(&labels).set(flag(vm.vm_paused));
        migrating
            .get_or_create(&labels)
            .set(flag(vm.migration.is_some()));
        takeovers.get_or_create(&labels).inc_by(vm.takeovers);
        if let Some(last_ms) = vm.last_takeover_ms {
            takeover_duration
                .get_or_create(&labels)
                .set(last_ms as f64 / 1000.0);
        }
        for (index, disk) in vm.disks.iter().enumerate() {
            let Some(disk) = disk else { continue };
            let labels = DiskLabels {
                vm: vm.name.clone(),
                disk: if disk.serial.is_empty() {
                    index.to_string()
                } else {
                    disk.serial.clone()
                },
            };
            read_bytes.get_or_create(&labels).inc_by(disk.read_bytes);
            written_bytes
                .get_or_create(&labels)
                .inc_by(disk.written_bytes);
            io_errors.get_or_create(&labels).inc_by(disk.io_errors);
            rejected
                .get_or_create(&labels)
                .inc_by(disk.rejected_requests);
            if let disk::Replication::Primary(replication) = &disk.replication {
                in_flight
                    .get_or_create(&labels)
                    .set(replication.in_flight_requests as i64);
                out_of_sync
                    .get_or_create(&labels)
                    .set(saturating(replication.out_of_sync_bytes));
                resync_total
                    .get_or_create(&labels)
                    .set(saturating(replication.resync.bytes_total));
                resync_done
                    .get_or_create(&labels)
                    .set(saturating(replication.resync.bytes_done));
                resync_rate
                    .get_or_create(&labels)
                    .set(saturating(replication.resync.rate_bytes_per_second));
                local_healthy
                    .get_or_create(&labels)
                    .set(flag(replication.local_disk == disk::LocalDisk::Healthy));
                write_latency.add(labels.clone(), &replication.write_latency);
            }
        }
        for nic in &vm.nics {
            let labels = NicLabels {
                vm: vm.name.clone(),
                mac: nic.mac.clone(),
            };
            if let Some(path) = nic.path.filter(|_| nic.answering) {
                nic_via_peer
                    .get_or_create(&labels)
                    .set(flag(path == control_protocol::nic::Path::Peer));
            }
            if let Some(up) = nic.uplink_up {
                nic_uplink_up.get_or_create(&labels).set(flag(up));
            }
            if let Some(relay) = &nic.relay {
                nic_relay.add(&labels, relay);
            }
        }
        if let Some(checkpoint) = &vm.checkpoint {
            if checkpoint["role"] == "primary" {
                let stats = &checkpoint["stats"];
                if let Some(epoch) = stats["committed_epoch"].as_u64() {
                    committed_epoch
                        .get_or_create(&labels)
                        .set(saturating(epoch));
                    epochs_rate
                        .get_or_create(&labels)
                        .set(stats["epochs_per_second"].as_f64().unwrap_or(0.0));
                    pause_p50
                        .get_or_create(&labels)
                        .set(stats["pause_p50_ms"].as_f64().unwrap_or(0.0) / 1000.0);
                    pause_p99
                        .get_or_create(&labels)
                        .set(stats["pause_p99_ms"].as_f64().unwrap_or(0.0) / 1000.0);
                    lag.get_or_create(&labels)
                        .set(saturating(stats["lag_epochs"].as_u64().unwrap_or(0)));
                }
            } else {
                restorable
                    .get_or_create(&labels)
                    .set(flag(checkpoint["restorable"] == true));
                if let Some(epoch) = checkpoint["committed_epoch"].as_u64() {
                    committed_epoch
                        .get_or_create(&labels)
                        .set(saturating(epoch));
                }
            }
        }
    }
    registry.register("vm_level", "The VM's protection level (1, 2 or 3)", level);
    registry.register(
        "vm_primary",
        "This host is the VM's primary (1) or its secondary (0)",
        primary,
    );
    registry.register(
        "vm_state",
        "The VM's state as `ftvm status` shows it: 1 for the current one",
        state,
    );
    registry.register(
        "vm_generation",
        "The VM's generation (the witness's fencing token)",
        generation,
    );
    registry.register(
        "vm_sync_ratio",
        "How much of this host's copy is in sync (0 to 1)",
        sync,
    );
    registry.register(
        "vm_running",
        "The VM's QEMU runs on this host (not one started ahead of a move)",
        running,
    );
    registry.register(
        "vm_paused",
        "ftvmd paused the guest here (writes held while the witness decides)",
        paused,
    );
    registry.register(
        "vm_migrating",
        "A move of the VM from this host is under way (ftvm migrate)",
        migrating,
    );
    registry.register(
        "vm_takeovers",
        "Times this host took the VM over (failover after a host loss, ftvm failover, ftvm \
         migrate) since ftvmd started",
        takeovers,
    );
    registry.register_with_unit(
        "vm_last_takeover_duration",
        "The last takeover here: from the last heartbeat heard from the peer to the VM \
         running here",
        Unit::Seconds,
        takeover_duration,
    );
    registry.register_with_unit(
        "disk_read",
        "Bytes the guest read from the disk",
        Unit::Bytes,
        read_bytes,
    );
    registry.register_with_unit(
        "disk_written",
        "Bytes the guest wrote to the disk",
        Unit::Bytes,
        written_bytes,
    );
    registry.register(
        "disk_io_errors",
        "Requests that failed on this host's image",
        io_errors,
    );
    registry.register(
        "disk_rejected_requests",
        "Requests refused as malformed guest input",
        rejected,
    );
    registry.register(
        "disk_in_flight_requests",
        "Mirrored writes waiting for the peer (primary)",
        in_flight,
    );
    registry.register_with_unit(
        "disk_out_of_sync",
        "Bytes of the disk the peer's copy lacks (primary)",
        Unit::Bytes,
        out_of_sync,
    );
    registry.register_with_unit(
        "disk_resync_total",
        "Bytes the current or last resync copies",
        Unit::Bytes,
        resync_total,
    );
    registry.register_with_unit(
        "disk_resync_done",
        "Bytes the current or last resync has copied",
        Unit::Bytes,
        resync_done,
    );
    registry.register(
        "disk_resync_rate_bytes_per_second",
        "The resync's rate",
        resync_rate,
    );
    registry.register_with_unit(
        "disk_mirrored_write_latency",
        "Guest writes mirrored by the primary, from their start to the secondary's \
         acknowledgement",
        Unit::Seconds,
        write_latency,
    );
    registry.register(
        "disk_local_healthy",
        "The primary's own copy serves I/O (0: failed, served from the peer)",
        local_healthy,
    );
    registry.register(
        "nic_via_peer",
        "The NIC's frames go through the peer's uplink (1) or this host's (0)",
        nic_via_peer,
    );
    registry.register(
        "nic_uplink_up",
        "The NIC's uplink on this host is up",
        nic_uplink_up,
    );
    nic_relay.register(&mut registry);
    registry.register(
        "checkpoint_committed_epoch",
        "Level 3: the last checkpoint the secondary committed",
        committed_epoch,
    );
    registry.register(
        "checkpoint_epochs_per_second",
        "Level 3: checkpoints taken per second",
        epochs_rate,
    );
    registry.register_with_unit(
        "checkpoint_pause_p50",
        "Level 3: median pause of the guest per checkpoint",
        Unit::Seconds,
        pause_p50,
    );
    registry.register_with_unit(
        "checkpoint_pause_p99",
        "Level 3: 99th percentile pause of the guest per checkpoint",
        Unit::Seconds,
        pause_p99,
    );
    registry.register(
        "checkpoint_lag_epochs",
        "Level 3: checkpoints sent and not yet committed",
        lag,
    );
    registry.register(
        "checkpoint_replica_restorable",
        "Level 3: this host's replica can be restored (secondary)",
        restorable,
    );
    register_alinks(&mut registry, &status.alinks);
    register_alerts(&mut registry, &status.alerts);
    let mut text = String::new();
    encode(&mut text, &registry)?;
    Ok(text)
}

/// The NIC daemons' frames through the peer host.
#[derive(Default)]
struct NicRelayFamilies {
    to_peer: Family<NicLabels, Counter>,
    from_peer: Family<NicLabels, Counter>,
    to_peer_dropped: Family<NicLabels, Counter>,
    relayed_to_lan: Family<NicLabels, Counter>,
    relayed_to_peer: Family<NicLabels, Counter>,
}

impl NicRelayFamilies {
    fn add(&mut self, labels: &NicLabels, relay: &NicRelay) {
        self.to_peer
            .get_or_create(labels)
            .inc_by(relay.to_peer_frames);
        self.from_peer
            .get_or_create(labels)
            .inc_by(relay.from_peer_frames);
        self.to_peer_dropped
            .get_or_create(labels)
            .inc_by(relay.to_peer_dropped_frames);
        self.relayed_to_lan
            .get_or_create(labels)
            .inc_by(relay.relayed_to_lan_frames);
        self.relayed_to_peer
            .get_or_create(labels)
            .inc_by(relay.relayed_to_peer_frames);
    }

    fn register(self, registry: &mut Registry) {
        for (name, help, family) in [
            (
                "nic_peer_sent_frames",
                "The guest's frames this host's NIC daemon sent to the peer's bridge (its \
                 uplink down)",
                self.to_peer,
            ),
            (
                "nic_peer_received_frames",
                "Frames from the peer's bridge put on the guest's receive queue",
                self.from_peer,
            ),
            (
                "nic_peer_dropped_frames",
                "The guest's frames for the peer dropped (the link's window full or closed)",
                self.to_peer_dropped,
            ),
            (
                "nic_relayed_to_lan_frames",
                "Relaying for the peer's guest: its frames written to this host's LAN",
                self.relayed_to_lan,
            ),
            (
                "nic_relayed_to_peer_frames",
                "Relaying for the peer's guest: frames for it read from this host's LAN",
                self.relayed_to_peer,
            ),
        ] {
            registry.register(name, help, family);
        }
    }
}

/// Histograms whose counts are kept elsewhere (by the disk daemons), one per label set:
/// encoded as they are, since `prometheus-client`'s own histogram only observes. The
/// encoder makes the buckets cumulative.
#[derive(Debug)]
struct CountedHistograms<S> {
    series: Vec<CountedHistogram<S>>,
}

/// One series: its labels, sum (seconds), count, and buckets (upper bound, count).
#[derive(Debug)]
struct CountedHistogram<S> {
    labels: S,
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl<S> Default for CountedHistograms<S> {
    fn default() -> Self {
        CountedHistograms { series: Vec::new() }
    }
}

impl<S> CountedHistograms<S> {
    /// Adds `histogram` under `labels`, unless it is out of shape (then it is left out).
    fn add(&mut self, labels: S, histogram: &disk::LatencyHistogram) {
        if let Some(buckets) = histogram.buckets_seconds() {
            self.series.push(CountedHistogram {
                labels,
                sum: histogram.sum_us as f64 / 1e6,
                count: histogram.count(),
                buckets,
            });
        }
    }
}

impl<S: EncodeLabelSet + std::fmt::Debug> EncodeMetric for CountedHistograms<S> {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for series in &self.series {
            encoder
                .encode_family(&series.labels)?
                .encode_histogram::<NoLabelSet>(series.sum, series.count, &series.buckets, None)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }

    fn is_empty(&self) -> bool {
        self.series.is_empty()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LinkLabels {
    /// 1 or 2: the link's place in `[peer] addresses`.
    link: String,
    /// The peer's ftvmd on it.
    address: String,
}

/// Each A-link: up, round trip, bytes of this host's session to the peer on it.
fn register_alinks(registry: &mut Registry, links: &[ALinkStatus]) {
    let up = Family::<LinkLabels, Gauge>::default();
    let rtt = Family::<LinkLabels, FloatGauge>::default();
    let sent = Family::<LinkLabels, Counter>::default();
    let received = Family::<LinkLabels, Counter>::default();
    for link in links {
        let labels = LinkLabels {
            link: link.link.to_string(),
            address: link.address.clone(),
        };
        up.get_or_create(&labels).set(i64::from(link.up));
        if let Some(rtt_us) = link.rtt_us.filter(|_| link.up) {
            rtt.get_or_create(&labels).set(rtt_us as f64 / 1e6);
        }
        sent.get_or_create(&labels).inc_by(link.bytes_sent);
        received.get_or_create(&labels).inc_by(link.bytes_received);
    }
    registry.register(
        "alink_up",
        "The peer is heard on this A-link (1) or not (0)",
        up,
    );
    registry.register_with_unit(
        "alink_rtt",
        "Round trip to the peer's ftvmd on this A-link (while up)",
        Unit::Seconds,
        rtt,
    );
    registry.register_with_unit(
        "alink_sent",
        "Bytes ftvmd's session to the peer sent on this A-link (the disk daemons' \
         replication is not counted here)",
        Unit::Bytes,
        sent,
    );
    registry.register_with_unit(
        "alink_received",
        "Bytes ftvmd's session to the peer received on this A-link",
        Unit::Bytes,
        received,
    );
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    agent: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentResultLabels {
    agent: String,
    result: String,
}

/// The alert agents' counts (`[[alert]]`).
fn register_alerts(registry: &mut Registry, agents: &[AgentStatus]) {
    let alerts = Family::<AgentResultLabels, Counter>::default();
    let timed_out = Family::<AgentLabels, Counter>::default();
    let dropped = Family::<AgentLabels, Counter>::default();
    let queued = Family::<AgentLabels, Gauge>::default();
    for agent in agents {
        for (result, count) in [("delivered", agent.delivered), ("failed", agent.failed)] {
            alerts
                .get_or_create(&AgentResultLabels {
                    agent: agent.name.clone(),
                    result: result.to_owned(),
                })
                .inc_by(count);
        }
        let labels = AgentLabels {
            agent: agent.name.clone(),
        };
        timed_out.get_or_create(&labels).inc_by(agent.timed_out);
        dropped.get_or_create(&labels).inc_by(agent.dropped);
        queued.get_or_create(&labels).set(saturating(agent.queued));
    }
    registry.register(
        "alerts",
        "Alerts an agent took (result=\"delivered\") or failed after its retry \
         (result=\"failed\")",
        alerts,
    );
    registry.register(
        "alert_runs_timed_out",
        "Runs of an agent killed at its timeout_ms",
        timed_out,
    );
    registry.register(
        "alerts_dropped",
        "Alerts dropped for an agent because its queue was full",
        dropped,
    );
    registry.register("alerts_queued", "Alerts waiting for an agent", queued);
}

fn saturating(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests;
