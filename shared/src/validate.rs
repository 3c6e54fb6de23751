//! Validation of user-supplied repository locations and branch names. Both end up as
//! arguments to git, so anything that could be read as an option or a transport helper
//! is refused here, at the edge.

/// Why a value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// Longest accepted repository location.
pub const MAX_REPOSITORY_LEN: usize = 2048;
/// Longest accepted branch name.
pub const MAX_BRANCH_LEN: usize = 200;

/// Accepts `https://`, `http://`, `ssh://`, `git://`, `file://` URLs, scp-like
/// `user@host:path`, and absolute local paths.
pub fn repository(value: &str) -> Result<(), Invalid> {
    let v = value;
    if v.trim().is_empty() {
        return Err(Invalid("repository must not be empty".into()));
    }
    if v.len() > MAX_REPOSITORY_LEN {
        return Err(Invalid(format!(
            "repository is longer than {MAX_REPOSITORY_LEN} characters"
        )));
    }
    if v.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(Invalid(
            "repository must not contain whitespace or control characters".into(),
        ));
    }
    if v.starts_with('-') {
        return Err(Invalid("repository must not start with '-'".into()));
    }
    const SCHEMES: [&str; 5] = ["https://", "http://", "ssh://", "git://", "file://"];
    if let Some(rest) = SCHEMES.iter().find_map(|s| v.strip_prefix(s)) {
        if rest.is_empty() || rest == "/" {
            return Err(Invalid("repository URL has no host or path".into()));
        }
        return Ok(());
    }
    if v.contains("::") {
        return Err(Invalid(
            "repository uses a git remote helper (`transport::address`), which is not allowed"
                .into(),
        ));
    }
    if v.starts_with('/') {
        return Ok(());
    }
    if let Some((user_host, path)) = v.split_once(':') {
        if user_host.contains('@') && !path.is_empty() && !user_host.contains('/') {
            return Ok(());
        }
    }
    Err(Invalid(format!(
        "repository {v:?} is not a git URL (https://, http://, ssh://, git://, file://, \
         user@host:path) or an absolute path"
    )))
}

/// The rules of `git check-ref-format --branch`, a little stricter.
pub fn branch(name: &str) -> Result<(), Invalid> {
    let bad = |why: &str| Err(Invalid(format!("branch {name:?} {why}")));
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > MAX_BRANCH_LEN {
        return bad("is too long");
    }
    if name.starts_with('-') || name.starts_with('/') || name.ends_with('/') {
        return bad("must not start with '-' or '/' or end with '/'");
    }
    if name.ends_with(".lock") || name.ends_with('.') {
        return bad("must not end with '.lock' or '.'");
    }
    if name.contains("..") || name.contains("//") || name.contains("@{") || name == "@" {
        return bad("must not contain '..', '//' or '@{'");
    }
    if name.split('/').any(|part| part.starts_with('.')) {
        return bad("must not have a component starting with '.'");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
    {
        return bad("may only contain letters, digits, '-', '_', '.' and '/'");
    }
    Ok(())
}

/// A branch-safe slug of a title: lowercase words joined by '-', at most 40 characters.
pub fn slug(title: &str) -> String {
    let mut out = String::new();
    for c in title.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
        if out.len() >= 40 {
            break;
        }
    }
    out.trim_end_matches('-').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_common_repository_forms() {
        for ok in [
            "https://github.com/o/r.git",
            "http://127.0.0.1:8080/o/r.git",
            "file:///tmp/x.git",
            "/srv/git/r.git",
            "git@github.com:o/r.git",
            "ssh://git@host/o/r",
        ] {
            assert!(repository(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_option_and_helper_injection() {
        for bad in [
            "",
            "  ",
            "-uhttps://x",
            "--upload-pack=touch /tmp/pwned",
            "ext::sh -c touch% /tmp/pwned",
            "fd::17",
            "relative/path",
            "https://",
            "https://host/a b",
            "c:\\windows",
        ] {
            assert!(repository(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn branch_rules() {
        for ok in ["agent/12-fix-bug", "main", "feature/x.y", "a_b"] {
            assert!(branch(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-x",
            "a..b",
            "a/",
            "/a",
            "x.lock",
            "a b",
            "a~1",
            "a/.hidden",
            "@",
            "a@{1}",
        ] {
            assert!(branch(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn slugs_are_branch_safe() {
        assert_eq!(slug("Fix the Bug!! in parser"), "fix-the-bug-in-parser");
        assert_eq!(slug(&"ü".repeat(90)), "");
        assert_eq!(slug("***"), "");
        assert!(slug(&"abc ".repeat(40)).len() <= 41);
    }
}
