//! The HTTP side: the login page, the console page, its live view (server-sent events),
//! the actions, and the static files (in the binary). Every page but the login page and
//! the static files needs a session; every action also its CSRF token and a same-origin
//! request; every login, logout and action is written to the audit log.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use coordinator::daemon::control::{Reply, Request};
use serde::{Deserialize, Serialize};

use coordinator::daemon::events::utc_time;

use crate::audit::{Audit, Record};
use crate::auth::{same_secret, Session, Sessions, COOKIE};
use crate::hosts::{unix_ms, Hosts, ACTION_TIMEOUT};

const INDEX: &str = include_str!("../static/index.html");
const LOGIN: &str = include_str!("../static/login.html");
const APP_JS: &str = include_str!("../static/app.js");
const APP_CSS: &str = include_str!("../static/app.css");
/// Largest request body (a login form, an action).
const MAX_BODY_BYTES: usize = 16 * 1024;
/// Password checks under way at once (each takes about 19 MiB and a core for a moment).
const PASSWORD_CHECKS: usize = 2;

/// What every handler shares.
#[derive(Debug)]
pub struct App {
    pub hosts: Arc<Hosts>,
    pub sessions: Sessions,
    pub audit: Audit,
    pub password_checks: tokio::sync::Semaphore,
}

impl App {
    pub fn new(hosts: Arc<Hosts>, sessions: Sessions, audit: Audit) -> App {
        App {
            hosts,
            sessions,
            audit,
            password_checks: tokio::sync::Semaphore::new(PASSWORD_CHECKS),
        }
    }

    fn record(&self, user: &str, client: SocketAddr, action: &str, target: &str, result: &str) {
        let now = unix_ms();
        self.audit.write(&Record {
            time: utc_time(now),
            unix_ms: now,
            user,
            client: client.ip(),
            action,
            target,
            result,
        });
        log::info!("{user} from {}: {action} {target}: {result}", client.ip());
    }
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/api/state", get(state))
        .route("/api/stream", get(stream))
        .route("/api/action", post(action))
        .route(
            "/static/app.js",
            get(|| async { asset(APP_JS, "text/javascript") }),
        )
        .route(
            "/static/app.css",
            get(|| async { asset(APP_CSS, "text/css") }),
        )
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(app)
}

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CACHE_CONTROL, "no-store"),
        (header::STRICT_TRANSPORT_SECURITY, "max-age=31536000"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

fn asset(text: &'static str, content_type: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], text).into_response()
}

/// The session token of the request's cookie.
fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
}

fn session(app: &App, headers: &HeaderMap) -> Option<Session> {
    cookie_token(headers).and_then(|token| app.sessions.get(&token))
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(Answer {
            ok: false,
            message: "not signed in: sign in at /login".into(),
        }),
    )
        .into_response()
}

/// Text for an HTML page.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

async fn index(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    match session(&app, &headers) {
        Some(session) => Html(
            INDEX
                .replace("{{CSRF}}", &session.csrf)
                .replace("{{USER}}", &escape(&session.user)),
        )
        .into_response(),
        None => Redirect::to("/login").into_response(),
    }
}

fn login_form(error: &str) -> String {
    LOGIN.replace("{{ERROR}}", &escape(error))
}

async fn login_page() -> Html<String> {
    Html(login_form(""))
}

#[derive(Debug, Deserialize)]
struct Login {
    user: String,
    password: String,
}

async fn login(
    State(app): State<Arc<App>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    Form(login): Form<Login>,
) -> Response {
    let user: String = login.user.chars().take(64).collect();
    let Ok(_permit) = app.password_checks.acquire().await else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let checking = Arc::clone(&app);
    let (name, password) = (user.clone(), login.password);
    let good =
        tokio::task::spawn_blocking(move || checking.sessions.check_password(&name, &password))
            .await
            .unwrap_or(false);
    if !good {
        app.record(
            &user,
            client,
            "login",
            "-",
            "refused: wrong user or password",
        );
        // A guesser waits a second per try.
        tokio::time::sleep(Duration::from_secs(1)).await;
        return (
            StatusCode::UNAUTHORIZED,
            Html(login_form("Wrong user or password.")),
        )
            .into_response();
    }
    let token = match app.sessions.open(&user) {
        Ok(token) => token,
        Err(error) => {
            app.record(&user, client, "login", "-", &format!("failed: {error}"));
            return (StatusCode::INTERNAL_SERVER_ERROR, error).into_response();
        }
    };
    app.record(&user, client, "login", "-", "ok");
    let cookie = format!(
        "{COOKIE}={token}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={}",
        app.sessions.lifetime().as_secs()
    );
    let mut response = Redirect::to("/").into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

#[derive(Debug, Deserialize)]
struct Logout {
    csrf: String,
}

async fn logout(
    State(app): State<Arc<App>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(logout): Form<Logout>,
) -> Response {
    let Some(token) = cookie_token(&headers) else {
        return Redirect::to("/login").into_response();
    };
    match app.sessions.get(&token) {
        Some(session) if same_secret(&session.csrf, &logout.csrf) => {
            app.sessions.close(&token);
            app.record(&session.user, client, "logout", "-", "ok");
            let mut response = Redirect::to("/login").into_response();
            response.headers_mut().insert(
                header::SET_COOKIE,
                HeaderValue::from_static(
                    "ftvm_session=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0",
                ),
            );
            response
        }
        Some(session) => {
            app.record(
                &session.user,
                client,
                "logout",
                "-",
                "refused: bad CSRF token",
            );
            (StatusCode::FORBIDDEN, "bad CSRF token").into_response()
        }
        None => Redirect::to("/login").into_response(),
    }
}

async fn state(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if session(&app, &headers).is_none() {
        return unauthorized();
    }
    (
        [(header::CONTENT_TYPE, "application/json")],
        app.hosts.view().as_str().to_owned(),
    )
        .into_response()
}

async fn stream(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let Some(token) = cookie_token(&headers).filter(|token| app.sessions.get(token).is_some())
    else {
        return unauthorized();
    };
    let receiver = app.hosts.subscribe();
    // Sends the view now and at every change, until the session ends.
    let events = futures_util::stream::unfold(
        (receiver, true, app, token),
        |(mut receiver, first, app, token)| async move {
            if !first && receiver.changed().await.is_err() {
                return None;
            }
            if app.sessions.get(&token).is_some() {
                let text = receiver.borrow_and_update().clone();
                let event = Event::default().event("state").data(text.as_str());
                Some((
                    Ok::<Event, Infallible>(event),
                    (receiver, false, app, token),
                ))
            } else {
                None
            }
        },
    );
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// An action the page asks for.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Action {
    action: String,
    pair: String,
    host: String,
    #[serde(default)]
    vm: Option<String>,
    #[serde(default)]
    level: Option<u8>,
}

#[derive(Debug, Serialize)]
struct Answer {
    ok: bool,
    message: String,
}

/// Whether the request comes from this console's own page: an `Origin` (browsers send it
/// with every POST from a script) naming the host the request was sent to (its `Host`
/// header, or in HTTP/2 its `:authority`).
fn same_origin(headers: &HeaderMap, uri: &Uri) -> bool {
    let host = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .or_else(|| uri.authority().map(|authority| authority.as_str()));
    match headers.get(header::ORIGIN).map(|value| value.to_str()) {
        None => true,
        Some(Ok(origin)) => host.is_some_and(|host| origin == format!("https://{host}")),
        Some(Err(_)) => false,
    }
}

async fn action(
    State(app): State<Arc<App>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    uri: Uri,
    headers: HeaderMap,
    Json(action): Json<Action>,
) -> Response {
    let Some(session) = session(&app, &headers) else {
        app.record(
            "-",
            client,
            &action.action,
            &action.pair,
            "refused: not signed in",
        );
        return unauthorized();
    };
    let target = match &action.vm {
        Some(vm) => format!("{}/{}/{vm}", action.pair, action.host),
        None => format!("{}/{}", action.pair, action.host),
    };
    let token = headers
        .get("x-csrf-token")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    if !same_secret(token, &session.csrf) || !same_origin(&headers, &uri) {
        app.record(
            &session.user,
            client,
            &action.action,
            &target,
            "refused: bad CSRF token or origin",
        );
        return answer(
            StatusCode::FORBIDDEN,
            false,
            "refused: bad CSRF token or origin".into(),
        );
    }
    let (status, ok, message) = carry_out(&app, &action).await;
    let result = if ok {
        format!("ok: {message}")
    } else {
        format!("failed: {message}")
    };
    app.record(&session.user, client, &action.action, &target, &result);
    answer(status, ok, message)
}

fn answer(status: StatusCode, ok: bool, message: String) -> Response {
    (status, Json(Answer { ok, message })).into_response()
}

/// Sends the action's request to its host; (HTTP status, done, what ftvmd said).
async fn carry_out(app: &App, action: &Action) -> (StatusCode, bool, String) {
    let Some(host) = app.hosts.find(&action.pair, &action.host) else {
        return (
            StatusCode::BAD_REQUEST,
            false,
            format!("no host {:?} in pair {:?}", action.host, action.pair),
        );
    };
    let vm = || action.vm.clone().ok_or_else(|| "needs a vm".to_owned());
    let request = match action.action.as_str() {
        "protect" => vm().and_then(|vm| {
            let peer = app
                .hosts
                .links
                .iter()
                .find(|other| other.pair == action.pair && other.name != action.host)
                .map(|other| other.name.clone())
                .ok_or_else(|| "the pair has no other host".to_owned())?;
            let level = action.level.ok_or_else(|| "needs a level".to_owned())?;
            Ok(Request::Protect { vm, level, peer })
        }),
        "unprotect" => vm().map(|vm| Request::Unprotect { vm }),
        "failover" => vm().map(|vm| Request::Failover { vm }),
        "migrate" => vm().map(|vm| Request::Migrate {
            vm,
            cancel: false,
            timeout_s: 300,
        }),
        "maintenance-on" => Ok(Request::HostDisable { restart: false }),
        "maintenance-off" => Ok(Request::HostEnable),
        other => Err(format!("unknown action {other:?}")),
    };
    let request = match request {
        Ok(request) => request,
        Err(error) => return (StatusCode::BAD_REQUEST, false, error),
    };
    let reply = tokio::task::spawn_blocking(move || host.ask(&request, ACTION_TIMEOUT)).await;
    match reply {
        Ok(Ok(Reply::Done(done))) => (StatusCode::OK, true, done),
        Ok(Ok(Reply::Error(error))) => (StatusCode::CONFLICT, false, error),
        Ok(Ok(other)) => (
            StatusCode::BAD_GATEWAY,
            false,
            format!("unexpected answer: {other:?}"),
        ),
        Ok(Err(error)) => (StatusCode::BAD_GATEWAY, false, error),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, false, error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(header::HeaderName, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(name.clone(), HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn only_the_consoles_own_origin_may_act() {
        let http1 = Uri::from_static("/api/action");
        let http2 = Uri::from_static("https://10.0.0.4:8443/api/action");
        let own = (header::ORIGIN, "https://10.0.0.4:8443");
        let host = (header::HOST, "10.0.0.4:8443");
        assert!(same_origin(&headers(&[own.clone(), host.clone()]), &http1));
        assert!(same_origin(&headers(std::slice::from_ref(&own)), &http2));
        assert!(
            same_origin(&headers(std::slice::from_ref(&host)), &http1),
            "no Origin: not a browser's cross-site POST"
        );
        let evil = (header::ORIGIN, "https://evil.example");
        assert!(!same_origin(&headers(&[evil.clone(), host]), &http1));
        assert!(!same_origin(&headers(&[evil]), &http2));
        assert!(
            !same_origin(&headers(&[own]), &http1),
            "an Origin with nothing to match"
        );
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let map = headers(&[(header::COOKIE, "a=1; ftvm_session=abc; b=2")]);
        assert_eq!(cookie_token(&map).as_deref(), Some("abc"));
        assert_eq!(
            cookie_token(&headers(&[(header::COOKIE, "ftvm_sessionx=1")])),
            None
        );
    }

    #[test]
    fn text_for_a_page_is_escaped() {
        assert_eq!(escape("<b a='1'>&\""), "&lt;b a=&#39;1&#39;&gt;&amp;&quot;");
    }
}
