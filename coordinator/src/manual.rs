//! Man pages and shell completions of `ftvm`, `ftvmd` and `ftvm-witness`, made from their
//! clap definitions ([`crate::cli`]) by `ftvm-gen-docs`, for the package or a local install.
//!
//! Layout under the output folder, as Debian installs it under `/usr/share`:
//! `man/man8/PROGRAM.8` (and `ftvm-SUBCOMMAND.8` for each of `ftvm`'s subcommands),
//! `bash-completion/completions/PROGRAM`, `zsh/vendor-completions/_PROGRAM`,
//! `fish/vendor_completions.d/PROGRAM.fish`.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::{FtvmArgs, FtvmdArgs, WitnessArgs};

/// Section of the pages: system administration commands (they need root).
const SECTION: &str = "8";

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}")]
pub struct ManualError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// The three programs' command lines.
pub fn commands() -> Vec<clap::Command> {
    vec![
        FtvmArgs::command(),
        FtvmdArgs::command(),
        WitnessArgs::command(),
    ]
}

/// Writes every man page and completion under `out`; returns the files made.
pub fn generate(out: &Path) -> Result<Vec<PathBuf>, ManualError> {
    let mut made = Vec::new();
    for command in commands() {
        let mut command = command.disable_help_subcommand(true);
        command.build();
        man_pages(&command, &out.join("man/man8"), &mut made)?;
        completions(&mut command, out, &mut made)?;
    }
    Ok(made)
}

/// The page of `command` and of each of its subcommands (`ftvm-host-disable.8`).
fn man_pages(
    command: &clap::Command,
    dir: &Path,
    made: &mut Vec<PathBuf>,
) -> Result<(), ManualError> {
    for subcommand in command.get_subcommands().filter(|each| !each.is_hide_set()) {
        man_pages(subcommand, dir, made)?;
    }
    let page = clap_mangen::Man::new(command.clone())
        .section(SECTION)
        .manual("ftvm");
    let path = dir.join(page.get_filename());
    write(&path, |file| page.render(file))?;
    made.push(path);
    Ok(())
}

fn completions(
    command: &mut clap::Command,
    out: &Path,
    made: &mut Vec<PathBuf>,
) -> Result<(), ManualError> {
    let name = command.get_name().to_owned();
    for (shell, path) in [
        (Shell::Bash, format!("bash-completion/completions/{name}")),
        (Shell::Zsh, format!("zsh/vendor-completions/_{name}")),
        (
            Shell::Fish,
            format!("fish/vendor_completions.d/{name}.fish"),
        ),
    ] {
        let path = out.join(path);
        write(&path, |file| {
            clap_complete::generate(shell, command, name.clone(), file);
            Ok(())
        })?;
        made.push(path);
    }
    Ok(())
}

fn write(
    path: &Path,
    render: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<(), ManualError> {
    let error = |source| ManualError {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(error)?;
    }
    let mut file = File::create(path).map_err(error)?;
    render(&mut file).map_err(error)?;
    file.flush().map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_names_every_subcommand_and_every_shell_gets_completions() {
        let temp = tempfile::tempdir().expect("tempdir");
        let made = generate(temp.path()).expect("generate");
        for command in commands() {
            let name = command.get_name().to_owned();
            let page = std::fs::read_to_string(temp.path().join(format!("man/man8/{name}.8")))
                .expect("the program's page");
            assert!(page.contains(".TH"), "{name}: not a man page");
            for subcommand in command.get_subcommands() {
                let sub = subcommand.get_name();
                // roff writes every hyphen as `\-`, those in the name too (`collect\-logs`).
                assert!(
                    page.contains(&format!("{name}\\-{}", sub.replace('-', "\\-"))),
                    "{name}.8 does not name {sub}"
                );
                let sub_page = temp.path().join(format!("man/man8/{name}-{sub}.8"));
                assert!(sub_page.exists(), "no page {}", sub_page.display());
            }
            // roff writes a hyphen as `\-`.
            for option in command.get_arguments().filter_map(|arg| arg.get_long()) {
                let roff = format!("\\-\\-{}", option.replace('-', "\\-"));
                assert!(page.contains(&roff), "{name}.8 lacks --{option}");
            }
            let bash = std::fs::read_to_string(
                temp.path()
                    .join(format!("bash-completion/completions/{name}")),
            )
            .expect("bash completion");
            for subcommand in command.get_subcommands() {
                assert!(bash.contains(subcommand.get_name()), "{name}: bash");
            }
            assert!(temp
                .path()
                .join(format!("zsh/vendor-completions/_{name}"))
                .exists());
            assert!(temp
                .path()
                .join(format!("fish/vendor_completions.d/{name}.fish"))
                .exists());
        }
        assert!(made.contains(&temp.path().join("man/man8/ftvm-host-disable.8")));
        let keygen = std::fs::read_to_string(temp.path().join("man/man8/ftvm-keygen.8"))
            .expect("keygen page");
        assert!(keygen.contains("witness"), "the long help is in the page");
    }
}
