//! Dashboard sessions. Logging in with the API token creates a random session id, kept
//! here with its expiry and a CSRF token, and given to the browser in an `HttpOnly`,
//! `SameSite=Strict` cookie; the token itself never leaves the login request. The CSRF
//! token goes to the page in a second, script-readable cookie and must come back in the
//! `X-AO-CSRF` header of every state-changing call the page makes.
//!
//! Sessions live in this process's memory: they end at logout, at expiry, or when the
//! coordinator restarts (the page then asks to log in again).

use axum::http::{header, HeaderMap};
use parking_lot::Mutex;
use rand::RngCore;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// The cookie holding the session id (`HttpOnly`).
pub const SESSION_COOKIE: &str = "ao_session";
/// The cookie holding the session's CSRF token, which the page's script reads.
pub const CSRF_COOKIE: &str = "ao_csrf";
/// The header in which the page sends the CSRF token back.
pub const CSRF_HEADER: &str = "x-ao-csrf";
/// How long a session lasts after login.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Most sessions kept at once; the oldest are dropped beyond it.
const MAX_SESSIONS: usize = 10_000;
/// Random bytes in a session id and in a CSRF token.
const SECRET_BYTES: usize = 32;

struct Session {
    csrf: String,
    expires: Instant,
}

/// The live sessions of this process.
pub struct Sessions {
    ttl: Duration,
    inner: Mutex<HashMap<String, Session>>,
}

/// A new session: the cookie values to set.
pub struct NewSession {
    pub id: String,
    pub csrf: String,
}

fn random_hex() -> String {
    let mut bytes = [0u8; SECRET_BYTES];
    // The thread-local generator is a CSPRNG seeded from the operating system.
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

impl Default for Sessions {
    fn default() -> Self {
        Self::new(SESSION_TTL)
    }
}

impl Sessions {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            inner: Mutex::new(HashMap::new()),
        }
    }

    /// Starts a session.
    pub fn create(&self) -> NewSession {
        let now = Instant::now();
        let session = NewSession {
            id: random_hex(),
            csrf: random_hex(),
        };
        let mut map = self.inner.lock();
        map.retain(|_, s| s.expires > now);
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(
            session.id.clone(),
            Session {
                csrf: session.csrf.clone(),
                expires: now + self.ttl,
            },
        );
        session
    }

    /// The CSRF token of a live session, or `None` when the id is unknown or expired.
    pub fn csrf_of(&self, id: &str) -> Option<String> {
        let mut map = self.inner.lock();
        match map.get(id) {
            Some(s) if s.expires > Instant::now() => Some(s.csrf.clone()),
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    /// Ends a session.
    pub fn remove(&self, id: &str) {
        self.inner.lock().remove(id);
    }

    /// Whether the request carries a live session cookie and, for a state-changing
    /// request, the session's CSRF token in [`CSRF_HEADER`].
    pub fn check(&self, headers: &HeaderMap, changes_state: bool) -> SessionCheck {
        let Some(id) = cookie(headers, SESSION_COOKIE) else {
            return SessionCheck::NoCookie;
        };
        let Some(csrf) = self.csrf_of(id) else {
            return SessionCheck::Expired;
        };
        if changes_state {
            let presented = headers
                .get(CSRF_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let ok: bool = presented.as_bytes().ct_eq(csrf.as_bytes()).into();
            if !ok {
                return SessionCheck::CsrfMismatch;
            }
        }
        SessionCheck::Valid
    }
}

/// What [`Sessions::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionCheck {
    NoCookie,
    Expired,
    CsrfMismatch,
    Valid,
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// `Set-Cookie` values that start a session. `secure` adds `Secure` (behind HTTPS).
pub fn set_cookies(session: &NewSession, ttl: Duration, secure: bool) -> [String; 2] {
    let secure = if secure { "; Secure" } else { "" };
    let age = ttl.as_secs();
    [
        format!(
            "{SESSION_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={age}{secure}",
            session.id
        ),
        format!(
            "{CSRF_COOKIE}={}; Path=/; SameSite=Strict; Max-Age={age}{secure}",
            session.csrf
        ),
    ]
}

/// `Set-Cookie` values that end a session in the browser.
pub fn clear_cookies() -> [String; 2] {
    [
        format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
        format!("{CSRF_COOKIE}=; Path=/; SameSite=Strict; Max-Age=0"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(cookie: &str, csrf: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_str(cookie).unwrap());
        if let Some(c) = csrf {
            h.insert(CSRF_HEADER, HeaderValue::from_str(c).unwrap());
        }
        h
    }

    #[test]
    fn a_session_is_random_checked_and_ends_at_logout() {
        let sessions = Sessions::default();
        let a = sessions.create();
        let b = sessions.create();
        assert_ne!(a.id, b.id);
        assert_eq!(a.id.len(), 64);
        let cookie = format!("other=1; {SESSION_COOKIE}={}", a.id);
        assert_eq!(
            sessions.check(&headers(&cookie, None), false),
            SessionCheck::Valid
        );
        assert_eq!(
            sessions.check(&headers(&cookie, None), true),
            SessionCheck::CsrfMismatch
        );
        assert_eq!(
            sessions.check(&headers(&cookie, Some(&b.csrf)), true),
            SessionCheck::CsrfMismatch
        );
        assert_eq!(
            sessions.check(&headers(&cookie, Some(&a.csrf)), true),
            SessionCheck::Valid
        );
        sessions.remove(&a.id);
        assert_eq!(
            sessions.check(&headers(&cookie, Some(&a.csrf)), false),
            SessionCheck::Expired
        );
        assert_eq!(
            sessions.check(&HeaderMap::new(), false),
            SessionCheck::NoCookie
        );
    }

    #[test]
    fn sessions_expire() {
        let sessions = Sessions::new(Duration::ZERO);
        let a = sessions.create();
        assert!(sessions.csrf_of(&a.id).is_none());
    }

    #[test]
    fn cookies_are_http_only_and_strict() {
        let s = NewSession {
            id: "abc".into(),
            csrf: "def".into(),
        };
        let [session, csrf] = set_cookies(&s, SESSION_TTL, true);
        assert!(session.starts_with("ao_session=abc;"));
        for flag in ["HttpOnly", "SameSite=Strict", "Path=/", "Secure"] {
            assert!(session.contains(flag), "{session}");
        }
        assert!(!csrf.contains("HttpOnly"), "the page reads it: {csrf}");
        assert!(csrf.contains("SameSite=Strict"));
    }
}
