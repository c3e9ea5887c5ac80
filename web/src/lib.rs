//! `ftvm-web`, the web console of ftvm: every managed pair on one page (hosts, witness,
//! each VM's level, state, roles, sync, A-links and NIC paths, the event log with its
//! remedies), live by server-sent events, and the operator's actions (protect, unprotect,
//! planned failover, migrate, host maintenance), each confirmed, CSRF-protected and
//! written to an audit log.
//!
//! It is a process of its own that only asks each host's `ftvmd`, as `ftvm` does: over
//! the control API on TCP (`coordinator::api`) or, on its own host, the control socket. It
//! holds no lock or file of ftvmd's, so a crash or a hang of the console changes nothing
//! in failover. Served over HTTPS only (`tls`), with a login (`auth`) and an audit log
//! (`audit`); the page's files are in the binary (`static/`).

pub mod audit;
pub mod auth;
pub mod config;
pub mod hosts;
pub mod routes;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum_server::tls_rustls::RustlsConfig;

use crate::config::Config;

/// Serves the console until SIGTERM or SIGINT.
pub fn run(config: Config) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|error| format!("cannot start the runtime: {error}"))?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> Result<(), String> {
    install_crypto_provider();
    let certificate = tls::load_or_generate(&config)?;
    let tls = RustlsConfig::from_pem(certificate.chain, certificate.key)
        .await
        .map_err(|error| {
            format!(
                "cannot use the certificate {}: {error}",
                certificate.source.display()
            )
        })?;
    let audit = audit::Audit::open(&config.audit_log)?;
    let hosts = hosts::Hosts::new(&config)?;
    hosts.start();
    let sessions = auth::Sessions::new(
        &config.users,
        Duration::from_secs(config.session_minutes * 60),
    );
    let app = Arc::new(routes::App::new(hosts, sessions, audit));
    let handle = axum_server::Handle::new();
    let stopping = handle.clone();
    tokio::spawn(async move {
        stop_signal().await;
        log::info!("stopping");
        stopping.graceful_shutdown(Some(Duration::from_secs(2)));
    });
    log::info!(
        "console on https://{} (certificate {}{})",
        config.listen,
        certificate.source.display(),
        if certificate.generated {
            ", generated now"
        } else {
            ""
        }
    );
    axum_server::bind_rustls(config.listen, tls)
        .handle(handle)
        .serve(routes::router(app).into_make_service_with_connect_info::<SocketAddr>())
        .await
        .map_err(|error| format!("cannot serve on {}: {error}", config.listen))
}

/// One crypto provider for the whole process: ring, which the A-links use too (rustls
/// marks it deprecated for lacking post-quantum key exchange; aws-lc-rs would need cmake and
/// a C toolchain of its own in every build).
#[allow(deprecated)]
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
}
