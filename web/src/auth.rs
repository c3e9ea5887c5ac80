//! Users, passwords and sessions. Passwords are checked against argon2 hashes from the
//! configuration (an unknown user costs the same as a wrong password); a session is a
//! random 256-bit token in a cookie (`HttpOnly; Secure; SameSite=Strict`) with its own CSRF
//! token, which every action must carry in `X-CSRF-Token`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use crate::config::User;

/// The session cookie's name.
pub const COOKIE: &str = "ftvm_session";
/// Sessions held at once; the oldest goes when a login would pass this.
const MAX_SESSIONS: usize = 1024;
/// The hash an unknown user's password is checked against, so that the answer takes as
/// long as for a known one.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$\
    Q0tG3tXWQz0bqpn3mAqBPZO9mD3RMw8b/qhsFLW6Ids";

/// One login.
#[derive(Clone, Debug)]
pub struct Session {
    pub user: String,
    pub csrf: String,
    expires: Instant,
}

#[derive(Debug)]
pub struct Sessions {
    users: HashMap<String, String>,
    lifetime: Duration,
    map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    pub fn new(users: &[User], lifetime: Duration) -> Sessions {
        Sessions {
            users: users
                .iter()
                .map(|user| (user.name.clone(), user.password_hash.clone()))
                .collect(),
            lifetime,
            map: Mutex::new(HashMap::new()),
        }
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Whether `password` is `user`'s (slow on purpose: call from a blocking thread).
    pub fn check_password(&self, user: &str, password: &str) -> bool {
        let known = self.users.get(user);
        let hash = known.map_or(DUMMY_HASH, String::as_str);
        let matches = PasswordHash::new(hash).is_ok_and(|hash| {
            Argon2::default()
                .verify_password(password.as_bytes(), &hash)
                .is_ok()
        });
        matches && known.is_some()
    }

    /// Starts a session for `user`: its cookie token.
    pub fn open(&self, user: &str) -> Result<String, String> {
        let token = random_token()?;
        let session = Session {
            user: user.to_owned(),
            csrf: random_token()?,
            expires: Instant::now() + self.lifetime,
        };
        let mut map = self.lock();
        let now = Instant::now();
        map.retain(|_, session| session.expires > now);
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, session)| session.expires)
                .map(|(token, _)| token.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(token.clone(), session);
        Ok(token)
    }

    /// The live session of `token`.
    pub fn get(&self, token: &str) -> Option<Session> {
        let mut map = self.lock();
        match map.get(token) {
            Some(session) if session.expires > Instant::now() => Some(session.clone()),
            Some(_) => {
                map.remove(token);
                None
            }
            None => None,
        }
    }

    pub fn close(&self, token: &str) -> Option<Session> {
        self.lock().remove(token)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// 32 random bytes as hex.
fn random_token() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|error| format!("cannot draw random bytes: {error}"))?;
    Ok(bytes.iter().map(|byte| format!("{byte:02x}")).collect())
}

/// An argon2id hash of `password` for the configuration (`ftvm-web hash-password`).
pub fn hash_password(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|error| format!("cannot draw random bytes: {error}"))?;
    let salt = SaltString::encode_b64(&salt).map_err(|error| error.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|error| error.to_string())
}

/// Two secrets compared in a time that does not depend on where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |difference, (x, y)| difference | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_opens_a_session_and_nothing_else_does() {
        let hash = hash_password("correct horse").expect("hash");
        let sessions = Sessions::new(
            &[User {
                name: "admin".into(),
                password_hash: hash,
            }],
            Duration::from_millis(300),
        );
        assert!(sessions.check_password("admin", "correct horse"));
        assert!(!sessions.check_password("admin", "correct hors"));
        assert!(!sessions.check_password("root", "correct horse"));
        let token = sessions.open("admin").expect("open");
        let session = sessions.get(&token).expect("live");
        assert_eq!(session.user, "admin");
        assert_eq!(session.csrf.len(), 64);
        assert!(sessions.get("not-a-token").is_none());
        std::thread::sleep(Duration::from_millis(400));
        assert!(
            sessions.get(&token).is_none(),
            "an expired session still works"
        );
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
    }
}
