use super::*;

use crate::daemon::alerts::AgentStatus;
use crate::daemon::control::KeyStatus;
use crate::daemon::links::ALinkStatus;
use crate::daemon::nics::{NicRelay, NicStatus};
use crate::daemon::vm::VmStatus;

fn vm(name: &str, role: Role, state: &str) -> VmStatus {
    VmStatus {
        stopped_by_operator: false,
        domain: false,
        name: name.into(),
        level: 3,
        role,
        state: state.into(),
        primary: Some("hostA".into()),
        secondary: Some("hostB".into()),
        generation: 7,
        sync_percent: Some(42.5),
        vm_pid: Some(1234),
        vm_prestarted: false,
        vm_paused: false,
        disk_pids: Vec::new(),
        disks: Vec::new(),
        nics: vec![NicStatus {
            mac: "52:54:00:12:34:56".into(),
            uplink: Some("uplink".into()),
            pid: Some(43),
            answering: true,
            path: Some(control_protocol::nic::Path::Peer),
            uplink_up: Some(false),
            peer_reachable: Some(true),
            relaying_for_peer: Some(false),
            guest_attached: Some(true),
            relay: Some(NicRelay {
                to_peer_frames: 120,
                from_peer_frames: 80,
                to_peer_dropped_frames: 1,
                relayed_to_lan_frames: 0,
                relayed_to_peer_frames: 0,
            }),
        }],
        checkpoint: Some(serde_json::json!({
            "role": "primary",
            "state": "protected",
            "stats": {
                "committed_epoch": 812,
                "epochs_per_second": 19.5,
                "pause_p50_ms": 7.5,
                "pause_p99_ms": 20.0,
                "lag_epochs": 1,
            },
        })),
        migration: None,
        takeovers: 2,
        last_takeover_ms: Some(2500),
    }
}

fn host(vms: Vec<VmStatus>) -> HostStatus {
    let key = |file: &str| KeyStatus {
        file: file.into(),
        held: vec!["0123456789abcdef".into(), "fedcba9876543210".into()],
        in_use: vec!["0123456789abcdef".into()],
        peer_holds: None,
    };
    HostStatus {
        libvirt_uri: None,
        host: "hostA".into(),
        pair_key: key("/etc/ftvm/pair.psk"),
        witness_key: key("/etc/ftvm/witness.psk"),
        peer: "hostB".into(),
        peer_reachable: true,
        links_up: 1,
        links: 2,
        alinks: vec![
            ALinkStatus {
                link: 1,
                address: "10.77.1.2:7500".into(),
                up: true,
                rtt_us: Some(250),
                bytes_sent: 1000,
                bytes_received: 900,
            },
            ALinkStatus {
                link: 2,
                address: "10.77.2.2:7500".into(),
                up: false,
                rtt_us: None,
                bytes_sent: 10,
                bytes_received: 0,
            },
        ],
        witness_reachable: false,
        disabled: false,
        vms,
        alerts: vec![AgentStatus {
            name: "webhook".into(),
            delivered: 3,
            failed: 1,
            timed_out: 2,
            dropped: 0,
            queued: 1,
        }],
    }
}

/// The value of the sample `name` whose labels include `labels`.
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = scrape
        .samples
        .iter()
        .find(|sample| {
            sample.metric == name
                && labels
                    .iter()
                    .all(|(key, value)| sample.labels.get(key) == Some(*value))
        })
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"));
    match sample.value {
        prometheus_parse::Value::Gauge(value)
        | prometheus_parse::Value::Counter(value)
        | prometheus_parse::Value::Untyped(value) => value,
        ref other => panic!("{name}: unexpected value {other:?}"),
    }
}

fn parse(text: &str) -> prometheus_parse::Scrape {
    let lines = text.lines().map(|line| Ok(line.to_owned()));
    prometheus_parse::Scrape::parse(lines).expect("a valid text format")
}

#[test]
fn a_snapshot_renders_as_parsable_metrics_with_the_states_values() {
    let text = render(&host(vec![
        vm("web", Role::Primary, "Protected"),
        vm("db", Role::Secondary, "Syncing"),
    ]))
    .expect("render");
    let scrape = parse(&text);
    assert_eq!(value(&scrape, "ftvm_alinks_up", &[("host", "hostA")]), 1.0);
    assert_eq!(value(&scrape, "ftvm_alinks", &[("host", "hostA")]), 2.0);
    assert_eq!(value(&scrape, "ftvm_witness_reachable", &[]), 0.0);
    // Two pair keys held: a rotation is under way (`ftvm key retire` ends it).
    assert_eq!(value(&scrape, "ftvm_pair_keys_held", &[]), 2.0);
    assert_eq!(value(&scrape, "ftvm_vm_level", &[("vm", "web")]), 3.0);
    assert_eq!(value(&scrape, "ftvm_vm_primary", &[("vm", "web")]), 1.0);
    assert_eq!(value(&scrape, "ftvm_vm_primary", &[("vm", "db")]), 0.0);
    assert_eq!(
        value(
            &scrape,
            "ftvm_vm_state",
            &[("vm", "web"), ("state", "Protected")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &scrape,
            "ftvm_vm_state",
            &[("vm", "web"), ("state", "Syncing")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &scrape,
            "ftvm_vm_state",
            &[("vm", "db"), ("state", "Syncing")]
        ),
        1.0
    );
    assert_eq!(value(&scrape, "ftvm_vm_sync_ratio", &[("vm", "db")]), 0.425);
    assert_eq!(value(&scrape, "ftvm_vm_generation", &[("vm", "db")]), 7.0);
    assert_eq!(
        value(&scrape, "ftvm_checkpoint_committed_epoch", &[("vm", "web")]),
        812.0
    );
    assert_eq!(
        value(
            &scrape,
            "ftvm_checkpoint_pause_p99_seconds",
            &[("vm", "web")]
        ),
        0.02
    );
    // Exactly one state is 1 per VM.
    let current: Vec<_> = scrape
        .samples
        .iter()
        .filter(|sample| {
            sample.metric == "ftvm_vm_state"
                && matches!(sample.value, prometheus_parse::Value::Gauge(v) if v == 1.0)
        })
        .map(|sample| sample.labels.get("vm").unwrap_or_default().to_owned())
        .collect();
    assert_eq!(current.len(), 2, "{text}");
    // Every family has its HELP and TYPE.
    for name in [
        "ftvm_vm_state",
        "ftvm_checkpoint_pause_p50_seconds",
        "ftvm_alinks_up",
    ] {
        assert!(text.contains(&format!("# HELP {name}")), "{name}: {text}");
        assert!(text.contains(&format!("# TYPE {name}")), "{name}: {text}");
    }
}

/// A state word the table does not know (a newer daemon's) still shows, as 1.
#[test]
fn an_unknown_state_word_is_shown_too() {
    let text = render(&host(vec![vm("web", Role::Primary, "Promoting")])).expect("render");
    let scrape = parse(&text);
    assert_eq!(
        value(
            &scrape,
            "ftvm_vm_state",
            &[("vm", "web"), ("state", "Promoting")]
        ),
        1.0
    );
}

#[test]
fn a_links_alert_agents_takeovers_and_nic_relays_have_their_series() {
    let text = render(&host(Vec::new())).expect("render");
    let scrape = parse(&text);
    let link1 = [("link", "1"), ("address", "10.77.1.2:7500")];
    let link2 = [("link", "2"), ("address", "10.77.2.2:7500")];
    assert_eq!(value(&scrape, "ftvm_alink_up", &link1), 1.0);
    assert_eq!(value(&scrape, "ftvm_alink_up", &link2), 0.0);
    assert_eq!(value(&scrape, "ftvm_alink_rtt_seconds", &link1), 0.00025);
    assert_eq!(
        value(&scrape, "ftvm_alink_sent_bytes_total", &link1),
        1000.0
    );
    assert_eq!(
        value(&scrape, "ftvm_alink_received_bytes_total", &link1),
        900.0
    );
    // A down link has no round trip.
    assert!(
        !text.contains("ftvm_alink_rtt_seconds{link=\"2\""),
        "{text}"
    );
    let webhook = [("agent", "webhook")];
    let nic = [("vm", "web"), ("mac", "52:54:00:12:34:56")];
    let one_vm =
        parse(&render(&host(vec![vm("web", Role::Primary, "Protected")])).expect("render"));
    assert_eq!(value(&one_vm, "ftvm_nic_via_peer", &nic), 1.0);
    assert_eq!(
        value(&one_vm, "ftvm_nic_peer_sent_frames_total", &nic),
        120.0
    );
    assert_eq!(
        value(&one_vm, "ftvm_nic_peer_received_frames_total", &nic),
        80.0
    );
    assert_eq!(
        value(&one_vm, "ftvm_nic_peer_dropped_frames_total", &nic),
        1.0
    );
    assert_eq!(
        value(&one_vm, "ftvm_nic_relayed_to_lan_frames_total", &nic),
        0.0
    );
    let text = render(&host(vec![vm("web", Role::Primary, "Degraded")])).expect("render");
    let scrape = parse(&text);
    assert_eq!(
        value(&scrape, "ftvm_vm_takeovers_total", &[("vm", "web")]),
        2.0
    );
    assert_eq!(
        value(
            &scrape,
            "ftvm_vm_last_takeover_duration_seconds",
            &[("vm", "web")]
        ),
        2.5
    );
    assert_eq!(
        value(
            &scrape,
            "ftvm_alerts_total",
            &[("agent", "webhook"), ("result", "delivered")]
        ),
        3.0
    );
    assert_eq!(
        value(
            &scrape,
            "ftvm_alerts_total",
            &[("agent", "webhook"), ("result", "failed")]
        ),
        1.0
    );
    assert_eq!(
        value(&scrape, "ftvm_alert_runs_timed_out_total", &webhook),
        2.0
    );
    assert_eq!(value(&scrape, "ftvm_alerts_dropped_total", &webhook), 0.0);
    assert_eq!(value(&scrape, "ftvm_alerts_queued", &webhook), 1.0);
}

/// The `ftvm_…` names in `text`.
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("ftvm_") {
        let name: String = rest[start..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[start + name.len()..];
        names.push(name);
    }
    names
}

fn read_repo_file(path: &str) -> String {
    let full = format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&full).unwrap_or_else(|error| panic!("{full}: {error}"))
}

/// Every metric served is in docs/METRICS.md, and the Grafana dashboard queries only
/// metrics documented there (a renamed metric would leave a panel empty without a word).
#[test]
fn served_metrics_are_documented_and_the_dashboard_queries_only_those() {
    let documented = metric_names(&read_repo_file("docs/METRICS.md"));
    let text = render(&host(vec![vm("web", Role::Primary, "Protected")])).expect("render");
    for line in text.lines() {
        let Some(declaration) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut words = declaration.split_whitespace();
        let (family, kind) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let name = if kind == "counter" {
            format!("{family}_total")
        } else {
            family.to_owned()
        };
        assert!(
            documented.contains(&name),
            "{name} is served but not in docs/METRICS.md"
        );
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&read_repo_file("contrib/grafana/ftvm.json")).expect("JSON");
    let mut queried = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            queried.extend(metric_names(target["expr"].as_str().expect("expr")));
        }
    }
    assert!(queried.len() > 20, "{queried:?}");
    for name in queried {
        let name = name.strip_suffix("_bucket").unwrap_or(&name).to_owned();
        assert!(
            documented.contains(&name),
            "the dashboard queries {name}, which docs/METRICS.md does not name"
        );
    }
}

/// The disk daemons' latency counts become a Prometheus histogram (cumulative buckets,
/// sum and count in seconds) that a parser reads; a histogram out of shape is left out.
#[test]
fn counted_histograms_encode_as_histograms() {
    let mut histograms = CountedHistograms::<DiskLabels>::default();
    let labels = DiskLabels {
        vm: "web".into(),
        disk: "web-disk0".into(),
    };
    histograms.add(
        labels.clone(),
        &disk::LatencyHistogram {
            bounds_us: vec![100, 1000],
            counts: vec![2, 5, 1],
            sum_us: 4_321,
        },
    );
    histograms.add(
        labels,
        &disk::LatencyHistogram {
            bounds_us: vec![100],
            counts: vec![2, 5, 1],
            sum_us: 1,
        },
    );
    let mut registry = Registry::with_prefix("ftvm");
    registry.register_with_unit("latency", "test", Unit::Seconds, histograms);
    let mut text = String::new();
    encode(&mut text, &registry).expect("encode");
    assert!(
        text.contains("# TYPE ftvm_latency_seconds histogram"),
        "{text}"
    );
    let scrape = parse(&text);
    let sample = scrape
        .samples
        .iter()
        .find(|sample| sample.metric == "ftvm_latency_seconds")
        .expect("the histogram");
    let prometheus_parse::Value::Histogram(buckets) = &sample.value else {
        panic!("{:?}", sample.value)
    };
    let counts: Vec<(f64, f64)> = buckets
        .iter()
        .map(|bucket| (bucket.less_than, bucket.count))
        .collect();
    assert_eq!(counts, [(0.0001, 2.0), (0.001, 7.0), (f64::INFINITY, 8.0)]);
    assert_eq!(value(&scrape, "ftvm_latency_seconds_count", &[]), 8.0);
    assert_eq!(value(&scrape, "ftvm_latency_seconds_sum", &[]), 0.004321);
    assert_eq!(
        text.matches("ftvm_latency_seconds_count").count(),
        1,
        "{text}"
    );
}
