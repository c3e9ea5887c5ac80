use serde_json::{json, Value};

use super::*;
use crate::{CommandError, Reply};

fn every_command() -> Vec<Command> {
    let mut commands = vec![Command::Status, Command::DirtyPages];
    for generation in [None, Some(0), Some(7), Some(u64::MAX)] {
        commands.push(Command::Order(Order::ContinueDegraded(generation)));
        commands.push(Command::Order(Order::Promote(generation)));
    }
    commands
        .extend([Order::Fence, Order::Demote, Order::Repair, Order::Settle].map(Command::Order));
    commands.push(Command::Order(Order::PromoteAtEpoch {
        generation: 4,
        epoch: 17,
    }));
    for epoch in [0, 9, u64::MAX] {
        commands.extend(
            [
                EpochOrder::On(epoch),
                EpochOrder::End(epoch),
                EpochOrder::Commit(epoch),
                EpochOrder::WaitSealed {
                    epoch,
                    timeout_ms: 250,
                },
            ]
            .map(Command::Epoch),
        );
    }
    commands.push(Command::Epoch(EpochOrder::Off));
    let name = || SnapshotName::new("before-upgrade_2.1").expect("a valid name");
    commands.extend(
        [
            SnapshotOrder::Create(name(), Consistency::Crash),
            SnapshotOrder::Create(name(), Consistency::Application),
            SnapshotOrder::Delete(name()),
            SnapshotOrder::Revert(name()),
            SnapshotOrder::List,
        ]
        .map(Command::Snapshot),
    );
    commands
}

#[test]
fn every_command_round_trips_through_its_line() {
    for command in every_command() {
        let line = command.to_string();
        assert_eq!(line.parse::<Command>(), Ok(command), "{line:?}");
    }
    assert_eq!(
        Command::Order(Order::Promote(Some(5))).to_string(),
        "promote 5"
    );
    assert_eq!(
        Command::Order(Order::ContinueDegraded(None)).to_string(),
        "continue-degraded"
    );
    assert_eq!(
        "  continue-degraded   9 ".parse(),
        Ok(Command::Order(Order::ContinueDegraded(Some(9))))
    );
}

#[test]
fn the_level3_commands_parse_strictly() {
    assert_eq!(
        "wait-sealed 5".parse(),
        Ok(Command::Epoch(EpochOrder::WaitSealed {
            epoch: 5,
            timeout_ms: EpochOrder::DEFAULT_WAIT_MS
        }))
    );
    assert_eq!(
        "promote 3 12".parse(),
        Ok(Command::Order(Order::PromoteAtEpoch {
            generation: 3,
            epoch: 12
        }))
    );
    assert_eq!(Command::Epoch(EpochOrder::On(4)).to_string(), "epoch on 4");
    assert_eq!(Command::Epoch(EpochOrder::Off).to_string(), "epoch off");
    let refused = |line: &str| line.parse::<Command>().expect_err(line);
    for line in ["epoch", "epoch on", "epoch-end", "commit", "wait-sealed"] {
        assert!(
            matches!(refused(line), ParseError::Missing { .. }),
            "{line}"
        );
    }
    for line in [
        "epoch on x",
        "epoch on -1",
        "epoch on +1",
        "epoch-end 0x10",
        "commit 1.5",
        "commit 18446744073709551616",
        "wait-sealed 1 -5",
        "wait-sealed x",
        "promote 1 x",
        "promote 1 +2",
    ] {
        assert!(
            matches!(refused(line), ParseError::NotANumber { .. }),
            "{line}"
        );
    }
    assert!(matches!(
        refused("epoch maybe"),
        ParseError::NotOnOrOff { .. }
    ));
    assert!(matches!(
        refused("wait-sealed 1 600000"),
        ParseError::TimeoutTooLong(600_000)
    ));
}

#[test]
fn a_bad_command_line_is_refused_with_its_reason() {
    let refused = |line: &str| line.parse::<Command>().expect_err(line);
    assert!(matches!(
        refused(""),
        ParseError::Command(CommandError::Empty { .. })
    ));
    assert!(
        matches!(refused("reboot"), ParseError::Command(CommandError::Unknown { word, .. }) if word == "reboot")
    );
    assert_eq!(
        refused("promote x").to_string(),
        "promote: generation \"x\" is not a number"
    );
    assert!(matches!(
        refused("promote -1"),
        ParseError::Command(CommandError::NotANumber { .. })
    ));
    for line in [
        "fence 3",
        "status 1",
        "demote 2",
        "repair 1",
        "settle 1",
        "promote 1 2 3",
        "dirty-pages 1",
        "epoch on 1 2",
        "epoch off 1",
        "epoch-end 1 2",
        "commit 1 2",
        "wait-sealed 1 100 2",
        "continue-degraded 1 2",
    ] {
        assert!(
            matches!(
                refused(line),
                ParseError::Command(CommandError::TooManyArguments { .. })
            ),
            "{line}"
        );
    }
    assert!(refused("bogus")
        .to_string()
        .contains("try: status, promote [GENERATION [EPOCH]]"));
}

fn progress() -> ResyncProgress {
    ResyncProgress {
        bytes_total: 1 << 30,
        bytes_done: 1 << 20,
        bytes_sent: 1 << 19,
        rate_bytes_per_second: 4 << 20,
        eta_seconds: Some(255),
        seconds: 0.25,
    }
}

fn status(replication: Replication) -> Status {
    Status {
        image: "/var/lib/ftvm/vm1.img".into(),
        image_kind: ImageKind::File,
        size_bytes: 1 << 30,
        read_only: false,
        serial: "vm1-disk0".into(),
        queues: 2,
        read_requests: 1,
        write_requests: 2,
        flush_requests: 3,
        discard_requests: 4,
        write_zeroes_requests: 5,
        get_id_requests: 6,
        read_bytes: 7,
        written_bytes: 8,
        rejected_requests: 9,
        io_errors: 10,
        connections: 11,
        connected: true,
        held_kicks: 12,
        replication,
    }
}

fn primary() -> PrimaryStatus {
    PrimaryStatus {
        mode: Mode::Holding,
        disk_state: PrimaryDiskState::Holding,
        local_disk: LocalDisk::Healthy,
        rebuild: ResyncProgress::default(),
        generation: 12,
        peer_reachable: false,
        links: json!({"links": [{"address": "10.77.1.2:7400", "up": false}]}),
        in_flight_requests: 3,
        out_of_sync_bytes: 65536,
        active_extents: 1,
        writes_active: 0,
        resync: progress(),
        peer_disk_failed: Some("EIO on write".into()),
        epochs: PrimaryEpochs {
            enabled: true,
            current_epoch: Some(8),
            sealed_epoch: Some(7),
            off_reason: None,
            last_epoch: Some(8),
        },
        write_latency: LatencyHistogram {
            bounds_us: vec![100, 1000],
            counts: vec![2, 5, 1],
            sum_us: 4321,
        },
    }
}

#[test]
fn a_latency_histogram_is_in_seconds_and_refused_out_of_shape() {
    let histogram = LatencyHistogram {
        bounds_us: vec![100, 1000],
        counts: vec![2, 5, 1],
        sum_us: 4321,
    };
    assert_eq!(
        histogram.buckets_seconds(),
        Some(vec![(0.0001, 2), (0.001, 5), (f64::INFINITY, 1)])
    );
    assert_eq!(histogram.count(), 8);
    let short = LatencyHistogram {
        counts: vec![2, 5],
        ..histogram.clone()
    };
    assert_eq!(short.buckets_seconds(), None);
    let unordered = LatencyHistogram {
        bounds_us: vec![1000, 100],
        ..histogram
    };
    assert_eq!(unordered.buckets_seconds(), None);
}

fn secondary() -> SecondaryStatus {
    SecondaryStatus {
        disk_state: SecondaryDiskState::SyncTarget,
        generation: 11,
        peer_reachable: true,
        links: Value::Null,
        applied_writes: 100,
        applied_bytes: 409600,
        resync_bytes_received: 0,
        refused_requests: 0,
        disk_failed: None,
        disk_failures: 0,
        epochs: SecondaryEpochs {
            enabled: true,
            receiving_epoch: Some(8),
            sealed_epoch: Some(7),
            applied_epoch: None,
            buffered_records: 12,
            buffered_bytes: 49152,
            memory_bytes: 49152,
            journal_used_bytes: 50000,
            journal_size_bytes: 1 << 30,
            journal_full: false,
            journal_full_waits: 0,
        },
    }
}

fn every_status() -> Vec<Status> {
    let mut statuses = vec![status(Replication::Standalone {})];
    for mode in [
        Mode::Connecting,
        Mode::Mirrored,
        Mode::Holding,
        Mode::Degraded,
        Mode::Fenced,
    ] {
        statuses.push(status(Replication::Primary(PrimaryStatus {
            mode,
            ..primary()
        })));
    }
    for (disk_state, local_disk) in [
        (PrimaryDiskState::UpToDate, LocalDisk::Healthy),
        (PrimaryDiskState::SyncSource, LocalDisk::Healthy),
        (PrimaryDiskState::Degraded, LocalDisk::Healthy),
        (PrimaryDiskState::Fenced, LocalDisk::Healthy),
        (PrimaryDiskState::RemoteOnly, LocalDisk::Failed),
        (PrimaryDiskState::Rebuilding, LocalDisk::Rebuilding),
    ] {
        statuses.push(status(Replication::Primary(PrimaryStatus {
            disk_state,
            local_disk,
            peer_disk_failed: None,
            ..primary()
        })));
    }
    for disk_state in [
        SecondaryDiskState::UpToDate,
        SecondaryDiskState::Inconsistent,
        SecondaryDiskState::SyncTarget,
        SecondaryDiskState::Failed,
    ] {
        statuses.push(status(Replication::Secondary(SecondaryStatus {
            disk_state,
            disk_failed: (disk_state == SecondaryDiskState::Failed).then(|| "EIO".into()),
            ..secondary()
        })));
    }
    statuses
}

#[test]
fn every_status_round_trips_through_its_line() {
    for status in every_status() {
        let line = Reply::Answer(status.clone()).to_line().expect("line");
        assert!(!line.contains('\n'));
        assert_eq!(
            Reply::<Status>::from_line(&line).expect("parse"),
            Reply::Answer(status)
        );
    }
    let done = Done {
        ok: true,
        result: "degraded".into(),
    };
    let line = Reply::Answer(done.clone()).to_line().expect("line");
    assert_eq!(line, r#"{"ok":true,"result":"degraded"}"#);
    assert_eq!(Reply::from_line(&line).expect("parse"), Reply::Answer(done));
    let refused = Reply::<Done>::Refused("fenced".into());
    let line = refused.to_line().expect("line");
    assert_eq!(line, r#"{"error":"fenced"}"#);
    assert_eq!(
        Reply::<Status>::from_line(&line).expect("parse"),
        Reply::Refused("fenced".into())
    );
}

/// The shape `ftvm status --json`, the end-to-end tests and operators read.
#[test]
fn the_status_keeps_its_json_shape() {
    let value = serde_json::to_value(status(Replication::Primary(primary()))).expect("json");
    assert_eq!(value["write_requests"], 2, "counters at the top level");
    assert_eq!(value["image_kind"], "file");
    let replication = &value["replication"];
    assert_eq!(replication["role"], "primary");
    assert_eq!(replication["mode"], "Holding");
    assert_eq!(replication["disk_state"], "Holding");
    assert_eq!(replication["local_disk"], "Healthy");
    assert_eq!(replication["generation"], 12);
    assert_eq!(replication["resync"]["eta_seconds"], 255);
    let value = serde_json::to_value(status(Replication::Standalone {})).expect("json");
    assert_eq!(value["replication"], json!({"role": "standalone"}));
    let value = serde_json::to_value(status(Replication::Secondary(secondary()))).expect("json");
    assert_eq!(value["replication"]["role"], "secondary");
    assert_eq!(value["replication"]["disk_state"], "SyncTarget");
    assert_eq!(value["replication"]["disk_failed"], Value::Null);
}

/// Applies `change` to the JSON of a primary's status and parses the result.
fn parse_changed(change: impl FnOnce(&mut Value)) -> Result<Reply<Status>, crate::ReplyError> {
    let mut value = serde_json::to_value(status(Replication::Primary(primary()))).expect("json");
    change(&mut value);
    Reply::<Status>::from_line(&value.to_string())
}

fn remove(value: &mut Value, path: &[&str]) {
    let (last, parents) = path.split_last().expect("path");
    let mut object = value;
    for key in parents {
        object = &mut object[*key];
    }
    object
        .as_object_mut()
        .expect("object")
        .remove(*last)
        .expect(last);
}

#[test]
fn a_status_with_a_missing_field_is_refused() {
    for path in [
        &["replication", "generation"][..],
        &["replication", "role"],
        &["replication", "mode"],
        &["replication", "links"],
        &["replication", "peer_disk_failed"],
        &["replication", "resync", "eta_seconds"],
        &["replication", "rebuild"],
        &["replication", "epochs"],
        &["replication", "epochs", "sealed_epoch"],
        &["replication", "epochs", "off_reason"],
        &["replication"],
        &["write_requests"],
        &["connected"],
    ] {
        let error = parse_changed(|value| remove(value, path)).expect_err(&path.join("."));
        assert!(
            error.to_string().contains("missing field"),
            "{path:?}: {error}"
        );
    }
}

#[test]
fn a_status_with_an_unknown_field_is_refused() {
    for (path, field) in [
        (&[][..], "data_generation"),
        (&["replication"][..], "data_generation"),
        (&["replication", "resync"], "bytes_left"),
    ] {
        let error = parse_changed(|value| {
            let mut object = value;
            for key in path {
                object = &mut object[*key];
            }
            object[field] = json!(3);
        })
        .expect_err(field);
        assert!(error.to_string().contains("unknown field"), "{error}");
    }
    // A renamed field is both: the old name missing, the new one unknown.
    let renamed = parse_changed(|value| {
        remove(value, &["replication", "generation"]);
        value["replication"]["generation_granted"] = json!(12);
    });
    assert!(renamed.is_err());
    let mut standalone = serde_json::to_value(status(Replication::Standalone {})).expect("json");
    standalone["replication"]["generation"] = json!(3);
    assert!(Reply::<Status>::from_line(&standalone.to_string()).is_err());
}

#[test]
fn a_status_with_a_wrong_type_or_word_is_refused() {
    for (path, wrong) in [
        (&["replication", "generation"][..], json!("12")),
        (&["replication", "generation"], json!(-1)),
        (&["replication", "generation"], Value::Null),
        (&["replication", "mode"], json!("Sleeping")),
        (&["replication", "disk_state"], json!("SyncTarget")),
        (&["replication", "role"], json!("witness")),
        (&["replication", "peer_reachable"], json!(1)),
        (&["connected"], json!("yes")),
        (&["image_kind"], json!("File")),
    ] {
        let result = parse_changed(|value| {
            let (last, parents) = path.split_last().expect("path");
            let mut object = value;
            for key in parents {
                object = &mut object[*key];
            }
            object[*last] = wrong.clone();
        });
        assert!(result.is_err(), "{path:?} = {wrong}: {result:?}");
    }
    assert!(Reply::<Status>::from_line("not json").is_err());
    assert!(Reply::<Status>::from_line("").is_err());
    // A refusal is only `{"error": …}`: anything more is not one.
    assert!(Reply::<Done>::from_line(r#"{"error":"x","ok":true}"#).is_err());
}

fn dirty_pages() -> DirtyPages {
    DirtyPages {
        page_size: 4096,
        files: vec![DirtyFile {
            dev: 24,
            ino: 1234,
            ranges: vec![[0, 8192], [1 << 20, 4096]],
        }],
    }
}

#[test]
fn dirty_pages_has_the_documented_shape_and_round_trips() {
    assert_eq!("dirty-pages".parse(), Ok(Command::DirtyPages));
    assert_eq!(Command::DirtyPages.to_string(), "dirty-pages");
    let line = Reply::Answer(dirty_pages()).to_line().expect("line");
    assert_eq!(
        line,
        r#"{"page_size":4096,"files":[{"dev":24,"ino":1234,"ranges":[[0,8192],[1048576,4096]]}]}"#
    );
    assert_eq!(
        Reply::from_line(&line).expect("parse"),
        Reply::Answer(dirty_pages())
    );
    let empty = r#"{"page_size":4096,"files":[]}"#;
    assert!(matches!(
        Reply::<DirtyPages>::from_line(empty),
        Ok(Reply::Answer(DirtyPages { files, .. })) if files.is_empty()
    ));
}

#[test]
fn a_dirty_pages_reply_out_of_shape_is_refused() {
    for line in [
        r#"{"files":[]}"#,
        r#"{"page_size":4096}"#,
        r#"{"page_size":4096,"files":[],"epoch":3}"#,
        r#"{"page_size":4096,"files":[{"dev":1,"ranges":[]}]}"#,
        r#"{"page_size":4096,"files":[{"dev":1,"ino":2,"ranges":[],"path":"/x"}]}"#,
        r#"{"page_size":4096,"files":[{"dev":1,"ino":2,"ranges":[[0]]}]}"#,
        r#"{"page_size":4096,"files":[{"dev":1,"ino":2,"ranges":[[0,4096,1]]}]}"#,
        r#"{"page_size":4096,"files":[{"dev":1,"ino":2,"ranges":[[-1,4096]]}]}"#,
        r#"{"page_size":"4096","files":[]}"#,
    ] {
        assert!(Reply::<DirtyPages>::from_line(line).is_err(), "{line}");
    }
}

#[test]
fn snapshot_names_with_path_characters_are_refused_with_the_reason() {
    for (line, why) in [
        ("snapshot create ../etc", "starts with a dot"),
        ("snapshot create x/../etc", "only letters"),
        ("snapshot create a/b", "only letters"),
        ("snapshot create .hidden", "starts with a dot"),
        ("snapshot revert", "missing the snapshot's name"),
        ("snapshot take s1", "none of create"),
        ("snapshot list s1", "too many arguments"),
        (
            "snapshot create s1 frozen",
            "neither \"crash\" nor \"application\"",
        ),
        ("snapshot create s1 crash more", "too many arguments"),
    ] {
        let error = line.parse::<Command>().expect_err(line).to_string();
        assert!(error.contains(why), "{line}: {error}");
    }
    let long = format!(
        "snapshot create {}",
        "a".repeat(MAX_SNAPSHOT_NAME_BYTES + 1)
    );
    let error = long.parse::<Command>().expect_err("too long").to_string();
    assert!(error.contains("longer than 64"), "{error}");
    // A name read from JSON is checked the same way.
    assert!(serde_json::from_str::<SnapshotName>("\"../x\"").is_err());
    assert_eq!(
        serde_json::from_str::<SnapshotName>("\"s1\"").expect("valid"),
        SnapshotName::new("s1").expect("valid")
    );
}
