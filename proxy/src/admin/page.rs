//! The dashboard: a static page, its script and its style, embedded in the binary.
//!
//! Why embedded: no build step outside cargo and nothing to install next to the binary. The
//! files hold no data; the page asks for the admin token, keeps it in the browser's session
//! storage (never in a URL) and reads everything through the same JSON API as `chorusctl`.

use std::sync::Arc;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::Api;

const INDEX: &str = include_str!("page/index.html");
const SCRIPT: &str = include_str!("page/dashboard.js");
const STYLE: &str = include_str!("page/dashboard.css");

/// Only the page's own files, no inline script or style, no frames, calls to this origin.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; \
                   frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

fn file(kind: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

pub(super) fn routes() -> Router<Arc<Api>> {
    Router::new()
        .route("/", get(|| async { file("text/html; charset=utf-8", INDEX) }))
        .route("/dashboard.js", get(|| async { file("text/javascript; charset=utf-8", SCRIPT) }))
        .route("/dashboard.css", get(|| async { file("text/css; charset=utf-8", STYLE) }))
}
