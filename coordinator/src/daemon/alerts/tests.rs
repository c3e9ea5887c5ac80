//! The alert queues with real agent scripts (no daemon).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::*;
use crate::daemon::events::{Condition, Events};

/// An agent script in `dir` that appends a line of its alert to `dir/NAME.log`, then runs
/// `then` (like `exit 1`).
fn agent(dir: &Path, name: &str, then: &str) -> AlertSection {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\necho \"$FTVM_ALERT_KIND $FTVM_ALERT_SEVERITY $FTVM_ALERT_ATTEMPT \
             $FTVM_ALERT_HOST $FTVM_ALERT_RECIPIENT $FTVM_ALERT_SEQUENCE\" >> {}/{name}.log\n{then}\n",
            dir.display()
        ),
    )
    .expect("write agent");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    AlertSection {
        name: None,
        path,
        recipient: format!("to-{name}"),
        timeout_ms: 2000,
        severity: "warning".into(),
        environment: BTreeMap::new(),
    }
}

fn lines(dir: &Path, name: &str, count: usize) -> Vec<String> {
    let path: PathBuf = dir.join(format!("{name}.log"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        if lines.len() >= count || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn warnings_and_clearings_reach_the_agents_and_a_failure_is_retried_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let good = agent(dir.path(), "good", "exit 0");
    let bad = agent(dir.path(), "bad", "echo refused; exit 1");
    let mut errors_only = agent(dir.path(), "errors", "exit 0");
    errors_only.severity = "error".into();
    validate(&[good.clone(), bad.clone(), errors_only.clone()]).expect("valid");
    let alerts = Alerts::start(&[good, bad, errors_only], "hostA").expect("start");
    let mut events = Events::with_alerts(alerts);
    events.info("", "nothing to alert".into());
    events.raise(
        Condition::ALinkDown,
        Severity::Warning,
        "",
        "1 of 2 A-links up".into(),
        "repair it",
    );
    events.clear(Condition::ALinkDown, "", "all 2 A-links up".into());
    events.error("vm1", "fenced".into(), "");
    assert_eq!(
        lines(dir.path(), "good", 3),
        [
            "a-link-down warning 1 hostA to-good 2",
            "a-link-down cleared 1 hostA to-good 3",
            "event error 1 hostA to-good 4",
        ]
    );
    assert_eq!(
        lines(dir.path(), "bad", 6),
        [
            "a-link-down warning 1 hostA to-bad 2",
            "a-link-down warning 2 hostA to-bad 2",
            "a-link-down cleared 1 hostA to-bad 3",
            "a-link-down cleared 2 hostA to-bad 3",
            "event error 1 hostA to-bad 4",
            "event error 2 hostA to-bad 4",
        ]
    );
    assert_eq!(
        lines(dir.path(), "errors", 1),
        ["event error 1 hostA to-errors 4"]
    );
    let status = events.alerts().expect("alerts").status();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut status = status;
    while status[1].failed < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        status = events.alerts().expect("alerts").status();
    }
    assert_eq!((status[0].delivered, status[0].failed), (3, 0));
    assert_eq!((status[1].delivered, status[1].failed), (0, 3));
}

#[test]
fn a_full_queue_drops_and_counts_instead_of_waiting() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut slow = agent(dir.path(), "slow", "sleep 10");
    slow.timeout_ms = 200;
    let alerts = Alerts::start(&[slow], "hostA").expect("start");
    let mut events = Events::with_alerts(alerts);
    let started = Instant::now();
    for number in 0..QUEUE_LENGTH + 10 {
        events.warn("", format!("warning {number}"), "");
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let status = &events.alerts().expect("alerts").status()[0];
    // The first is taken by the thread at once (or not yet): 9 or 10 dropped.
    assert!((9..=10).contains(&status.dropped), "{status:?}");
}

#[test]
fn the_alert_test_reports_each_agent() {
    let dir = tempfile::tempdir().expect("temp dir");
    let good = agent(dir.path(), "good", "echo accepted");
    let bad = agent(dir.path(), "bad", "echo 'no route to host' >&2; exit 2");
    let alerts = Alerts::start(&[good, bad], "hostA").expect("start");
    let (answer, answered) = mpsc::channel();
    alerts.test(answer);
    let reply = answered
        .recv_timeout(Duration::from_secs(20))
        .expect("an answer");
    let Reply::Error(text) = reply else {
        panic!("{reply:?}")
    };
    assert!(text.contains("good: delivered (accepted)"), "{text}");
    assert!(
        text.contains("bad: FAILED: failed (exit status 2)") && text.contains("no route to host"),
        "{text}"
    );
    assert_eq!(lines(dir.path(), "bad", 1), ["test info 1 hostA to-bad 0"]);
}

#[test]
fn mistakes_in_alert_sections_are_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let good = agent(dir.path(), "good", "exit 0");
    let mut relative = good.clone();
    relative.path = PathBuf::from("agent");
    let mut missing = good.clone();
    missing.path = dir.path().join("missing");
    let mut not_executable = good.clone();
    not_executable.path = dir.path().join("good.txt");
    std::fs::write(&not_executable.path, "").expect("write");
    let mut writable = good.clone();
    writable.path = dir.path().join("writable");
    std::fs::write(&writable.path, "#!/bin/sh\n").expect("write");
    std::fs::set_permissions(&writable.path, std::fs::Permissions::from_mode(0o777))
        .expect("chmod");
    let mut slow = good.clone();
    slow.timeout_ms = 0;
    let mut severity = good.clone();
    severity.severity = "info".into();
    let mut environment = good.clone();
    environment
        .environment
        .insert("FTVM_ALERT_KIND".into(), "x".into());
    for (section, expected) in [
        (relative, "is not absolute"),
        (missing, "No such file"),
        (not_executable, "is not an executable file"),
        (writable, "writable by group or others (mode 777)"),
        (slow, "timeout_ms 0 is not 1 to 120000"),
        (severity, "severity \"info\" is not"),
        (environment, "must be letters"),
    ] {
        let error = validate(&[section]).expect_err(expected);
        assert!(error.contains(expected), "{error}");
    }
    let error = validate(&[good.clone(), good]).expect_err("twice");
    assert!(error.contains("name of its own"), "{error}");
}
