//! Small static programs the guests run (sources in `tests/guest/`), compiled with the
//! host's C compiler (`gcc` and `libc6-dev`, installed by `ci/install-deps.sh`) into
//! `target/guest-tools/` on first use and again whenever the source is newer.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::cpio::Entry;
use crate::paths;

/// Serializes compiles within one test process (tests of one binary run as threads).
static COMPILING: Mutex<()> = Mutex::new(());

/// `tests/guest/NAME.c` compiled statically, as a file for the guest's root directory.
pub fn tool(name: &str) -> Entry {
    let binary = compiled(name);
    let bytes = std::fs::read(&binary)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", binary.display()));
    Entry::executable(name, bytes)
}

fn compiled(name: &str) -> PathBuf {
    let source = paths::repo_root()
        .join("tests/guest")
        .join(format!("{name}.c"));
    let dir = paths::target_dir().join("guest-tools");
    let binary = dir.join(name);
    let _guard = COMPILING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if is_fresh(&binary, &source) {
        return binary;
    }
    std::fs::create_dir_all(&dir).expect("create target/guest-tools");
    // Compile to a name of this process, then rename: test processes running at the same
    // time never see a half-written binary.
    let partial = dir.join(format!("{name}.{}.partial", std::process::id()));
    let output = Command::new("cc")
        .args(["-static", "-O2", "-Wall", "-Wextra", "-o"])
        .arg(&partial)
        .arg(&source)
        .output()
        .unwrap_or_else(|error| {
            panic!("cannot run cc ({error}); install gcc and libc6-dev (ci/install-deps.sh)")
        });
    assert!(
        output.status.success(),
        "cc {} failed:\n{}",
        source.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::rename(&partial, &binary).expect("move the compiled tool in place");
    binary
}

fn is_fresh(binary: &Path, source: &Path) -> bool {
    let modified = |path: &Path| {
        std::fs::metadata(path)
            .and_then(|meta| meta.modified())
            .ok()
    };
    match (modified(binary), modified(source)) {
        (Some(built), Some(written)) => built >= written,
        _ => false,
    }
}
