//! The admin API: HTTP/JSON on `admin_listen` for operators and `chorusctl`.
//!
//! Every call needs `Authorization: Bearer <admin_token>`; without a configured token the API
//! stays off. Routes: `GET /status`, `GET /backends`, `POST /backends` (join),
//! `DELETE /backends/{name}[?now=true]` (remove), `GET /join`, `POST /verify`, `GET /metrics`
//! (Prometheus text, from the `metrics` facade through metrics-exporter-prometheus),
//! `GET /series[?since=UNIX]` (the dashboard's last ten minutes). The dashboard's own files
//! (`/`, `/dashboard.js`, `/dashboard.css`) are served without the token: they hold nothing,
//! and the page asks for the token before it calls the API.

mod page;
pub mod series;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::cluster::BackendState;
use crate::join::{self, JoinError, JoinRequest};
use crate::shared::Shared;

/// Installs the process-wide metrics recorder once; later calls get the same handle.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("seconds".into()), &buckets)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed; /metrics will be empty");
                    PrometheusBuilder::new().build_recorder().handle()
                }
            }
        })
        .clone()
}

struct Api {
    shared: Arc<Shared>,
    metrics: PrometheusHandle,
    started: Instant,
    series: Arc<series::Series>,
}

/// Serves the admin API on `listener` until Chorus stops.
/// Serves the admin API on `listener`, over HTTPS when `tls` is given.
pub async fn serve(shared: Arc<Shared>, listener: tokio::net::TcpListener, tls: Option<Arc<crate::tls::ServerTls>>) {
    let series = Arc::new(series::Series::default());
    tokio::spawn(series::run(series.clone(), metrics_handle(), shared.stop.clone()));
    let api = Arc::new(Api { shared: shared.clone(), metrics: metrics_handle(), started: Instant::now(), series });
    let app = Router::new()
        .route("/status", get(status))
        .route("/backends", get(backends).post(join_backend))
        .route("/backends/{name}", axum::routing::delete(remove))
        .route("/backends/{name}/catch-up", axum::routing::post(catch_up))
        .route("/join", get(join_progress))
        .route("/verify", axum::routing::post(verify))
        .route("/metrics", get(metrics))
        .route("/series", get(series_since))
        .route("/ha", get(ha_status))
        .route("/switchover", axum::routing::post(switchover))
        .layer(middleware::from_fn_with_state(api.clone(), auth))
        .route("/leader", get(leader_check))
        .merge(page::routes())
        .with_state(api);
    let stop = shared.stop.clone();
    let stopped = async move { stop.cancelled().await };
    let served = match tls {
        None => axum::serve(listener, app).with_graceful_shutdown(stopped).await,
        Some(tls) => match crate::tls::https::HttpsListener::new(listener, tls) {
            Ok(l) => axum::serve(l, app).with_graceful_shutdown(stopped).await,
            Err(e) => Err(e),
        },
    };
    if let Err(e) = served {
        tracing::error!(error = %e, "admin API stopped");
    }
}

/// The group on etcd as this member sees it.
async fn ha_status(State(api): State<Arc<Api>>) -> Response {
    match &api.shared.ha {
        Some(m) => Json(m.status()).into_response(),
        None => error(StatusCode::NOT_FOUND, "this Chorus runs alone (no [ha] section)"),
    }
}

/// A planned switchover: 202 once the named standby's port is open and this leader drains;
/// the handover follows when its sessions have ended (`GET /ha` on either member shows it).
async fn switchover(State(api): State<Arc<Api>>, body: Option<Json<crate::ha::SwitchoverRequest>>) -> Response {
    let (Some(m), Some(ha)) = (&api.shared.ha, &api.shared.cfg.ha) else {
        return error(StatusCode::NOT_FOUND, "this Chorus runs alone (no [ha] section)");
    };
    let to = body.and_then(|Json(b)| b.to);
    match m.switchover(to, ha.switchover_timeout).await {
        Ok(started) => (StatusCode::ACCEPTED, Json(started)).into_response(),
        Err(e @ crate::ha::SwitchoverError::Etcd(_)) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        Err(e) => error(StatusCode::CONFLICT, &e.to_string()),
    }
}

/// For a TCP load balancer in front of the members: 200 where clients are served now (the
/// leader, or an instance without `[ha]`), 503 elsewhere. No token: it tells only the role.
async fn leader_check(State(api): State<Arc<Api>>) -> Response {
    let role = api.shared.ha.as_ref().map(|m| m.role());
    match role {
        None | Some(crate::ha::Role::Leader) if !api.shared.deposed.is_cancelled() => {
            (StatusCode::OK, "leader\n").into_response()
        }
        Some(r) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("{}\n", serde_json::to_string(&r).unwrap_or_default().trim_matches('"')))
                .into_response()
        }
        None => (StatusCode::SERVICE_UNAVAILABLE, "deposed\n").into_response(),
    }
}

async fn auth(State(api): State<Arc<Api>>, req: Request, next: Next) -> Response {
    let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if crate::protocol::constant_time_eq(t.as_bytes(), api.shared.cfg.admin_token.as_bytes()) => next.run(req).await,
        Some(_) => error(StatusCode::UNAUTHORIZED, "wrong admin token"),
        None => error(StatusCode::UNAUTHORIZED, "missing Authorization: Bearer <admin_token>"),
    }
}

fn error(code: StatusCode, msg: &str) -> Response {
    (code, Json(json!({ "error": msg }))).into_response()
}

#[derive(Serialize)]
pub struct BackendInfo {
    pub name: String,
    pub address: String,
    pub state: BackendState,
    pub reason: String,
    pub version: String,
    /// Serves reads (false while a joined backend awaits its check).
    pub serves_reads: bool,
    pub inflight: u32,
    /// Diff log bytes still to replay (a joining backend).
    pub lag_bytes: u64,
    /// The newest serial of the update history it holds (in sync: the newest handed out;
    /// otherwise as of when it left, or as far as a catch-up got). None: not known.
    pub serial: Option<u64>,
    /// Units it lacks: the newest serial handed out minus its own.
    pub lag_units: Option<u64>,
    pub added: bool,
}

async fn backends(State(api): State<Arc<Api>>) -> Response {
    let progress = api.shared.joins.progress().filter(|_| api.shared.joins.running());
    let list: Vec<BackendInfo> = api
        .shared
        .cluster
        .backends()
        .iter()
        .map(|b| BackendInfo {
            name: b.name.clone(),
            address: b.addr.clone(),
            state: b.state(),
            reason: b.reason(),
            version: b.version(),
            serves_reads: b.serves_reads(),
            inflight: b.inflight.load(std::sync::atomic::Ordering::Relaxed),
            lag_bytes: match &progress {
                Some(p) if p.name == b.name || p.donor == b.name => p.replay_lag_bytes,
                _ => 0,
            },
            added: b.added,
            serial: serial_of(&api.shared, b),
            lag_units: serial_of(&api.shared, b).zip(api.shared.history.as_ref()).map(|(s, h)| h.last_serial().saturating_sub(s)),
        })
        .collect();
    Json(list).into_response()
}

fn serial_of(shared: &crate::shared::Shared, b: &crate::cluster::Backend) -> Option<u64> {
    let h = shared.history.as_ref()?;
    if b.is_in_sync() {
        return Some(h.last_serial());
    }
    Some(b.applied()).filter(|s| *s > 0 || h.last_serial() == 0)
}

/// Brings a `down` backend back from the update history; answers when it is in sync (or
/// why it cannot be: 409 with the reason, e.g. it needs a join).
async fn catch_up(State(api): State<Arc<Api>>, Path(name): Path<String>) -> Response {
    use crate::join::catch_up::CatchUpError as E;
    match crate::join::catch_up::catch_up(api.shared.clone(), &name).await {
        Ok(r) => Json(r).into_response(),
        Err(e @ E::NoSuchBackend(_)) => error(StatusCode::NOT_FOUND, &e.to_string()),
        Err(e @ E::Failed(..)) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        Err(e) => error(StatusCode::CONFLICT, &e.to_string()),
    }
}

async fn status(State(api): State<Arc<Api>>) -> Response {
    let c = &api.shared.cluster;
    let list = c.backends();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": api.started.elapsed().as_secs(),
        "listen": api.shared.cfg.listen,
        "sessions": api.shared.clients(),
        "backends": list.len(),
        "in_sync": c.in_sync_count(),
        "join": api.shared.joins.progress(),
        "join_running": api.shared.joins.running(),
        // With [ha]: this member's role (the dashboard then shows the group from GET /ha).
        "ha_role": api.shared.ha.as_ref().map(|m| m.role()),
    }))
    .into_response()
}

async fn join_backend(State(api): State<Arc<Api>>, Json(req): Json<JoinRequest>) -> Response {
    // Checked before anything else: the name becomes a directory in data_dir.
    if !crate::config::valid_backend_name(&req.name) {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("backend name {:?} must be 1 to 63 letters, digits, '-' or '_'", req.name),
        );
    }
    match join::start(api.shared.clone(), req).await {
        Ok(p) => (StatusCode::ACCEPTED, Json(p)).into_response(),
        Err(e @ JoinError::Refused(_)) => error(StatusCode::CONFLICT, &e.to_string()),
        Err(e @ JoinError::BadRequest(_)) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}

async fn join_progress(State(api): State<Arc<Api>>) -> Response {
    match api.shared.joins.progress() {
        Some(p) => Json(json!({ "running": api.shared.joins.running(), "progress": p })).into_response(),
        None => error(StatusCode::NOT_FOUND, "no join has run since Chorus started"),
    }
}

#[derive(Deserialize)]
struct RemoveQuery {
    #[serde(default)]
    now: bool,
}

async fn remove(State(api): State<Arc<Api>>, Path(name): Path<String>, Query(q): Query<RemoveQuery>) -> Response {
    let shared = &api.shared;
    let Some(b) = shared.cluster.backend(&name) else {
        return error(StatusCode::NOT_FOUND, &format!("no backend named {name:?}"));
    };
    if b.is_in_sync() && shared.cluster.in_sync_count() <= 1 {
        return error(
            StatusCode::CONFLICT,
            &format!("refused: {name} is the last in-sync backend; removing it would leave no backend to serve clients"),
        );
    }
    if shared.joins.running() {
        if let Some(p) = shared.joins.progress() {
            if p.name == name || p.donor == name {
                return error(StatusCode::CONFLICT, &format!("refused: {name} takes part in the join under way"));
            }
        }
    }
    // Gracefully: under a write pause, so no write transaction is cut in two; sessions drop
    // their connection to it before their next request.
    let pause = if q.now || !b.is_in_sync() { None } else { shared.order.pause(shared.cfg.lock_timeout).await };
    if !q.now && b.is_in_sync() && pause.is_none() {
        return error(StatusCode::CONFLICT, "writes did not pause within lock_timeout; try again or remove with now=true");
    }
    // Checked again under the pause: another removal may have run meanwhile.
    if b.is_in_sync() && shared.cluster.in_sync_count() <= 1 {
        return error(StatusCode::CONFLICT, &format!("refused: {name} is the last in-sync backend"));
    }
    let how = if q.now { "removed by operator (at once)" } else { "removed by operator" };
    let r = shared.cluster.set_state(&name, BackendState::Removed, how);
    drop(pause);
    match r {
        Ok(()) => Json(json!({ "removed": name })).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

#[derive(Deserialize, Default)]
pub(crate) struct VerifyBody {
    #[serde(default)]
    databases: Vec<String>,
}

async fn verify(State(api): State<Arc<Api>>, body: Option<Json<VerifyBody>>) -> Response {
    let dbs = body.map(|b| b.0.databases).unwrap_or_default();
    match crate::verify::run_live(&api.shared, &dbs).await {
        Ok(r) => {
            let unequal = r.unequal();
            Json(json!({
                "equal": unequal.is_empty(),
                "unequal": unequal.iter().map(|(d, t)| format!("{d}.{t}")).collect::<Vec<_>>(),
                "pause_ms": r.pause.as_secs_f64() * 1000.0,
                "report": r.render(),
            }))
            .into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

#[derive(Deserialize)]
struct SeriesQuery {
    #[serde(default)]
    since: u64,
}

async fn series_since(State(api): State<Arc<Api>>, Query(q): Query<SeriesQuery>) -> Response {
    Json(json!({ "interval_seconds": series::INTERVAL.as_secs(), "samples": api.series.since(q.since) })).into_response()
}

async fn metrics(State(api): State<Arc<Api>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], api.metrics.render()).into_response()
}
