//! The web dashboard at `/`: a login page that takes the API token and starts a session
//! (`session`), the task list and a page per task. Pages are fixed HTML shells; the
//! script (`/assets/app.js`) fetches the REST API with the session cookie and builds the
//! DOM with `textContent` only, so nothing a user or an agent wrote is ever parsed as
//! HTML. No inline script or style: the Content-Security-Policy allows only this origin's
//! assets. Everything is embedded in the binary.
//!
//! The one exception to `textContent`: a step's diff (the runner's `diff` event, git's
//! unified diff of the step's change) is rendered by diff2html (`assets/vendor/`, MIT,
//! version in `assets/vendor/README.md`), which escapes every line of the diff into its
//! HTML. That HTML is parsed in an inert document and kept to an allow-list of elements
//! and attributes before it joins the page; the policy above would still forbid any
//! script or inline handler.

pub mod session;
pub mod updates;

use super::auth::{expected_token, token_matches, Auth};
use super::tasks::parse_id;
use axum::extract::rejection::FormRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;
use session::{clear_cookies, set_cookies, SessionCheck, SESSION_TTL};

const INDEX_HTML: &str = include_str!("assets/index.html");
const TASK_HTML: &str = include_str!("assets/task.html");
const LOGIN_HTML: &str = include_str!("assets/login.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");
const DIFF2HTML_JS: &str = include_str!("assets/vendor/diff2html.min.js");
const DIFF2HTML_CSS: &str = include_str!("assets/vendor/diff2html.min.css");

/// Only this origin's script, style and connections; no framing, no plugins, no `<base>`.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; \
    base-uri 'none'";
/// Largest login form.
const MAX_FORM_BYTES: usize = 16 * 1024;

/// The dashboard's routes (pages, login, logout, assets).
pub fn router<S>(auth: Auth) -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/tasks/{id}", get(task_page))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/assets/app.js", get(app_js))
        .route("/assets/app.css", get(app_css))
        .route(
            "/assets/vendor/diff2html.min.js",
            get(|| async { asset("text/javascript; charset=utf-8", DIFF2HTML_JS) }),
        )
        .route(
            "/assets/vendor/diff2html.min.css",
            get(|| async { asset("text/css; charset=utf-8", DIFF2HTML_CSS) }),
        )
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .layer(DefaultBodyLimit::max(MAX_FORM_BYTES))
        .with_state(auth)
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The GitHub web address that goes with an API base URL (`https://api.github.com` →
/// `https://github.com`, GitHub Enterprise `https://host/api/v3` → `https://host`).
pub fn github_web_url(api_url: &str) -> String {
    let api = api_url.trim_end_matches('/');
    if api == "https://api.github.com" {
        return "https://github.com".into();
    }
    api.strip_suffix("/api/v3").unwrap_or(api).to_string()
}

fn security_headers(headers: &mut HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

fn html(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    security_headers(h);
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    security_headers(h);
    response
}

fn shell(auth: &Auth, template: &str) -> String {
    let web = github_web_url(&auth.cx.settings.github.api_url);
    template.replace("{{github_web}}", &escape_html(&web))
}

fn logged_in(auth: &Auth, headers: &HeaderMap) -> bool {
    auth.sessions.check(headers, false) == SessionCheck::Valid
}

fn login_form(status: StatusCode, message: &str) -> Response {
    let hidden = if message.is_empty() { " hidden" } else { "" };
    let body = LOGIN_HTML
        .replace("{{message_hidden}}", hidden)
        .replace("{{message}}", &escape_html(message));
    html(status, body)
}

/// `GET /`: the task list, or the login page for a visitor without a session.
async fn index(State(auth): State<Auth>, headers: HeaderMap) -> Response {
    if !logged_in(&auth, &headers) {
        return Redirect::to("/login").into_response();
    }
    html(StatusCode::OK, shell(&auth, INDEX_HTML))
}

/// `GET /tasks/{id}`: one task, its subtasks and its live output.
async fn task_page(
    State(auth): State<Auth>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !logged_in(&auth, &headers) {
        return Redirect::to("/login").into_response();
    }
    if parse_id(&id).is_err() {
        return html(
            StatusCode::NOT_FOUND,
            "<!doctype html><title>not found</title><p>No such task.</p>".into(),
        );
    }
    html(StatusCode::OK, shell(&auth, TASK_HTML))
}

async fn login_page(State(auth): State<Auth>, headers: HeaderMap) -> Response {
    if logged_in(&auth, &headers) {
        return Redirect::to("/").into_response();
    }
    login_form(StatusCode::OK, "")
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

/// `POST /login`: checks the API token in constant time and starts a session.
async fn login(
    State(auth): State<Auth>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return login_form(StatusCode::BAD_REQUEST, "Send the form with a token field.");
    };
    let expected = match expected_token(&auth.cx).await {
        Ok(t) => t,
        Err(e) => return login_form(e.status, &e.message),
    };
    if !token_matches(form.token.trim(), &expected) {
        tracing::warn!("dashboard login with a wrong token");
        return login_form(StatusCode::UNAUTHORIZED, "That is not the API token.");
    }
    let secure = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    let session = auth.sessions.create();
    tracing::info!("dashboard session started");
    let mut response = Redirect::to("/").into_response();
    for cookie in set_cookies(&session, SESSION_TTL, secure) {
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            response.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    response
}

/// `POST /logout`: ends the session (the page sends its CSRF token, like every change).
async fn logout(State(auth): State<Auth>, headers: HeaderMap) -> Response {
    let mut response = match auth.sessions.check(&headers, true) {
        SessionCheck::CsrfMismatch => {
            return super::error::ApiError::new(
                StatusCode::FORBIDDEN,
                "csrf",
                "logout needs the session's CSRF token in the X-AO-CSRF header",
            )
            .into_response()
        }
        SessionCheck::Valid => {
            if let Some(id) = session::cookie(&headers, session::SESSION_COOKIE) {
                auth.sessions.remove(id);
            }
            StatusCode::NO_CONTENT.into_response()
        }
        SessionCheck::Expired | SessionCheck::NoCookie => StatusCode::NO_CONTENT.into_response(),
    };
    for cookie in clear_cookies() {
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            response.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    response
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape_html(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn github_web_address_follows_the_api_url() {
        assert_eq!(
            github_web_url("https://api.github.com/"),
            "https://github.com"
        );
        assert_eq!(
            github_web_url("https://ghe.example.com/api/v3"),
            "https://ghe.example.com"
        );
        assert_eq!(
            github_web_url("http://127.0.0.1:9000"),
            "http://127.0.0.1:9000"
        );
    }

    #[test]
    fn assets_have_no_inline_script_or_handlers() {
        for page in [INDEX_HTML, TASK_HTML, LOGIN_HTML] {
            let lower = page.to_lowercase();
            assert!(!lower.contains("<script>"), "inline script");
            assert!(!lower.contains(" onclick="), "inline handler");
            assert!(!lower.contains("style="), "inline style");
        }
        assert!(
            !APP_JS.contains("innerHTML"),
            "the script builds DOM with textContent"
        );
        assert!(!APP_JS.contains("insertAdjacentHTML"));
        // The one HTML parser: diff2html's output, into an inert document, then kept
        // to an allow-list (`inertNodes`).
        assert_eq!(APP_JS.matches("DOMParser").count(), 1);
        assert!(!APP_JS.contains("document.write"));
        assert!(!APP_JS.contains("outerHTML"));
    }
}
