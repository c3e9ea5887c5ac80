//! The table of `ci/torture.sh` and `docs/RELIABILITY.md`, from the runs' JSON lines.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

use super::cluster_rows::ClusterRow;
use super::rows::Row;
use super::workload::Workload;

/// The rows in matrix order: the disk-level rows, the cluster rows, then both again under
/// fio.
fn matrix() -> Vec<String> {
    Group::ALL.iter().flat_map(|group| group.names()).collect()
}

/// Every row's name (without a workload's suffix), disk-level rows first.
fn base_names() -> impl Iterator<Item = &'static str> {
    Row::ALL
        .iter()
        .map(|row| row.name())
        .chain(ClusterRow::ALL.iter().map(|row| row.name()))
}

/// Each group of rows has its own results block in the document, so that a run of one
/// group keeps the other's last results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    Disk,
    Cluster,
    /// Every row again, with fio `--verify=crc32c` as the guest's workload.
    Fio,
}

impl Group {
    const ALL: [Group; 3] = [Group::Disk, Group::Cluster, Group::Fio];

    fn names(self) -> Vec<String> {
        match self {
            Group::Disk => Row::ALL.iter().map(|row| row.name().to_owned()).collect(),
            Group::Cluster => ClusterRow::ALL
                .iter()
                .map(|row| row.name().to_owned())
                .collect(),
            Group::Fio => base_names()
                .map(|name| format!("{name}{}", Workload::Fio.suffix()))
                .collect(),
        }
    }

    fn title(self) -> &'static str {
        match self {
            Group::Disk => "Disk-level rows (`tests/tests/torture.rs`)",
            Group::Cluster => "Cluster rows (`tests/tests/torture_cluster.rs`)",
            Group::Fio => "Every row under fio `--verify=crc32c` (`tests/tests/torture_fio.rs`)",
        }
    }

    fn markers(self) -> (&'static str, &'static str) {
        match self {
            Group::Disk => ("<!-- results:disk -->\n", "<!-- /results:disk -->"),
            Group::Cluster => ("<!-- results:cluster -->\n", "<!-- /results:cluster -->"),
            Group::Fio => ("<!-- results:fio -->\n", "<!-- /results:fio -->"),
        }
    }

    /// This group's results block in a previous document, if it has one.
    fn previous_block(self, previous: &str) -> Option<String> {
        let (begin, end) = self.markers();
        if let Some(start) = previous.find(begin) {
            let rest = &previous[start + begin.len()..];
            return rest.find(end).map(|stop| rest[..stop].to_owned());
        }
        // A document from before the groups: its only results were the disk rows'.
        if self == Group::Disk {
            let start = previous.find("## Results\n\n")? + "## Results\n\n".len();
            let rest = &previous[start..];
            return rest.find("\n## Rows").map(|stop| rest[..stop].to_owned());
        }
        None
    }
}

/// One row's numbers over its runs.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub runs: u64,
    pub passed: u64,
    pub lost_blocks: u64,
    pub split_brain_runs: u64,
    pub guest_errors: u64,
    pub incomplete: u64,
    pub protected_ms: Vec<u64>,
    /// Seeds of the failed runs, with what went wrong.
    pub failures: Vec<String>,
}

impl Summary {
    fn add(&mut self, run: &Value) {
        self.runs += 1;
        let number = |key: &str| run[key].as_u64().unwrap_or(0);
        if run["ok"] == true {
            self.passed += 1;
        }
        self.lost_blocks += number("lost_blocks");
        self.split_brain_runs += u64::from(number("split_brain_samples") > 0);
        self.guest_errors += number("guest_errors");
        if let Some(ms) = run["back_to_protected_ms"].as_u64() {
            self.protected_ms.push(ms);
        }
        if !run["error"].is_null() {
            self.incomplete += 1;
        }
        if run["ok"] != true {
            let why = match run["error"].as_str() {
                Some(error) => error.to_owned(),
                None => format!(
                    "lost {}, split-brain samples {}, guest errors {}, images identical {}",
                    run["lost_blocks"],
                    run["split_brain_samples"],
                    run["guest_errors"],
                    run["images_identical"]
                ),
            };
            self.failures.push(format!("seed {}: {why}", run["seed"]));
        }
    }

    fn median_and_max(&self) -> (String, String) {
        let mut times = self.protected_ms.clone();
        times.sort_unstable();
        let seconds = |ms: u64| format!("{:.1} s", ms as f64 / 1000.0);
        match (times.get(times.len() / 2), times.last()) {
            (Some(&median), Some(&max)) => (seconds(median), seconds(max)),
            _ => ("–".into(), "–".into()),
        }
    }
}

/// Parses the JSON lines of a results file (lines that do not parse are skipped).
pub fn summarize(results: &str) -> BTreeMap<String, Summary> {
    let mut rows: BTreeMap<String, Summary> = BTreeMap::new();
    for run in results
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
    {
        let row = run["row"].as_str().unwrap_or("?").to_owned();
        rows.entry(row).or_default().add(&run);
    }
    rows
}

/// The rows in matrix order, then any other names found.
fn ordered(rows: &BTreeMap<String, Summary>) -> Vec<(String, Summary)> {
    let matrix = matrix();
    let mut out: Vec<(String, Summary)> = matrix
        .iter()
        .filter_map(|name| rows.get(name).map(|s| (name.clone(), s.clone())))
        .collect();
    for (name, summary) in rows {
        if !matrix.contains(name) {
            out.push((name.clone(), summary.clone()));
        }
    }
    out
}

/// The results table in Markdown.
pub fn table(rows: &BTreeMap<String, Summary>) -> String {
    let mut out = String::from(
        "| row | runs | passed | acknowledged writes lost | split brains | guest-visible errors | back to Protected, median | max |\n|---|---|---|---|---|---|---|---|\n",
    );
    for (name, summary) in ordered(rows) {
        let (median, max) = summary.median_and_max();
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} | {} | {median} | {max} |",
            summary.runs,
            summary.passed,
            summary.lost_blocks,
            summary.split_brain_runs,
            summary.guest_errors
        );
    }
    out
}

/// `docs/RELIABILITY.md`: what was run, the tables, each row and how to replay it. A group
/// of rows with no run in `rows` keeps its results block from `previous` (the document
/// as it was).
pub fn document(
    rows: &BTreeMap<String, Summary>,
    command: &str,
    when: &str,
    total: &str,
    previous: &str,
) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "# ftvm reliability: the fault matrix\n\n\
         Generated by `ci/torture.sh` (do not edit by hand; run it again). Issue 10's acceptance \
         matrix. Disk-level rows: a mirrored pair (`vhost-blk-mirror` primary in hostA, \
         secondary in hostB, both A-links) under one QEMU guest, with the test playing the \
         coordinator (`continue-degraded GEN`, `repair`) as `tests/tests/mirror_faults.rs` does. \
         Cluster rows: the rows that need the coordinator, on a whole cluster \
         (`tests/src/cluster.rs`: `ftvmd` in hostA and hostB, `ftvm-witness`, a Level 2 VM \
         whose QEMU and disk daemons `ftvmd` starts).\n\n\
         ## What a run does and checks\n\n\
         The guest writes 400 numbered 4 KiB records at random blocks across the whole 32 MiB \
         disk, each with `dd conv=fsync` (the write, then a FLUSH), and prints `ACK <seq> <block>` \
         only after both returned. After a number of acknowledged writes drawn from the run's \
         seed (5–40), the row's fault hits; the row's other random choices (ENOSPC budget, which \
         link, when in a resync, how many writes between steps, how long a daemon stays down) \
         come from the same seed, printed by the run and replayed with `FTVM_TORTURE_SEED`. In \
         the cluster rows block 0 holds a boot marker: a guest that `ftvmd` starts again after \
         the fault (restart or failover) prints `REBOOTED` and stays idle, and the copy that \
         serves is read from its host's image file. Per run:\n\n\
         - **acknowledged writes lost**: blocks whose latest acknowledged record (the last write \
           to a block wins) is missing from the copy that serves next, checked right after the \
           fault was handled (the primary's image, or the secondary's while the primary serves \
           from it, RemoteOnly; in the cluster rows the image of the host that runs the VM \
           then), and on both copies once Protected again. Must be 0.\n\
         - **split brains**: runs in which a monitor saw two copies accept writes at once. Disk \
           rows: both daemons sampled every 50 ms, two unfenced primaries at one generation. \
           Cluster rows: the same on the disk daemons, plus both hosts' `ftvm status` and the \
           witness's record sampled every 50 ms (plus the time a sample takes): both hosts \
           acting as primary, or one acting at the witness's current generation that the \
           witness granted to the other. Must be 0.\n\
         - **guest-visible errors**: writes that failed in the guest plus the daemons' \
           `rejected_requests` (summed over restarts). Must be 0.\n\
         - **back to Protected**: from the fault to both copies UpToDate at one generation with \
           nothing out of sync, after the row's repair step (done as soon as the fault was \
           handled, while the guest writes on).\n\n\
         Both copies must also be byte-identical at the end (the guest idle).\n\n\
         **Under fio** (the rows named `…-fio`): the same rows, faults, timing and checks with \
         fio `--verify=crc32c` as the guest's workload. The guest runs fio once per 128 KiB chunk \
         (40 chunks at distinct random places of the disk): 32 random 4 KiB writes at queue \
         depth 8 (libaio, O_DIRECT), a FLUSH (`end_fsync`), then fio reads the chunk back and \
         checks every block's header and CRC32C; `ACK <seq> <block>` follows a run that passed, \
         `WRITE-FAILED` one that did not (an I/O error or a bad block: a guest-visible error). \
         The steps between faults are counted in chunks (a chunk stands for about 4 records). \
         An acknowledged chunk is lost when the host's fio, replaying its writes with \
         `--verify_only`, finds any of its blocks missing or corrupt on the copy checked.\n\n\
         ## Results\n\n"
    );
    for group in Group::ALL {
        let names = group.names();
        let ran: BTreeMap<String, Summary> = rows
            .iter()
            .filter(|(name, _)| names.contains(name))
            .map(|(name, summary)| (name.clone(), summary.clone()))
            .collect();
        let block = if ran.is_empty() {
            group
                .previous_block(previous)
                .unwrap_or_else(|| "Not run yet.\n".into())
        } else {
            results_block(&ran, command, when, total)
        };
        let (begin, end) = group.markers();
        let _ = write!(out, "### {}\n\n{begin}{block}{end}\n\n", group.title());
    }
    out.push_str("## Rows\n\n| row | what it does | replay one run |\n|---|---|---|\n");
    let descriptions = Row::ALL
        .iter()
        .map(|row| (row.name(), row.description()))
        .chain(
            ClusterRow::ALL
                .iter()
                .map(|row| (row.name(), row.description())),
        );
    for (name, description) in descriptions {
        let _ = writeln!(
            out,
            "| {name} | {description} | `sudo FTVM_TORTURE_SEED=<seed> ci/torture.sh --runs 1 --rows {name}` |",
        );
    }
    out.push_str(
        "\nEach row also runs under fio as `<row>-fio` (e.g. \
         `sudo FTVM_TORTURE_SEED=<seed> ci/torture.sh --runs 1 --rows secondary-eio-fio`).\n",
    );
    out
}

/// A group's results: the command, the table, the failed runs.
fn results_block(
    rows: &BTreeMap<String, Summary>,
    command: &str,
    when: &str,
    total: &str,
) -> String {
    let mut out = format!("Command: `{command}` ({when}; {total}).\n\n");
    out.push_str(&table(rows));
    for (name, summary) in ordered(rows) {
        for failure in &summary.failures {
            let _ = writeln!(out, "\nFailed: {name}, {failure}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_add_up_per_row_with_median_and_max() {
        let results = [
            r#"{"row":"kill-protected","seed":1,"ok":true,"lost_blocks":0,"split_brain_samples":0,"guest_errors":0,"back_to_protected_ms":1000,"error":null}"#,
            r#"{"row":"kill-protected","seed":2,"ok":true,"lost_blocks":0,"split_brain_samples":0,"guest_errors":0,"back_to_protected_ms":3000,"error":null}"#,
            r#"{"row":"kill-protected","seed":3,"ok":false,"lost_blocks":2,"split_brain_samples":1,"guest_errors":1,"back_to_protected_ms":2000,"error":null}"#,
            "not json",
        ]
        .join("\n");
        let rows = summarize(&results);
        let summary = &rows["kill-protected"];
        assert_eq!(
            (summary.runs, summary.passed, summary.lost_blocks),
            (3, 2, 2)
        );
        assert_eq!((summary.split_brain_runs, summary.guest_errors), (1, 1));
        assert_eq!(summary.median_and_max(), ("2.0 s".into(), "3.0 s".into()));
        assert_eq!(summary.failures.len(), 1);
        assert!(table(&rows).contains("| kill-protected | 3 | 2 | 2 | 1 | 1 | 2.0 s | 3.0 s |"));
    }

    #[test]
    fn a_run_of_one_group_keeps_the_other_groups_results() {
        let disk = summarize(
            r#"{"row":"kill-protected","seed":1,"ok":true,"lost_blocks":0,"split_brain_samples":0,"guest_errors":0,"back_to_protected_ms":1000,"error":null}"#,
        );
        let cluster = summarize(
            r#"{"row":"host-kill","seed":2,"ok":true,"lost_blocks":0,"split_brain_samples":0,"guest_errors":0,"back_to_protected_ms":9000,"error":null}"#,
        );
        let first = document(&disk, "disk command", "then", "1 run", "");
        assert!(first.contains("Not run yet."));
        let second = document(&cluster, "cluster command", "now", "1 run", &first);
        assert!(second.contains("disk command"), "{second}");
        assert!(second.contains("| kill-protected | 1 | 1 |"), "{second}");
        assert!(second.contains("cluster command"), "{second}");
        assert!(second.contains("| host-kill | 1 | 1 | 0 | 0 | 0 | 9.0 s | 9.0 s |"));
        // The fio runs have their own block, and keep the others'.
        let fio = summarize(
            r#"{"row":"secondary-eio-fio","seed":3,"ok":true,"lost_blocks":0,"split_brain_samples":0,"guest_errors":0,"back_to_protected_ms":2000,"error":null}"#,
        );
        let with_fio = document(&fio, "fio command", "later", "1 run", &second);
        let fio_block = with_fio
            .split("<!-- results:fio -->\n")
            .nth(1)
            .expect("a fio block");
        assert!(
            fio_block.starts_with("Command: `fio command`"),
            "{with_fio}"
        );
        assert!(
            fio_block.contains("| secondary-eio-fio | 1 | 1 |"),
            "{with_fio}"
        );
        assert!(with_fio.contains("cluster command") && with_fio.contains("disk command"));
        // A document from before the groups keeps its disk results too.
        let legacy = "# x\n\n## Results\n\nCommand: `old`.\n\n| row |\n\n## Rows\n";
        let third = document(&cluster, "cluster command", "now", "1 run", legacy);
        assert!(
            third.contains("<!-- results:disk -->\nCommand: `old`."),
            "{third}"
        );
    }
}
