//! Real git over smart HTTP for the fake GitHub: requests under `/<owner>/<name>.git/`
//! go to `git http-backend` (CGI) after the token in Basic auth (`x-access-token:<token>`)
//! was checked against the repository and its `contents` permission (write for a push).
//! As GitHub does, a push that creates or changes a file under `.github/workflows/` is
//! refused unless the token also has the `workflows` permission (a pre-receive hook told
//! by the environment what the token may do). The same hook refuses, in GitHub's words,
//! an update of a protected branch (one named in [`PROTECTED_BRANCHES_FILE`] of the bare
//! repository) and a push carrying a file over the size limit in [`MAX_FILE_BYTES_FILE`].

use super::{Fake, Perm};
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use std::process::Stdio;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

fn unauthorized(why: &str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [("www-authenticate", "Basic realm=\"fake-github\"")],
        why.to_string(),
    )
        .into_response()
}

/// Tells the pre-receive hook whether the pushing token has `workflows: write`.
const WORKFLOWS_ENV: &str = "FAKE_GITHUB_WORKFLOWS";

/// A file of a bare repository listing, one a line, the branches the fake treats as
/// protected: an update is refused as GitHub does ("GH006: Protected branch update
/// failed").
pub const PROTECTED_BRANCHES_FILE: &str = "fake-protected-branches";

/// A file of a bare repository holding the largest file size, in bytes, the fake
/// accepts in a push; a bigger file is refused as GitHub does ("GH001: Large files
/// detected"), whose own limit is 100 MB.
pub const MAX_FILE_BYTES_FILE: &str = "fake-max-file-bytes";

/// The pre-receive hook refusing, in GitHub's words, pushes that touch
/// `.github/workflows/` without the `workflows` permission, updates of protected
/// branches, and files over the size limit.
const WORKFLOWS_GUARD: &str = r#"#!/bin/sh
zero=0000000000000000000000000000000000000000
while read -r old new ref; do
  [ "$new" = "$zero" ] && continue
  if [ -f fake-protected-branches ] && grep -qxF "${ref#refs/heads/}" fake-protected-branches; then
    echo "error: GH006: Protected branch update failed for $ref." >&2
    echo "error: Changes must be made through a pull request." >&2
    exit 1
  fi
  if [ "$old" = "$zero" ]; then range="$new --not --all"; else range="$old..$new"; fi
  if [ -f fake-max-file-bytes ]; then
    max=$(cat fake-max-file-bytes)
    big=$(git rev-list --objects $range | git cat-file --batch-check='%(objecttype) %(objectsize) %(rest)' \
      | awk -v m="$max" '$1 == "blob" && $2 > m { print $3; exit }')
    if [ -n "$big" ]; then
      echo "error: GH001: Large files detected. You may want to try Git Large File Storage - https://git-lfs.github.com." >&2
      echo "error: File $big exceeds GitHub's file size limit of $max bytes" >&2
      exit 1
    fi
  fi
  [ "$FAKE_GITHUB_WORKFLOWS" = write ] && continue
  file=$(git log --format= --name-only $range -- .github/workflows | head -n 1)
  if [ -n "$file" ]; then
    echo "refusing to allow a GitHub App to create or update workflow \`$file\` without \`workflows\` permission" >&2
    exit 1
  fi
done
exit 0
"#;

/// Installs [`WORKFLOWS_GUARD`] in the bare repository `bare`.
pub fn install_workflows_guard(bare: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let hook = bare.join("hooks").join("pre-receive");
    std::fs::create_dir_all(bare.join("hooks")).expect("hooks dir");
    std::fs::write(&hook, WORKFLOWS_GUARD).expect("pre-receive hook");
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).expect("chmod hook");
}

/// Serves one smart-HTTP request.
pub async fn serve(
    fake: Arc<Fake>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let Some(idx) = path.find(".git/") else {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    };
    let full = path[1..idx].to_string();
    let query = uri.query().unwrap_or("").to_string();
    let push = query.contains("service=git-receive-pack") || path.ends_with("/git-receive-pack");
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            s.split_once(':')
                .map(|(u, p)| (u.to_string(), p.to_string()))
        });
    let Some((user, token)) = token else {
        return unauthorized("authentication required");
    };
    if user != "x-access-token" {
        return unauthorized("user must be x-access-token");
    }
    let need = if push { Perm::Write } else { Perm::Read };
    if let Err((status, why)) = fake.check_token(&token, &full, "contents", need) {
        fake.model
            .lock()
            .git_refusals
            .push(format!("{full}: {why}"));
        return if status == 401 {
            unauthorized(&why)
        } else {
            (StatusCode::FORBIDDEN, why).into_response()
        };
    }
    let workflows = fake
        .check_token(&token, &full, "workflows", Perm::Write)
        .is_ok();
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env(WORKFLOWS_ENV, if workflows { "write" } else { "none" })
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", &fake.git_root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", &path)
        .env("REQUEST_METHOD", method.as_str())
        .env("QUERY_STRING", &query)
        .env("REMOTE_USER", "x-access-token")
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("CONTENT_LENGTH", body.len().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (header, var) in [
        ("content-type", "CONTENT_TYPE"),
        ("content-encoding", "HTTP_CONTENT_ENCODING"),
        ("git-protocol", "GIT_PROTOCOL"),
    ] {
        if let Some(v) = headers.get(header).and_then(|v| v.to_str().ok()) {
            cmd.env(var, v);
        }
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&body).await;
    }
    let out = match child.wait_with_output().await {
        Ok(o) => o,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    cgi_response(&out.stdout)
}

/// Turns CGI output (headers, blank line, body) into a response.
fn cgi_response(out: &[u8]) -> Response {
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4))
        .or_else(|| out.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2)));
    let Some((at, sep)) = split else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "bad CGI output").into_response();
    };
    let head = String::from_utf8_lossy(&out[..at]).to_string();
    let body = out[at + sep..].to_vec();
    let mut status = StatusCode::OK;
    let mut builder = Response::builder();
    for line in head.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("status") {
            if let Some(code) = v.split_whitespace().next().and_then(|c| c.parse().ok()) {
                status = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
            }
        } else {
            builder = builder.header(k.trim(), v);
        }
    }
    builder
        .status(status)
        .body(axum::body::Body::from(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
