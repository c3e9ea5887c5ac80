//! One reply line: a command's answer, or the daemon's refusal.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// What a daemon answers to one command.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply<T> {
    /// The command's own answer (a status, a result).
    Answer(T),
    /// The daemon refused the command, or did not understand it: why.
    Refused(String),
}

/// The wire form of [`Reply::Refused`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refusal {
    pub error: String,
}

/// A reply line that is not one of the protocol's.
#[derive(Debug, thiserror::Error)]
#[error("reply not understood: {source}")]
pub struct ReplyError {
    #[from]
    source: serde_json::Error,
}

impl<T: Serialize> Reply<T> {
    /// The reply as one JSON line, without the newline.
    pub fn to_line(&self) -> Result<String, serde_json::Error> {
        match self {
            Reply::Answer(answer) => serde_json::to_string(answer),
            Reply::Refused(error) => serde_json::to_string(&Refusal {
                error: error.clone(),
            }),
        }
    }
}

impl<T: DeserializeOwned> Reply<T> {
    /// Reads a reply line: a refusal (`{"error": "…"}` and nothing else), or else the
    /// answer `T`, whose every field must be present, known and of its type.
    pub fn from_line(line: &str) -> Result<Reply<T>, ReplyError> {
        if let Ok(refusal) = serde_json::from_str::<Refusal>(line) {
            return Ok(Reply::Refused(refusal.error));
        }
        Ok(Reply::Answer(serde_json::from_str(line)?))
    }

    /// The answer, or the refusal as an error.
    pub fn into_result(self) -> Result<T, String> {
        match self {
            Reply::Answer(answer) => Ok(answer),
            Reply::Refused(error) => Err(error),
        }
    }
}
