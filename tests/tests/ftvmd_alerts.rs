//! Alerts (issue 15, item 2): ftvmd on hostA runs the shipped agents on a real A-link cut
//! and its return. The webhook agent posts to a receiver in the witness namespace,
//! `snmptrapd` there receives the SNMP agent's traps, and a hung agent is killed at its
//! timeout without delaying ftvmd or the other agents. No VM: an A-link cut raises its
//! condition without one, so no guest boots.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_tests::cluster::{metric_value, Cluster, ClusterOptions};
use ftvm_tests::guest::GuestConfig;
use ftvm_tests::net::spawn_in_namespace;
use ftvm_tests::paths;
use ftvm_tests::process::Process;
use ftvm_tests::wait::poll_until;

const A: usize = 0;
const B: usize = 1;
/// The webhook receiver and the trap receiver, in the witness namespace (on the LAN).
const WEBHOOK: &str = "10.77.0.3:8080";
const TRAPS: &str = "10.77.0.3:1162";
/// FTVM-MIB::ftvmNotifications (packaging/alerts/FTVM-MIB.txt).
const NOTIFICATIONS: &str = ".1.3.6.1.3.7700.0";
/// The hung agent's timeout.
const HUNG_TIMEOUT_MS: u64 = 1000;

/// JSON bodies POSTed to [`WEBHOOK`], until dropped.
struct WebhookReceiver {
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
    stop: Arc<AtomicBool>,
}

impl WebhookReceiver {
    fn start(namespace: &str) -> WebhookReceiver {
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (sink, stopped) = (Arc::clone(&bodies), Arc::clone(&stop));
        let (bound, is_bound) = std::sync::mpsc::channel();
        spawn_in_namespace(namespace, move || {
            let listener = TcpListener::bind(WEBHOOK).expect("bind the webhook receiver");
            listener.set_nonblocking(true).expect("nonblocking");
            bound.send(()).expect("say bound");
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if let Some(body) = receive(stream) {
                            sink.lock().expect("bodies").push(body);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        is_bound
            .recv_timeout(Duration::from_secs(10))
            .expect("the webhook receiver listens");
        WebhookReceiver { bodies, stop }
    }

    fn bodies(&self) -> Vec<serde_json::Value> {
        self.bodies.lock().expect("bodies").clone()
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads one HTTP POST and answers 200; the body as JSON.
fn receive(stream: TcpStream) -> Option<serde_json::Value> {
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut reader = BufReader::new(stream);
    let mut length = 0usize;
    let mut first = String::new();
    reader.read_line(&mut first).ok()?;
    assert!(first.starts_with("POST "), "webhook request: {first}");
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0u8; length.min(64 * 1024)];
    reader.read_exact(&mut body).ok()?;
    let _ = reader
        .get_mut()
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    Some(serde_json::from_slice(&body).expect("the webhook body is JSON"))
}

/// `snmptrapd` in the witness namespace, logging every trap to a file.
fn start_snmptrapd(cluster: &Cluster) -> (Process, PathBuf) {
    let config = cluster.dir.path().join("snmptrapd.conf");
    std::fs::write(&config, "authCommunity log public\n").expect("write snmptrapd.conf");
    let log = cluster.dir.path().join("traps.log");
    let mut command = cluster.hosts.command("witness", "snmptrapd");
    command
        .args(["-f", "-n", "-On", "-C", "-c"])
        .arg(&config)
        .arg("-Lf")
        .arg(&log)
        .args(["-p"])
        .arg(cluster.dir.path().join("snmptrapd.pid"))
        .arg(format!("udp:{TRAPS}"));
    let process = Process::spawn(
        "snmptrapd",
        command,
        &cluster.dir.path().join("snmptrapd.out"),
    );
    poll_until(Duration::from_secs(10), "snmptrapd to start", || {
        std::fs::read_to_string(&log).is_ok_and(|text| text.contains("NET-SNMP version"))
    });
    (process, log)
}

/// The traps in snmptrapd's log: each trap's notification number (1 raised, 2 cleared,
/// 3 event, 4 test) with its text.
fn traps(log: &Path) -> Vec<(u32, String)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    // The only OID-typed value of a trap is its snmpTrapOID.0.
    text.split("= OID: ")
        .skip(1)
        .filter_map(|trap| {
            let number = trap
                .strip_prefix(NOTIFICATIONS)?
                .strip_prefix('.')?
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()?;
            Some((number, trap.to_owned()))
        })
        .collect()
}

/// A hung agent: records its pid, then sleeps far past its timeout.
fn hung_agent(dir: &Path) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("hung-agent");
    let pids = dir.join("hung.pids");
    std::fs::write(
        &path,
        format!("#!/bin/sh\necho $$ >> {}\nexec sleep 600\n", pids.display()),
    )
    .expect("write the hung agent");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    (path, pids)
}

/// hostA's configuration without the VM (nothing to boot) and with the three agents;
/// hostB's without the VM.
fn configure(cluster: &Cluster, hung: &Path) {
    let agents = paths::repo_root().join("packaging/alerts");
    for host in [A, B] {
        let path = cluster.config_path(host);
        let text = std::fs::read_to_string(&path).expect("read config");
        let mut text = text[..text.find("[[vm]]").expect("a [[vm]]")].to_owned();
        if host == A {
            text.push_str(&format!(
                r#"
[[alert]]
name = "webhook"
path = "{agents}/ftvm-alert-webhook"
recipient = "http://{WEBHOOK}/ftvm"
timeout_ms = 5000

[[alert]]
name = "snmp"
path = "{agents}/ftvm-alert-snmp"
recipient = "udp:{TRAPS}"
environment = {{ FTVM_SNMP_COMMUNITY = "public" }}

[[alert]]
name = "hung"
path = "{hung}"
timeout_ms = {HUNG_TIMEOUT_MS}
"#,
                agents = agents.display(),
                hung = hung.display(),
            ));
        }
        std::fs::write(&path, text).expect("write config");
    }
}

fn a_link_alerts(bodies: &[serde_json::Value]) -> Vec<(String, String)> {
    bodies
        .iter()
        .map(|body| {
            (
                body["kind"].as_str().unwrap_or_default().to_owned(),
                body["severity"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[test]
fn an_a_link_cut_alerts_each_agent_once_and_its_return_clears_it() {
    let guest = GuestConfig::new("alerts", "true");
    let mut cluster = Cluster::new("alerts", &guest, &ClusterOptions::default());
    let (hung, hung_pids) = hung_agent(cluster.dir.path());
    configure(&cluster, &hung);
    let (ok, check) = {
        let output = std::process::Command::new(paths::binary("ftvmd"))
            .arg("--check")
            .arg("--config")
            .arg(cluster.config_path(A))
            .output()
            .expect("run ftvmd --check");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr),
        )
    };
    assert!(ok, "ftvmd --check: {check}");
    let webhook = WebhookReceiver::start(&cluster.hosts.namespace("witness"));
    let (_snmptrapd, trap_log) = start_snmptrapd(&cluster);
    // hostB first: hostA hears its peer on both links from its start.
    cluster.start_witness();
    cluster.start_ftvmd(B);
    cluster.start_ftvmd(A);
    let links_up = |host: usize| {
        cluster
            .status(host)
            .and_then(|status| status["links_up"].as_u64())
    };
    poll_until(Duration::from_secs(20), "both A-links up on hostA", || {
        links_up(A) == Some(2) && links_up(B) == Some(2)
    });
    assert!(webhook.bodies().is_empty(), "{:?}", webhook.bodies());

    // Cut A-link 2 (on hostB's side): hostA raises a-link-down.
    let cut_at = Instant::now();
    cluster.set_links(B, &["alink2"], false);
    poll_until(Duration::from_secs(20), "the webhook's a-link-down", || {
        !webhook.bodies().is_empty()
    });
    let delivered_after = cut_at.elapsed();
    poll_until(Duration::from_secs(10), "the a-link-down trap", || {
        !traps(&trap_log).is_empty()
    });
    // The hung agent: killed at its timeout, then once more on its retry.
    poll_until(Duration::from_secs(10), "the hung agent's retry", || {
        std::fs::read_to_string(&hung_pids).is_ok_and(|text| text.lines().count() == 2)
    });
    // While it hangs, ftvmd answers at once.
    let asked = Instant::now();
    let status = cluster.status(A).expect("hostA's status");
    let answered = asked.elapsed();
    assert!(
        answered < Duration::from_secs(2),
        "status took {answered:?}"
    );
    assert_eq!(status["links_up"], 1, "{status}");
    poll_until(
        Duration::from_secs(10),
        "the hung agent to be killed",
        || {
            cluster
                .log(A)
                .matches("killed at its timeout of 1000 ms")
                .count()
                == 2
        },
    );
    let pids = std::fs::read_to_string(&hung_pids).expect("hung pids");
    for pid in pids.lines() {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "the hung agent {pid} still runs"
        );
    }

    // The link returns: one clearing alert with the same kind.
    cluster.set_links(B, &["alink2"], true);
    poll_until(Duration::from_secs(30), "the clearing alert", || {
        webhook.bodies().len() >= 2 && traps(&trap_log).len() >= 2
    });
    // The hung agent's clearing run (and retry) ends too; then every queue is empty.
    poll_until(
        Duration::from_secs(15),
        "the hung agent's clearing runs",
        || {
            std::fs::read_to_string(&hung_pids).is_ok_and(|text| text.lines().count() == 4)
                && cluster
                    .log(A)
                    .matches("killed at its timeout of 1000 ms")
                    .count()
                    == 4
        },
    );
    let bodies = webhook.bodies();
    assert_eq!(
        a_link_alerts(&bodies),
        [
            ("a-link-down".to_owned(), "warning".to_owned()),
            ("a-link-down".to_owned(), "cleared".to_owned())
        ],
        "{bodies:?}"
    );
    let (raised, cleared) = (&bodies[0], &bodies[1]);
    assert_eq!(raised["host"], "hostA");
    assert_eq!(raised["vm"], "");
    assert!(
        raised["description"]
            .as_str()
            .is_some_and(|text| text.starts_with("1 of 2 A-links to hostB up")),
        "{raised}"
    );
    assert!(raised["remedy"]
        .as_str()
        .is_some_and(|text| !text.is_empty()));
    assert!(raised["timestamp"]
        .as_str()
        .is_some_and(|text| text.ends_with('Z')));
    assert!(cleared["sequence"].as_u64() > raised["sequence"].as_u64());
    let received = traps(&trap_log);
    let numbers: Vec<u32> = received.iter().map(|(number, _)| *number).collect();
    assert_eq!(numbers, [1, 2], "{received:?}");
    assert!(
        received[0].1.contains("\"a-link-down\""),
        "{}",
        received[0].1
    );
    assert!(received[0].1.contains("\"hostA\""), "{}", received[0].1);
    // Heartbeats went on: hostB never lost hostA (it saw one link go, not both).
    let peer_events = cluster.ftvm(B, &["events"]).1;
    assert!(!peer_events.contains("are down"), "{peer_events}");

    // What a Prometheus scraping hostA sees.
    let scrape = cluster.scrape_metrics(A);
    let result = |agent: &str, result: &str| {
        metric_value(
            &scrape,
            "ftvm_alerts_total",
            &[("agent", agent), ("result", result)],
        )
    };
    assert_eq!(result("webhook", "delivered"), Some(2.0));
    assert_eq!(result("snmp", "delivered"), Some(2.0));
    assert_eq!(result("hung", "failed"), Some(2.0));
    assert_eq!(
        metric_value(
            &scrape,
            "ftvm_alert_runs_timed_out_total",
            &[("agent", "hung")]
        ),
        Some(4.0)
    );
    assert_eq!(
        metric_value(&scrape, "ftvm_alink_up", &[("link", "2")]),
        Some(1.0)
    );
    assert!(metric_value(&scrape, "ftvm_alink_sent_bytes_total", &[("link", "1")]) > Some(0.0));

    // `ftvm alert test`: every agent's result, the hung one's failure included.
    let (ok, text) = cluster.ftvm(A, &["alert", "test"]);
    assert!(!ok, "the hung agent failed, so must the test: {text}");
    assert!(text.contains("webhook: delivered (posted to"), "{text}");
    assert!(text.contains("snmp: delivered (trap sent to"), "{text}");
    assert!(
        text.contains("hung: FAILED: killed at its timeout of 1000 ms"),
        "{text}"
    );
    let bodies = webhook.bodies();
    assert_eq!(bodies.len(), 3, "{bodies:?}");
    assert_eq!(bodies[2]["kind"], "test");
    assert_eq!(traps(&trap_log).last().map(|(number, _)| *number), Some(4));
    println!(
        "a-link-down at the webhook {:.2} s after the cut; ftvm status {} ms while an agent hung",
        delivered_after.as_secs_f64(),
        answered.as_millis()
    );
}

/// The mail agent hands sendmail one whole message whose headers the event's text cannot
/// split (sendmail here is a script that keeps what it gets: the MTA is not under test).
#[test]
fn the_mail_agent_hands_sendmail_a_message_with_unsplittable_headers() {
    use std::os::unix::fs::PermissionsExt;
    let dir = ftvm_tests::scratch_dir("alert-mail");
    let sendmail = dir.path().join("sendmail");
    let kept = dir.path().join("message");
    std::fs::write(
        &sendmail,
        format!(
            "#!/bin/sh\necho \"args: $*\" > {0}\ncat >> {0}\n",
            kept.display()
        ),
    )
    .expect("write sendmail");
    std::fs::set_permissions(&sendmail, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let output =
        std::process::Command::new(paths::repo_root().join("packaging/alerts/ftvm-alert-mail"))
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("FTVM_SENDMAIL", &sendmail)
            .env("FTVM_ALERT_RECIPIENT", "ops@example.com")
            .env("FTVM_ALERT_KIND", "vm-unprotected")
            .env("FTVM_ALERT_SEVERITY", "warning")
            .env("FTVM_ALERT_VM", "vm1")
            .env("FTVM_ALERT_HOST", "hostB")
            .env(
                "FTVM_ALERT_DESCRIPTION",
                "no longer protected\nBcc: victim@example.com",
            )
            .env("FTVM_ALERT_REMEDY", "bring hostA back")
            .env("FTVM_ALERT_SEQUENCE", "17")
            .env("FTVM_ALERT_TIMESTAMP", "2026-12-07T08:55:02.125Z")
            .output()
            .expect("run the mail agent");
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "mailed to ops@example.com"
    );
    let message = std::fs::read_to_string(&kept).expect("the message");
    let (head, body) = message.split_once("\n\n").expect("head and body");
    let head: Vec<&str> = head.lines().collect();
    assert_eq!(head[0], "args: -t -oi");
    assert!(head.contains(&"To: ops@example.com"), "{message}");
    assert!(head.contains(&"From: ftvm@hostB"), "{message}");
    assert!(
        head.contains(
            &"Subject: [ftvm] WARNING hostB vm1: no longer protectedBcc: victim@example.com"
        ),
        "{message}"
    );
    assert!(
        !head.iter().any(|line| line.starts_with("Bcc:")),
        "{message}"
    );
    assert!(body.contains("Remedy:   bring hostA back"), "{message}");
    assert!(body.contains("Sequence: 17"), "{message}");
    // No address, no mail: a clear refusal.
    let refused =
        std::process::Command::new(paths::repo_root().join("packaging/alerts/ftvm-alert-mail"))
            .env_clear()
            .env("FTVM_SENDMAIL", &sendmail)
            .env("FTVM_ALERT_RECIPIENT", "")
            .output()
            .expect("run the mail agent");
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("must be a mail address"));
}
