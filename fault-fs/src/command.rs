//! The control socket's commands: one line each, parsed here without touching the file
//! system. See the README for the list.

use std::time::Duration;

use thiserror::Error;

use crate::faults::{FailRule, InjectedErrno, RuleAccess};

/// Longest delay `delay-ms` accepts: a minute.
pub const MAX_DELAY_MS: u64 = 60_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Fail(FailRule),
    EnospcAfter(u64),
    Delay(Duration),
    Fallocate { supported: bool },
    PowerLoss,
    Sync,
    Clear,
    Status,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CommandError {
    #[error("empty command")]
    Empty,
    #[error("unknown command {0:?}")]
    Unknown(String),
    #[error("{command} takes {expected}")]
    Usage {
        command: &'static str,
        expected: &'static str,
    },
    #[error("{0:?} is not a number of bytes or milliseconds")]
    Number(String),
    #[error("unknown errno {0:?} (EIO, ENOSPC or EOPNOTSUPP)")]
    Errno(String),
    #[error("unknown argument {0:?}")]
    Argument(String),
    #[error("{0} given twice")]
    Repeated(&'static str),
    #[error("delay-ms is at most {MAX_DELAY_MS}")]
    DelayTooLong,
}

const FAIL_USAGE: &str =
    "read|write|sync|any [errno=EIO|ENOSPC|EOPNOTSUPP] [file=NAME] [offset=N] [len=N]";

/// Parses one command line (white space separated words).
pub fn parse(line: &str) -> Result<Command, CommandError> {
    let mut words = line.split_whitespace();
    let name = words.next().ok_or(CommandError::Empty)?;
    let arguments: Vec<&str> = words.collect();
    match (name, arguments.as_slice()) {
        ("fail", arguments) => parse_fail(arguments).map(Command::Fail),
        ("enospc-after", [bytes]) => Ok(Command::EnospcAfter(number(bytes)?)),
        ("enospc-after", _) => usage("enospc-after", "BYTES"),
        ("delay-ms", [milliseconds]) => {
            let milliseconds = number(milliseconds)?;
            if milliseconds > MAX_DELAY_MS {
                return Err(CommandError::DelayTooLong);
            }
            Ok(Command::Delay(Duration::from_millis(milliseconds)))
        }
        ("delay-ms", _) => usage("delay-ms", "MILLISECONDS"),
        ("fallocate", ["supported"]) => Ok(Command::Fallocate { supported: true }),
        ("fallocate", ["unsupported"]) => Ok(Command::Fallocate { supported: false }),
        ("fallocate", _) => usage("fallocate", "supported|unsupported"),
        ("power-loss", []) => Ok(Command::PowerLoss),
        ("sync", []) => Ok(Command::Sync),
        ("clear", []) => Ok(Command::Clear),
        ("status", []) => Ok(Command::Status),
        ("power-loss" | "sync" | "clear" | "status", _) => Err(CommandError::Usage {
            command: "this command",
            expected: "no arguments",
        }),
        (other, _) => Err(CommandError::Unknown(other.to_owned())),
    }
}

fn usage(command: &'static str, expected: &'static str) -> Result<Command, CommandError> {
    Err(CommandError::Usage { command, expected })
}

fn number(word: &str) -> Result<u64, CommandError> {
    word.parse()
        .map_err(|_| CommandError::Number(word.to_owned()))
}

fn parse_fail(arguments: &[&str]) -> Result<FailRule, CommandError> {
    let access = match arguments.first() {
        Some(&"read") => RuleAccess::Read,
        Some(&"write") => RuleAccess::Write,
        Some(&"sync") => RuleAccess::Sync,
        Some(&"any") => RuleAccess::Any,
        _ => {
            return Err(CommandError::Usage {
                command: "fail",
                expected: FAIL_USAGE,
            })
        }
    };
    let mut rule = FailRule {
        access,
        errno: InjectedErrno::Eio,
        file: None,
        offset: None,
        len: None,
    };
    let mut errno_given = false;
    for argument in arguments.iter().skip(1) {
        let Some((key, value)) = argument.split_once('=') else {
            return Err(CommandError::Argument((*argument).to_owned()));
        };
        match key {
            "errno" => {
                if std::mem::replace(&mut errno_given, true) {
                    return Err(CommandError::Repeated("errno"));
                }
                rule.errno =
                    InjectedErrno::parse(value).ok_or(CommandError::Errno(value.to_owned()))?;
            }
            "file" => set_once(&mut rule.file, value.to_owned(), "file")?,
            "offset" => set_once(&mut rule.offset, number(value)?, "offset")?,
            "len" => set_once(&mut rule.len, number(value)?, "len")?,
            _ => return Err(CommandError::Argument((*argument).to_owned())),
        }
    }
    Ok(rule)
}

fn set_once<T>(slot: &mut Option<T>, value: T, name: &'static str) -> Result<(), CommandError> {
    if slot.replace(value).is_some() {
        return Err(CommandError::Repeated(name));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_takes_its_arguments_in_any_order_with_eio_by_default() {
        assert_eq!(
            parse("fail write len=4096 file=disk.img offset=8192"),
            Ok(Command::Fail(FailRule {
                access: RuleAccess::Write,
                errno: InjectedErrno::Eio,
                file: Some("disk.img".into()),
                offset: Some(8192),
                len: Some(4096),
            }))
        );
        assert_eq!(
            parse("  fail any errno=ENOSPC "),
            Ok(Command::Fail(FailRule {
                access: RuleAccess::Any,
                errno: InjectedErrno::Enospc,
                file: None,
                offset: None,
                len: None,
            }))
        );
    }

    #[test]
    fn the_other_commands_parse() {
        assert_eq!(parse("enospc-after 100"), Ok(Command::EnospcAfter(100)));
        assert_eq!(
            parse("delay-ms 5"),
            Ok(Command::Delay(Duration::from_millis(5)))
        );
        assert_eq!(
            parse("fallocate unsupported"),
            Ok(Command::Fallocate { supported: false })
        );
        assert_eq!(parse("power-loss"), Ok(Command::PowerLoss));
        assert_eq!(parse("sync"), Ok(Command::Sync));
        assert_eq!(parse("clear"), Ok(Command::Clear));
        assert_eq!(parse("status"), Ok(Command::Status));
    }

    #[test]
    fn bad_commands_are_errors_that_say_why() {
        let cases = [
            ("", "empty command"),
            ("reboot", "unknown command \"reboot\""),
            ("fail", "fail takes read|write|sync|any"),
            ("fail write errno=EPERM", "unknown errno \"EPERM\""),
            ("fail write offset=-1", "\"-1\" is not a number"),
            ("fail write offset=1 offset=2", "offset given twice"),
            ("fail write bogus", "unknown argument \"bogus\""),
            ("fail write colour=red", "unknown argument \"colour=red\""),
            ("enospc-after", "enospc-after takes BYTES"),
            ("enospc-after 1 2", "enospc-after takes BYTES"),
            ("enospc-after 99999999999999999999999", "is not a number"),
            ("delay-ms 60001", "delay-ms is at most 60000"),
            ("fallocate maybe", "fallocate takes supported|unsupported"),
            ("power-loss now", "takes no arguments"),
        ];
        for (line, expected) in cases {
            let error = parse(line).expect_err(line).to_string();
            assert!(error.contains(expected), "{line:?}: {error:?}");
        }
    }
}
