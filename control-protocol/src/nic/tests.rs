use serde_json::{json, Value};

use super::*;
use crate::{CommandError, Reply};

#[test]
fn every_command_round_trips_through_its_line() {
    for command in [
        Command::Status,
        Command::Announce,
        Command::DirtyPages,
        Command::OutputCommitOn(0),
        Command::OutputCommitOn(u64::MAX),
        Command::OutputCommitOff,
        Command::EpochEnd(7),
        Command::Commit(18_446_744_073_709_551_615),
        Command::Handover(true),
        Command::Handover(false),
    ] {
        assert_eq!(command.to_string().parse::<Command>(), Ok(command));
    }
    assert_eq!(" announce ".parse(), Ok(Command::Announce));
    assert_eq!(
        "output-commit on 12".parse(),
        Ok(Command::OutputCommitOn(12))
    );
    assert_eq!(Command::EpochEnd(3).to_string(), "epoch-end 3");
    assert_eq!(Command::OutputCommitOff.to_string(), "output-commit off");
    assert!(matches!(
        "".parse::<Command>(),
        Err(ParseError::Command(CommandError::Empty { .. }))
    ));
    assert!(matches!(
        "fence".parse::<Command>(),
        Err(ParseError::Command(CommandError::Unknown { .. }))
    ));
    assert!(matches!(
        "announce now".parse::<Command>(),
        Err(ParseError::Command(CommandError::TooManyArguments { .. }))
    ));
}

#[test]
fn a_malformed_epoch_command_is_refused() {
    for line in ["commit", "epoch-end", "output-commit", "output-commit on"] {
        assert!(
            matches!(line.parse::<Command>(), Err(ParseError::Missing { .. })),
            "{line}"
        );
    }
    for line in [
        "commit -1",
        "commit +1",
        "commit 0x10",
        "commit 18446744073709551616",
        "epoch-end 1.5",
        "output-commit on ten",
    ] {
        assert!(
            matches!(
                line.parse::<Command>(),
                Err(ParseError::EpochNotANumber { .. })
            ),
            "{line}"
        );
    }
    assert!(matches!(
        "output-commit maybe".parse::<Command>(),
        Err(ParseError::NotOnOrOff { .. })
    ));
    assert_eq!(Command::Handover(true).to_string(), "handover on");
    assert!(matches!(
        "handover".parse::<Command>(),
        Err(ParseError::Missing { .. })
    ));
    assert_eq!(
        "handover yes"
            .parse::<Command>()
            .map_err(|error| error.to_string()),
        Err("handover: \"yes\" is neither \"on\" nor \"off\"".to_owned())
    );
    assert!(matches!(
        "handover on now".parse::<Command>(),
        Err(ParseError::Command(CommandError::TooManyArguments { .. }))
    ));
    assert!(matches!(
        "commit 1 2".parse::<Command>(),
        Err(ParseError::Command(CommandError::TooManyArguments { .. }))
    ));
    assert!(matches!(
        "output-commit off now".parse::<Command>(),
        Err(ParseError::Command(CommandError::TooManyArguments { .. }))
    ));
    assert!(matches!(
        "dirty-pages all".parse::<Command>(),
        Err(ParseError::Command(CommandError::TooManyArguments { .. }))
    ));
}

pub(crate) fn output_commit() -> OutputCommit {
    OutputCommit {
        enabled: true,
        current_epoch: Some(5),
        committed_epoch: None,
        held_frames: 2,
        held_bytes: 140,
        buffer_limit_bytes: 1 << 20,
        buffer_full_waits: 1,
        released_frames: 9,
    }
}

#[test]
fn dirty_pages_and_output_commit_answers_round_trip_strictly() {
    let dirty = DirtyPages {
        page_size: 4096,
        files: vec![DirtyFile {
            dev: 1,
            ino: 2,
            ranges: vec![[0, 4096], [16384, 8192]],
        }],
    };
    let line = Reply::Answer(dirty.clone()).to_line().expect("line");
    assert_eq!(
        line,
        r#"{"page_size":4096,"files":[{"dev":1,"ino":2,"ranges":[[0,4096],[16384,8192]]}]}"#
    );
    assert_eq!(
        Reply::from_line(&line).expect("parse"),
        Reply::Answer(dirty)
    );
    assert!(Reply::<DirtyPages>::from_line(r#"{"page_size":4096}"#).is_err());
    assert!(Reply::<DirtyPages>::from_line(
        r#"{"page_size":4096,"files":[{"dev":1,"ino":2,"ranges":[[0]]}]}"#
    )
    .is_err());
    let committed = OutputCommitted {
        ok: true,
        released_frames: 3,
        output_commit: output_commit(),
    };
    let line = Reply::Answer(committed.clone()).to_line().expect("line");
    assert_eq!(
        Reply::from_line(&line).expect("parse"),
        Reply::Answer(committed.clone())
    );
    let mut value = serde_json::to_value(&committed).expect("json");
    value["output_commit"]
        .as_object_mut()
        .expect("object")
        .remove("committed_epoch");
    assert!(Reply::<OutputCommitted>::from_line(&value.to_string()).is_err());
    let mut value = serde_json::to_value(&committed).expect("json");
    value["output_commit"]["dropped_frames"] = json!(0);
    assert!(Reply::<OutputCommitted>::from_line(&value.to_string()).is_err());
}

pub(crate) fn status(redundancy: Redundancy) -> Status {
    Status {
        mac: "52:54:00:12:34:56".into(),
        tap: "ftvm-tap0".into(),
        bridge: Some("vmbr0".into()),
        queues: 1,
        link: Link {
            frontend_connected: true,
            guest_link_up: true,
            announce_pending: false,
            tap_up: true,
            tap_carrier: true,
            tap_master: None,
        },
        features: Features {
            offered: "0x1".into(),
            acked: "0x0".into(),
            acked_names: vec!["MAC".into()],
            tap_offloads: "0x0".into(),
            header_len_bytes: 12,
        },
        redundancy,
        output_commit: output_commit(),
        rx_packets: 1,
        rx_bytes: 2,
        rx_dropped_no_buffers: 3,
        rx_waits_for_buffers: 4,
        interrupts_deferred: 25,
        rx_bad_buffers: 5,
        tap_read_errors: 6,
        tx_packets: 7,
        tx_bytes: 8,
        tx_dropped_malformed: 9,
        tap_write_errors: 10,
        ctrl_commands: 11,
        announcements: 12,
        connections: 13,
        connected: true,
        peer_tx_packets: 14,
        peer_tx_messages: 20,
        peer_tx_dropped: 15,
        peer_rx_packets: 16,
        peer_rx_dropped: 17,
        relay_to_lan_packets: 18,
        relay_to_peer_packets: 19,
        handover_relayed_packets: 21,
        handover_relay_dropped: 22,
        handover_rx_packets: 23,
        handover_rx_dropped: 24,
    }
}

fn redundant() -> Redundancy {
    Redundancy {
        path: Path::Peer,
        uplink: Some("uplink".into()),
        uplink_up: Some(false),
        peer_configured: true,
        peer_reachable: true,
        peer_uplink_up: Some(true),
        peer_guest_attached: false,
        relaying_for_peer: false,
        path_switches: 1,
        frames_queued_for_guest: 0,
        handover_relaying: false,
        handover_frames_queued: 0,
        peer_session: Some(json!({"links": []})),
    }
}

fn alone() -> Redundancy {
    Redundancy {
        path: Path::Local,
        uplink: None,
        uplink_up: None,
        peer_configured: false,
        peer_reachable: false,
        peer_uplink_up: None,
        peer_guest_attached: false,
        relaying_for_peer: false,
        path_switches: 0,
        frames_queued_for_guest: 0,
        handover_relaying: false,
        handover_frames_queued: 0,
        peer_session: None,
    }
}

#[test]
fn every_status_and_answer_round_trips_through_its_line() {
    for status in [status(redundant()), status(alone())] {
        let line = Reply::Answer(status.clone()).to_line().expect("line");
        assert_eq!(
            Reply::<Status>::from_line(&line).expect("parse"),
            Reply::Answer(status)
        );
    }
    let announced = Announced {
        ok: true,
        rarp_sent: true,
        guest_asked: false,
    };
    let line = Reply::Answer(announced).to_line().expect("line");
    assert_eq!(line, r#"{"ok":true,"rarp_sent":true,"guest_asked":false}"#);
    assert_eq!(
        Reply::from_line(&line).expect("parse"),
        Reply::Answer(announced)
    );
    let value = serde_json::to_value(status(redundant())).expect("json");
    assert_eq!(value["redundancy"]["path"], "peer");
    assert_eq!(value["link"]["frontend_connected"], true);
    assert_eq!(value["rx_packets"], 1, "counters at the top level");
}

#[test]
fn a_status_with_a_missing_unknown_or_mistyped_field_is_refused() {
    let parse = |change: &dyn Fn(&mut Value)| {
        let mut value = serde_json::to_value(status(redundant())).expect("json");
        change(&mut value);
        Reply::<Status>::from_line(&value.to_string())
    };
    let remove = |object: &str, field: &'static str| {
        let object = object.to_owned();
        move |value: &mut Value| {
            let target = if object.is_empty() {
                value
            } else {
                &mut value[object.as_str()]
            };
            target.as_object_mut().expect("object").remove(field);
        }
    };
    for (object, field) in [
        ("redundancy", "path"),
        ("redundancy", "uplink_up"),
        ("redundancy", "peer_session"),
        ("link", "frontend_connected"),
        ("link", "tap_master"),
        ("", "bridge"),
        ("", "relay_to_peer_packets"),
        ("", "output_commit"),
        ("output_commit", "held_bytes"),
        ("output_commit", "current_epoch"),
    ] {
        let error = parse(&remove(object, field)).expect_err(field);
        assert!(error.to_string().contains("missing field"), "{error}");
    }
    assert!(parse(&|value| value["redundancy"]["route"] = json!("peer")).is_err());
    assert!(parse(&|value| value["link"]["speed"] = json!(1000)).is_err());
    assert!(parse(&|value| value["redundancy"]["path"] = json!("both")).is_err());
    assert!(parse(&|value| value["redundancy"]["uplink_up"] = json!("up")).is_err());
    assert!(parse(&|value| value["queues"] = json!(-1)).is_err());
}
