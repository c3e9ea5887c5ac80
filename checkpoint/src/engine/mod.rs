//! The `ftvm-checkpoint` daemon: the primary's epoch loop ([`primary`]), the secondary's
//! replica and restore ([`secondary`]), their clients of the disk and NIC daemons
//! ([`daemons`]), and the control socket both answer on (one command line in, one JSON
//! line out, like the other daemons):
//!
//! - primary: `status`, `release` (end Level 3: held output goes out, tracking stops, the
//!   engine exits; the VM runs on at Level 2); `handover` (`ftvm migrate`: one last
//!   checkpoint with the guest left stopped; the answer, once the secondary committed it,
//!   names its epoch, which the peer restores; see [`PrimaryShared::hand_over`]);
//! - secondary: `status`; `freeze` (stop taking epochs for good: the primary is lost; the
//!   answer names the last committed checkpoint, the epoch to promote the disks at with
//!   `promote GEN N*`); `restore QMP_SOCKET` (freeze, then restore that checkpoint into the
//!   QEMU behind QMP_SOCKET, started with `-incoming defer` on the replica RAM file; the
//!   engine then only answers `status`, which says `restored`, until SIGTERM); `drop`
//!   (freeze and make the replica durably not restorable: its primary stopped taking
//!   checkpoints).

pub mod daemons;
pub mod primary;
pub mod secondary;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use self::primary::PrimaryShared;
use self::secondary::{Request, SecondaryShared};

/// How long a `handover` waits for its final checkpoint to commit.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(20);

/// The primary's answer to one control line.
pub fn answer_primary(shared: &PrimaryShared, line: &str) -> String {
    match line.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["status"] => {
            let status = daemon_util::lock(&shared.status).clone();
            serde_json::to_string(&status).unwrap_or_else(|error| refusal(&error.to_string()))
        }
        ["release"] => {
            shared.release.store(true, Ordering::Relaxed);
            json!({"ok": true}).to_string()
        }
        ["handover"] => match shared.hand_over(HANDOVER_TIMEOUT) {
            Ok(epoch) => json!({"ok": true, "epoch": epoch}).to_string(),
            Err(error) => refusal(&error),
        },
        [] => refusal("empty command; try: status, release, handover"),
        _ => refusal(&format!(
            "unknown command {line:?}; try: status, release, handover"
        )),
    }
}

/// The secondary's answer to one control line.
pub fn answer_secondary(shared: &Arc<SecondaryShared>, line: &str) -> String {
    match line.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["status"] => serde_json::to_string(&shared.status())
            .unwrap_or_else(|error| refusal(&error.to_string())),
        ["freeze"] => match shared.ask(Request::Freeze) {
            Ok(answer) => answer.to_string(),
            Err(error) => refusal(&error),
        },
        ["restore", qmp] => match shared.ask(Request::Restore(PathBuf::from(qmp))) {
            Ok(answer) => answer.to_string(),
            Err(error) => refusal(&error),
        },
        ["restore"] => refusal("restore: which QEMU? restore QMP_SOCKET"),
        ["drop"] => match shared.ask(Request::Drop) {
            Ok(answer) => answer.to_string(),
            Err(error) => refusal(&error),
        },
        [] => refusal("empty command; try: status, freeze, restore QMP_SOCKET, drop"),
        _ => refusal(&format!(
            "unknown command {line:?}; try: status, freeze, restore QMP_SOCKET, drop"
        )),
    }
}

fn refusal(error: &str) -> String {
    json!({ "error": error }).to_string()
}

/// Binds the control socket and answers it on a thread.
pub fn serve_control(
    path: &Path,
    answer: impl Fn(&str) -> String + Send + 'static,
) -> anyhow::Result<()> {
    let listener = daemon_util::bind_unix(path)
        .map_err(|error| anyhow::anyhow!("control socket {}: {error}", path.display()))?;
    daemon_util::serve_commands(listener, move |line| Ok(answer(line)))
        .map_err(|error| anyhow::anyhow!("control socket {}: {error}", path.display()))
}
