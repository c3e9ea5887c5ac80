//! The web console `ftvm-web` in a real headless browser (Debian's chromium through
//! chromedriver, driven with fantoccini): the console runs on the client host and reaches
//! both hosts' ftvmd through the control API over TCP; the browser runs there too.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use ftvm_tests::browser::{in_namespace, Browser};
use ftvm_tests::cluster::{Cluster, ClusterOptions, HOSTS};
use ftvm_tests::paths;
use ftvm_tests::process::Process;
use ftvm_tests::records::cluster_writer;
use serde_json::Value;

const A: usize = 0;
const B: usize = 1;
const CONSOLE: &str = "10.77.0.4:8443";
const PASSWORD: &str = "correct horse battery staple";
/// How long the page may take to show a cut A-link.
const DEGRADED_WITHIN: Duration = Duration::from_secs(2);

/// The console on the client host, managing the cluster's pair over the API.
fn start_console(cluster: &Cluster, dir: &Path) -> (Process, PathBuf) {
    let mut hash = Command::new(paths::binary("ftvm-web"))
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run ftvm-web hash-password");
    std::io::Write::write_all(
        &mut hash.stdin.take().expect("stdin"),
        format!("{PASSWORD}\n").as_bytes(),
    )
    .expect("send the password");
    let output = hash.wait_with_output().expect("hash-password");
    assert!(output.status.success(), "hash-password failed");
    let hash = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    let audit = dir.join("audit.log");
    let config = format!(
        r#"listen = "{CONSOLE}"
state_dir = "{state}"
audit_log = "{audit}"
[[user]]
name = "admin"
password_hash = "{hash}"
[[pair]]
name = "pair1"
[[pair.host]]
name = "hostA"
api = ["{a}"]
api_key_file = "{key}"
[[pair.host]]
name = "hostB"
api = ["{b}"]
api_key_file = "{key}"
"#,
        state = dir.join("state").display(),
        audit = audit.display(),
        a = cluster.api_address(A),
        b = cluster.api_address(B),
        key = cluster.api_key().display(),
    );
    let path = dir.join("ftvm-web.toml");
    std::fs::write(&path, config).expect("write the console's config");
    let mut command = cluster.hosts.command("client", paths::binary("ftvm-web"));
    command.arg("--config").arg(&path).env("RUST_LOG", "info");
    let console = Process::spawn("ftvm-web", command, &dir.join("ftvm-web.log"));
    (console, audit)
}

/// Polls `check` every 50 ms until it gives a value, for up to `timeout`.
async fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// vm1's row as the page shows it: health, state, primary, sync percent.
async fn row(client: &Client) -> Option<Value> {
    let script = r#"
        const row = document.querySelector('tr.vm-row[data-vm="vm1"]');
        if (!row) return null;
        return { health: row.dataset.health, state: row.dataset.state,
                 primary: row.dataset.primary,
                 percent: Number(row.querySelector('.sync-bar').dataset.percent),
                 text: row.innerText };
    "#;
    client
        .execute(script, vec![])
        .await
        .ok()
        .filter(|value| !value.is_null())
}

/// The text of the element `css`, if there is one.
async fn text_of(client: &Client, css: &str) -> Option<String> {
    let value = client
        .execute(
            "const node = document.querySelector(arguments[0]); return node ? node.innerText : null;",
            vec![Value::String(css.to_owned())],
        )
        .await
        .ok()?;
    value.as_str().map(str::to_owned)
}

/// Every host card's text, by host.
async fn host_cards(client: &Client) -> Value {
    let script = r#"
        const cards = {};
        for (const card of document.querySelectorAll('.host')) cards[card.dataset.host] = card.innerText;
        return cards;
    "#;
    client.execute(script, vec![]).await.unwrap_or(Value::Null)
}

/// POSTs an action from the page's origin with `fetch`; returns the HTTP status.
async fn post_action(client: &Client, credentials: &str, csrf: &str) -> u64 {
    let script = format!(
        r#"const done = arguments[arguments.length - 1];
        fetch('/api/action', {{ method: 'POST', credentials: '{credentials}',
            headers: {{ 'Content-Type': 'application/json', 'X-CSRF-Token': '{csrf}' }},
            body: JSON.stringify({{ action: 'failover', pair: 'pair1', host: 'hostA', vm: 'vm1' }}) }})
          .then((response) => done(response.status), (error) => done(String(error)));"#
    );
    let status = client
        .execute_async(&script, vec![])
        .await
        .expect("fetch /api/action");
    status
        .as_u64()
        .unwrap_or_else(|| panic!("fetch failed: {status}"))
}

async fn screenshot(client: &Client, dir: &Path, name: &str) {
    let png = client.screenshot().await.expect("screenshot");
    std::fs::write(dir.join(format!("{name}.png")), &png).expect("write screenshot");
    // `FTVM_UPDATE_SCREENSHOTS=1` refreshes the ones docs/OPERATIONS.md shows.
    if std::env::var_os("FTVM_UPDATE_SCREENSHOTS").is_some() {
        let docs = paths::repo_root().join("docs/screenshots");
        std::fs::create_dir_all(&docs).expect("docs/screenshots");
        std::fs::write(docs.join(format!("web-{name}.png")), &png).expect("write screenshot");
    }
}

/// Clicks the element `css`, again if the page re-rendered it meanwhile.
async fn click(client: &Client, css: &str) {
    wait_for(Duration::from_secs(10), css, async || {
        let element = client.find(Locator::Css(css)).await.ok()?;
        element.click().await.ok()
    })
    .await;
}

async fn sign_in(client: &Client, url: &str, user: &str, password: &str) {
    client
        .goto(&format!("{url}/login"))
        .await
        .expect("login page");
    let form = client
        .form(Locator::Css("#login"))
        .await
        .expect("login form");
    form.set_by_name("user", user).await.expect("user");
    form.set_by_name("password", password)
        .await
        .expect("password");
    form.submit().await.expect("submit");
}

#[test]
fn the_console_shows_the_pair_live_and_fails_over_from_the_page() {
    let options = ClusterOptions {
        api: true,
        // 64 MiB at 6 MiB/s: an initial sync of about 11 s to watch.
        resync_rate_limit: Some("6M".into()),
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::new("web-console", &cluster_writer(16_000), &options);
    let dir = cluster.dir.path().join("web");
    std::fs::create_dir_all(&dir).expect("console dir");
    let _logs = LogsOnFailure(dir.clone());
    let (mut console, audit) = start_console(&cluster, &dir);
    let browser = Browser::start(&cluster.hosts, "client", &dir);
    let namespace = cluster.hosts.namespace("client");
    let url = format!("https://{CONSOLE}");
    let cluster = &mut cluster;
    in_namespace(&namespace, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            let client = wait_for(Duration::from_secs(90), "a chromium session", async || {
                ClientBuilder::new(connector.clone())
                    .capabilities(browser.capabilities("main"))
                    .connect(&browser.webdriver_url())
                    .await
                    .ok()
            })
            .await;
            // The console listens once it has its certificate.
            wait_for(Duration::from_secs(60), "the login page", async || {
                client.goto(&format!("{url}/login")).await.ok()?;
                client.find(Locator::Css("#login")).await.ok()
            })
            .await;

            // No session: the page sends to the login, the API and the actions refuse.
            client.goto(&format!("{url}/")).await.expect("goto /");
            let here = client.current_url().await.expect("url");
            assert_eq!(here.path(), "/login", "the page without a session");
            client
                .goto(&format!("{url}/api/state"))
                .await
                .expect("goto state");
            let body = client.source().await.expect("source");
            assert!(body.contains("not signed in"), "{body}");
            assert_eq!(post_action(&client, "omit", "none").await, 401);

            // A wrong password is refused.
            sign_in(&client, &url, "admin", "wrong password").await;
            wait_for(Duration::from_secs(30), "the refusal", async || {
                text_of(&client, "#login-error")
                    .await
                    .filter(|text| text == "Wrong user or password.")
            })
            .await;
            assert_eq!(client.current_url().await.expect("url").path(), "/login");
            screenshot(&client, &dir, "login-refused").await;

            sign_in(&client, &url, "admin", PASSWORD).await;
            wait_for(Duration::from_secs(20), "the console page", async || {
                client.find(Locator::Css("#pairs")).await.ok()
            })
            .await;
            // Signed in, but an action without the page's CSRF token is refused.
            assert_eq!(post_action(&client, "same-origin", "forged").await, 403);

            cluster.start_all();
            // Both hosts, the witness, and the VM syncing: the bar moves.
            let mut seen = Vec::new();
            let syncing_shot = wait_for(
                Duration::from_secs(120),
                "the sync bar to move",
                async || {
                    let row = row(&client).await?;
                    let percent = row["percent"].as_f64()?;
                    if percent > 0.0 && percent < 100.0 && seen.last() != Some(&percent) {
                        seen.push(percent);
                    }
                    (seen.len() >= 3).then_some(row)
                },
            )
            .await;
            screenshot(&client, &dir, "syncing").await;
            assert!(
                seen.windows(2).all(|pair| pair[0] < pair[1]),
                "the bar went back: {seen:?}"
            );
            println!("sync bar seen at {seen:?} % ({})", syncing_shot["state"]);
            let protected = wait_for(Duration::from_secs(120), "vm1 Protected", async || {
                row(&client)
                    .await
                    .filter(|row| row["state"] == "Protected" && row["health"] == "ok")
            })
            .await;
            assert_eq!(protected["primary"], "hostA");
            assert_eq!(protected["percent"], 100.0);
            let cards = host_cards(&client).await;
            for host in HOSTS {
                let card = cards[host].as_str().unwrap_or_default();
                assert!(card.contains("2 of 2 up"), "{host}: {card}");
                assert!(card.contains("witness reachable"), "{host}: {card}");
            }
            screenshot(&client, &dir, "protected").await;
            api_refuses_a_wrong_key(cluster, &dir);

            // One A-link cut: the row turns degraded within 2 s.
            cluster.set_links(A, &["alink1"], false);
            let cut = Instant::now();
            let degraded = wait_for(Duration::from_secs(10), "a degraded row", async || {
                row(&client).await.filter(|row| row["health"] == "degraded")
            })
            .await;
            let shown_after = cut.elapsed();
            println!(
                "A-link cut shown as degraded after {:.2} s: {}",
                shown_after.as_secs_f64(),
                degraded["text"]
            );
            screenshot(&client, &dir, "degraded").await;
            assert!(
                shown_after < DEGRADED_WITHIN,
                "the cut took {shown_after:?} to show"
            );
            assert!(
                degraded["text"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("1 of 2 A-links up"),
                "{degraded}"
            );
            cluster.set_links(A, &["alink1"], true);
            wait_for(
                Duration::from_secs(30),
                "the row healthy again",
                async || row(&client).await.filter(|row| row["health"] == "ok"),
            )
            .await;

            // A planned failover from the page, behind its confirmation.
            click(&client, "button[data-action='failover'][data-vm='vm1']").await;
            let question = wait_for(Duration::from_secs(10), "the confirmation", async || {
                text_of(&client, "#confirm-text")
                    .await
                    .filter(|text| !text.is_empty())
            })
            .await;
            assert!(question.contains("Planned failover of vm1"), "{question}");
            screenshot(&client, &dir, "confirm-failover").await;
            click(&client, "#confirm-yes").await;
            let result = wait_for(
                Duration::from_secs(60),
                "the failover's answer",
                async || {
                    let text = text_of(&client, "#result").await?;
                    (!text.ends_with("sent…") && !text.is_empty()).then_some(text)
                },
            )
            .await;
            assert!(
                text_of(&client, "#result.done").await.is_some(),
                "the failover was not done: {result}"
            );
            wait_for(Duration::from_secs(120), "vm1 on hostB", async || {
                row(&client).await.filter(|row| row["primary"] == "hostB")
            })
            .await;
            cluster.wait_vm(B, Duration::from_secs(60), "primary on hostB", |vm| {
                vm["role"] == "Primary" && vm["vm_pid"].is_u64()
            });
            wait_for(
                Duration::from_secs(120),
                "vm1 Protected on hostB",
                async || {
                    row(&client)
                        .await
                        .filter(|row| row["state"] == "Protected" && row["primary"] == "hostB")
                },
            )
            .await;
            screenshot(&client, &dir, "after-failover").await;
            let _ = client.close().await;
        });
    });
    drop(browser);

    // Every login and action is in the audit log, with its user and result.
    let text = std::fs::read_to_string(&audit).expect("the audit log");
    let records: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("an audit line is JSON"))
        .collect();
    let has = |action: &str, user: &str, result: &str| {
        records.iter().any(|record| {
            record["action"] == action
                && record["user"] == user
                && record["result"]
                    .as_str()
                    .is_some_and(|text| text.starts_with(result))
                && record["time"]
                    .as_str()
                    .is_some_and(|time| time.ends_with('Z'))
        })
    };
    assert!(has("login", "admin", "refused"), "{text}");
    assert!(has("login", "admin", "ok"), "{text}");
    assert!(has("failover", "-", "refused: not signed in"), "{text}");
    assert!(has("failover", "admin", "refused: bad CSRF"), "{text}");
    assert!(has("failover", "admin", "ok"), "{text}");
    assert!(
        records
            .iter()
            .any(|record| record["target"] == "pair1/hostA/vm1"
                && record["result"]
                    .as_str()
                    .is_some_and(|result| result.starts_with("ok"))),
        "{text}"
    );
    assert_eq!(cluster.acting_primaries(), vec![HOSTS[B]]);
    console.assert_running();
}

/// From the client host (this thread's namespace): the control API answers a client with
/// the pair's API key, and refuses and logs one with another key.
fn api_refuses_a_wrong_key(cluster: &Cluster, dir: &Path) {
    use coordinator::api::ApiClient;
    use coordinator::daemon::control::{Reply, Request};
    let address = cluster.api_address(A).parse().expect("API address");
    let good =
        ApiClient::connect(vec![address], &cluster.api_key(), "web-test").expect("an API session");
    let timeout = Duration::from_secs(10);
    let status = ftvm_tests::wait::Wait::up_to(timeout)
        .every(Duration::from_millis(100))
        .poll(|| match good.request(&Request::Status, timeout) {
            Ok(Reply::Status(status)) => Some(status),
            _ => None,
        })
        .expect("no status over the API with the pair's key");
    assert_eq!(status.host, "hostA");
    let wrong = dir.join("wrong.psk");
    std::fs::write(&wrong, "not the API key of this pair, 0123456789\n").expect("write key");
    std::fs::set_permissions(&wrong, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let intruder = ApiClient::connect(vec![address], &wrong, "intruder").expect("a session");
    ftvm_tests::wait::poll_until(timeout, "hostA to log the refused client", || {
        cluster.log(A).contains("refused connection from")
    });
    let refused = intruder
        .request(&Request::Status, Duration::from_secs(1))
        .expect_err("a client without the key is refused");
    assert!(refused.contains("not connected"), "{refused}");
    assert!(!intruder.reachable());
}

/// Prints the console's and chromedriver's logs when the test fails.
struct LogsOnFailure(PathBuf);

impl Drop for LogsOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in ["ftvm-web.log", "chromedriver.log"] {
                let text = std::fs::read_to_string(self.0.join(log)).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                eprintln!(
                    "---- {log} (last lines) ----\n{}",
                    lines[lines.len().saturating_sub(80)..].join("\n")
                );
            }
        }
    }
}
