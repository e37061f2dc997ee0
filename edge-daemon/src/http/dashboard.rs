//! The live dashboard at `/`: one page for the line engineer, its script and its stylesheet,
//! built into the binary (plants are offline: no CDN, no chart library).
//!
//! The page reads the same API as everyone else: results from `results/stream` (SSE), `stats`
//! and `status` polled, `frames/latest.jpg` refreshed every second. Its URLs are relative, so it
//! also works behind a reverse proxy under a sub-path.

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("dashboard/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("dashboard/dashboard.css");

/// Only this server's own script, styles, API and frames (blob: for the frame, data: for the
/// empty favicon); no framing by other sites.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
                   img-src 'self' blob: data:; connect-src 'self'; frame-ancestors 'none'; \
                   base-uri 'none'; form-action 'none'";

/// `/`, `/dashboard.js` and `/dashboard.css`, for any router state.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/dashboard.js", get(script))
        .route("/dashboard.css", get(style))
}

/// The assets change with the binary: `no-cache` makes the browser ask again (a page left open
/// across an upgrade gets the new script on reload). Also serves weld-trainer's labelling page.
pub fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response()
}

/// An HTML page under a content security policy.
pub fn page(html: &'static str, csp: &'static str) -> Response {
    let mut resp = asset("text/html; charset=utf-8", html);
    resp.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(csp),
    );
    resp
}

async fn index() -> Response {
    page(INDEX_HTML, CSP)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", DASHBOARD_JS)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", DASHBOARD_CSS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page names the ids the script fills in, and the script only relative URLs.
    #[test]
    fn page_and_script_agree() {
        for id in [
            "processed",
            "results",
            "classes",
            "fps",
            "state",
            "conn",
            "latency-chart",
            "frame",
            "mqtt",
            "camera",
            "model",
        ] {
            assert!(
                INDEX_HTML.contains(&format!("id=\"{id}\"")),
                "index.html has no id {id}"
            );
            assert!(
                DASHBOARD_JS.contains(&format!("\"{id}\"")),
                "dashboard.js does not use {id}"
            );
        }
        assert!(
            !DASHBOARD_JS.contains("\"/api"),
            "absolute URL in the script"
        );
        assert!(!INDEX_HTML.contains("http://") && !INDEX_HTML.contains("https://"));
    }
}
