//! What `ftvmd` and the daemons say to each other on the daemons' root-only control sockets,
//! as types both sides use: the commands, the replies and each daemon's full status.
//!
//! The wire is one text line in and one JSON line out, so that an operator can still type a
//! command with `socat`:
//!
//! - A command is formatted with its `Display` and parsed with its `FromStr`
//!   ([`disk::Command`], [`nic::Command`]); nothing else writes or matches command text.
//! - A reply is [`Reply::to_line`] on the daemon's side and [`Reply::from_line`] on
//!   ftvmd's: the command's answer, or `{"error": "…"}` when the daemon refused it.
//! - Every object is read with `deny_unknown_fields` and without defaults: a field that is
//!   missing (an `Option` included: it must be present as `null`), unknown or of the wrong
//!   type is an error, never a zero. A daemon and an ftvmd that disagree on the protocol find
//!   out at the first status, instead of reading a renamed generation as 0.
//!
//! The one opaque part is the replication links' counters (`links`, `peer_session`): they
//! belong to `replication-link`, are shown by `ftvm status` and decide nothing.

pub mod disk;
pub mod nic;
mod reply;

pub use reply::{Refusal, Reply, ReplyError};

/// Deserializes an `Option` field that must be present (as `null` when empty): serde treats
/// a missing `Option` as `None` unless the field has its own `deserialize_with`.
fn required<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    <Option<T> as serde::Deserialize>::deserialize(deserializer)
}

/// Why a command line was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("empty command; try: {commands}")]
    Empty { commands: &'static str },
    #[error("unknown command {word:?}; try: {commands}")]
    Unknown {
        word: String,
        commands: &'static str,
    },
    #[error("{command}: generation {word:?} is not a number")]
    NotANumber { command: &'static str, word: String },
    #[error("{command}: too many arguments")]
    TooManyArguments { command: &'static str },
}
