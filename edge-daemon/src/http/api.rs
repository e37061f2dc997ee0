//! The routes, their handlers, errors, auth and the OpenAPI document.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::Stream;
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use utoipa::{IntoParams, OpenApi, ToSchema};
use uuid::Uuid;
use weld_core::messages::{DeviceState, Stats, Status};
use weld_core::{DepthMap, Frame, Inspection};

use super::{AppState, HttpSettings};
use crate::mqtt::status::{self as device_status, Health};
use crate::pipeline::inspect_frame;
use crate::policy::{Policy, PolicyKind, change_thresholds, present_threshold};
use crate::store::{CaptureMeta, MAX_QUERY_LIMIT};

type Shared = State<Arc<AppState>>;

// ------------------------------------------------------------------ errors

/// Every error the API answers: `{"error": "<code>", "detail": "<what exactly>"}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// A short code: `bad_request`, `unauthorized`, `forbidden`, `not_found`, ...
    pub error: String,
    /// What is wrong, for people.
    pub detail: String,
}

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    detail: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            detail: detail.into(),
        }
    }
    fn bad_request(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", detail)
    }
    fn not_found(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", detail)
    }
    fn internal(detail: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %detail, "HTTP request failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            detail.to_string(),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code.to_string(),
            detail: self.detail,
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> ApiError {
        ApiError::bad_request(format!("query string: {}", r.body_text()))
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> ApiError {
        let status = match r {
            JsonRejection::MissingJsonContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            JsonRejection::BytesRejection(_) => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(
            status,
            "bad_request",
            format!("JSON body: {}", r.body_text()),
        )
    }
}

type ApiResult<T> = Result<T, ApiError>;

// ------------------------------------------------------------------ auth

/// Checks `Authorization: Bearer <token>` against the configured token in constant time.
fn authorize(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let Some(expected) = &state.token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this call needs the API token, and none is configured on this device \
             ([http] token_file or token_env)",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(t) if bool::from(t.as_bytes().ct_eq(expected.expose().as_bytes())) => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "wrong token",
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this call needs `Authorization: Bearer <token>`",
        )),
    }
}

// ------------------------------------------------------------------ router

/// The OpenAPI document of every route below.
#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "weld-edge", description = "The weld inspection daemon's HTTP API"),
    paths(
        healthz, readyz, metrics, status, stats, results, results_latest, results_stream,
        frame_latest, inspect, get_config, patch_config, captures, capture, list_models,
        upload_model, activate_model, rollback_model, delete_model, start_shadow, stop_shadow,
        promote_shadow, openapi_json
    ),
    components(schemas(ErrorBody, DeviceStatus, MqttState, ConfigPatch, PolicyPatch,
        crate::deploy::ModelsView, crate::deploy::Installed, crate::deploy::RunningModel,
        crate::store::InstalledModel, ShadowRequest, weld_core::messages::ShadowStats)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Every route, with the body limit, the timeout and JSON errors for unknown routes.
pub fn router(state: Arc<AppState>, settings: &HttpSettings) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(status))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/results", get(results))
        .route("/api/v1/results/latest", get(results_latest))
        .route("/api/v1/results/stream", get(results_stream))
        .route("/api/v1/frames/latest.jpg", get(frame_latest))
        .route("/api/v1/inspect", axum::routing::post(inspect))
        .route("/api/v1/config", get(get_config).patch(patch_config))
        .route("/api/v1/captures", get(captures))
        .route("/api/v1/captures/:id", get(capture))
        .route("/api/v1/models", get(list_models).post(upload_model))
        .route(
            "/api/v1/models/rollback",
            axum::routing::post(rollback_model),
        )
        .route(
            "/api/v1/models/:version/activate",
            axum::routing::post(activate_model),
        )
        .route(
            "/api/v1/models/:version",
            axum::routing::delete(delete_model),
        )
        .route(
            "/api/v1/shadow",
            axum::routing::post(start_shadow).delete(stop_shadow),
        )
        .route(
            "/api/v1/shadow/promote",
            axum::routing::post(promote_shadow),
        )
        .route("/api/v1/openapi.json", get(openapi_json))
        .merge(super::dashboard::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(settings.max_body_bytes))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            settings.request_timeout,
        ))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; the API is under /api/v1 (openapi.json lists it)")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}

/// Errors made below the handlers (the timeout's 408, a body over the limit's 413) come
/// without a body; give them the JSON every other error has.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (code, detail) = match status {
        StatusCode::REQUEST_TIMEOUT => ("timeout", "the request took too long".to_string()),
        StatusCode::PAYLOAD_TOO_LARGE => (
            "payload_too_large",
            "the body is larger than http.max_body_bytes".to_string(),
        ),
        s => ("error", s.canonical_reason().unwrap_or("error").to_string()),
    };
    ApiError::new(status, code, detail).into_response()
}

// ------------------------------------------------------------------ health

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "alive")))]
async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

fn health(state: &AppState) -> (DeviceState, Vec<String>) {
    device_status::assess(&Health {
        camera: state.shared.stats.camera(),
        model_error: state.shared.model_error.load().as_deref().cloned(),
        new_model_failures: 0,
    })
}

/// Readiness: 200 when the device is `online` (inspecting as configured), 503 with the
/// reasons otherwise.
#[utoipa::path(get, path = "/readyz", responses(
    (status = 200, description = "online"),
    (status = 503, description = "degraded", body = ErrorBody)))]
async fn readyz(State(state): Shared) -> Response {
    match health(&state) {
        (DeviceState::Online, _) => Json(serde_json::json!({"status": "online"})).into_response(),
        (_, reasons) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "degraded",
            reasons.join("; "),
        )
        .into_response(),
    }
}

// ------------------------------------------------------------------ status and stats

/// The MQTT link as the dashboard shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MqttState {
    pub connected: bool,
    pub connects: u64,
    /// Results waiting in the outbox.
    pub outbox: u64,
    pub last_error: Option<String>,
}

/// `GET status`: the MQTT status message's fields, and the MQTT link.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeviceStatus {
    #[serde(flatten)]
    pub status: Status,
    /// Null when MQTT is off.
    pub mqtt: Option<MqttState>,
}

/// The device's health (as on MQTT `…/status`) and its MQTT link.
#[utoipa::path(get, path = "/api/v1/status", responses((status = 200, body = DeviceStatus)))]
async fn status(State(state): Shared) -> Json<DeviceStatus> {
    let (s, reasons) = health(&state);
    let mqtt = state.mqtt.as_ref().map(|l| MqttState {
        connected: l.connected.load(Ordering::Relaxed),
        connects: l.connects.load(Ordering::Relaxed),
        outbox: state.store.outbox().depth().len,
        last_error: l
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone(),
    });
    Json(DeviceStatus {
        status: device_status::status(&state.identity, &state.shared, s, reasons),
        mqtt,
    })
}

/// Counters since start, latency quantiles, outbox depth (as on MQTT `…/stats`); `fps` over
/// the last second.
#[utoipa::path(get, path = "/api/v1/stats", responses((status = 200, body = Stats)))]
async fn stats(State(state): Shared) -> Json<Stats> {
    let acked = state
        .mqtt
        .as_ref()
        .map_or(0, |l| l.acked.load(Ordering::Relaxed));
    Json(device_status::stats(
        &state.identity,
        &state.shared,
        state.started.elapsed(),
        state.live.fps(),
        state.store.outbox().depth(),
        acked,
    ))
}

// ------------------------------------------------------------------ results

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ResultsQuery {
    /// Only results after this id (exclusive); the oldest kept when absent.
    after: Option<Uuid>,
    /// At most this many, 1..=1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

fn limit(l: Option<usize>) -> ApiResult<usize> {
    match l.unwrap_or(100) {
        0 => Err(ApiError::bad_request("limit must be at least 1")),
        n if n > MAX_QUERY_LIMIT => Err(ApiError::bad_request(format!(
            "limit must be at most {MAX_QUERY_LIMIT}"
        ))),
        n => Ok(n),
    }
}

/// Results in time order, after an id: page with `after` = the last id of the previous page.
#[utoipa::path(get, path = "/api/v1/results", params(ResultsQuery), responses(
    (status = 200, body = Vec<Inspection>), (status = 400, body = ErrorBody)))]
async fn results(
    State(state): Shared,
    q: Result<Query<ResultsQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<Inspection>>> {
    let Query(q) = q?;
    let n = limit(q.limit)?;
    let store = state.store.clone();
    blocking(move || store.history().after(q.after, n))
        .await
        .map(Json)
}

/// The newest result.
#[utoipa::path(get, path = "/api/v1/results/latest", responses(
    (status = 200, body = Inspection), (status = 404, body = ErrorBody)))]
async fn results_latest(State(state): Shared) -> ApiResult<Json<Inspection>> {
    let store = state.store.clone();
    blocking(move || store.history().latest())
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("no result yet"))
}

/// Live results as Server-Sent Events: one `result` event per result (its JSON); a `lagged`
/// event says how many a slow reader missed.
#[utoipa::path(get, path = "/api/v1/results/stream", responses(
    (status = 200, description = "text/event-stream of `result` events")))]
async fn results_stream(
    State(state): Shared,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut closed = state.live.closed();
    let stop = async move {
        let _ = closed.wait_for(|c| *c).await;
    };
    let stream = BroadcastStream::new(state.live.subscribe())
        .map(|item| {
            Ok(match item {
                Ok(json) => Event::default().event("result").data(&*json),
                Err(BroadcastStreamRecvError::Lagged(n)) => {
                    Event::default().event("lagged").data(n.to_string())
                }
            })
        })
        .take_until(stop);
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// The latest frame (at most 0.25 s old) as JPEG, with the findings of its result outlined.
#[utoipa::path(get, path = "/api/v1/frames/latest.jpg", responses(
    (status = 200, description = "image/jpeg", content_type = "image/jpeg"),
    (status = 404, body = ErrorBody)))]
async fn frame_latest(State(state): Shared) -> ApiResult<Response> {
    let latest = state
        .live
        .latest()
        .ok_or_else(|| ApiError::not_found("no frame yet"))?;
    let jpeg = blocking(move || {
        let img = weld_core::viz::annotate(latest.frame.rgb(), &latest.result.findings);
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85)
            .encode_image(&img)
            .map(|()| out)
    })
    .await?;
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("image/jpeg")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        jpeg,
    )
        .into_response())
}

// ------------------------------------------------------------------ inspect

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct InspectQuery {
    /// `hybrid` (default), `rules`, `model` or `both`.
    #[param(pattern = "^(hybrid|rules|model|both)$")]
    policy: Option<String>,
    /// Millimetres per raw depth unit of the uploaded depth PNG (needed with one), in (0, 100].
    #[param(exclusive_minimum = 0.0, maximum = 100.0)]
    depth_unit_mm: Option<f32>,
}

/// The form `POST /api/v1/inspect` takes (the schema only: the handler reads the parts as
/// they stream in).
#[derive(ToSchema)]
#[allow(dead_code)]
struct InspectForm {
    /// The colour image: PNG or JPEG, 8-bit RGB or grey.
    #[schema(value_type = String, format = Binary)]
    image: Vec<u8>,
    /// The depth image: a 16-bit grey PNG of the image's size; needs `?depth_unit_mm=`.
    #[schema(value_type = Option<String>, format = Binary)]
    depth: Option<Vec<u8>>,
}

/// Inspects an uploaded frame with the running detector and model: multipart form with
/// `image` (PNG or JPEG) and optionally `depth` (16-bit PNG). Needs the token: it takes CPU
/// from the line. Nothing is stored.
#[utoipa::path(post, path = "/api/v1/inspect", params(InspectQuery),
    request_body(content = InspectForm, content_type = "multipart/form-data"),
    security(("bearer" = [])),
    responses((status = 200, body = Inspection), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "`policy=model` and no model loaded"),
        (status = 413, body = ErrorBody)))]
async fn inspect(
    State(state): Shared,
    headers: HeaderMap,
    q: Result<Query<InspectQuery>, QueryRejection>,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> ApiResult<Json<Inspection>> {
    authorize(&state, &headers)?;
    let Query(q) = q?;
    let kind = match q.policy.as_deref().unwrap_or("hybrid") {
        "hybrid" => PolicyKind::Hybrid,
        "rules" => PolicyKind::Rules,
        "model" => PolicyKind::Model,
        "both" => PolicyKind::Both,
        other => {
            return Err(ApiError::bad_request(format!(
                "policy {other:?}: use hybrid, rules, model or both"
            )));
        }
    };
    let mut multipart = multipart.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let (mut image, mut depth) = (None, None);
    while let Some(field) = multipart.next_field().await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the upload is larger than http.max_body_bytes",
            )
        } else {
            ApiError::bad_request(format!("multipart body: {}", e.body_text()))
        }
    })? {
        let name = field.name().unwrap_or_default().to_string();
        let bytes = field
            .bytes()
            .await
            .map_err(|e| ApiError::new(e.status(), "bad_request", e.body_text()))?;
        match name.as_str() {
            "image" => image = Some(bytes),
            "depth" => depth = Some(bytes),
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown form field {other:?}; send `image` and optionally `depth`"
                )));
            }
        }
    }
    let image = image.ok_or_else(|| ApiError::bad_request("the form has no `image` field"))?;
    let unit = match (&depth, q.depth_unit_mm) {
        (Some(_), None) => {
            return Err(ApiError::bad_request(
                "a depth image needs ?depth_unit_mm= (millimetres per raw unit)",
            ));
        }
        (_, Some(u)) if !(u.is_finite() && u > 0.0 && u <= 100.0) => {
            return Err(ApiError::bad_request("depth_unit_mm must be in (0, 100]"));
        }
        (_, u) => u,
    };
    let thresholds = state.shared.policy.load().thresholds;
    let model = state.shared.model.load_full();
    if kind.uses_model() && kind == PolicyKind::Model && model.is_none() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_model",
            "policy=model needs a model, and none is loaded",
        ));
    }
    let st = state.clone();
    let result = tokio::task::spawn_blocking(move || -> ApiResult<Inspection> {
        let rgb = image::load_from_memory(&image)
            .map_err(|e| ApiError::bad_request(format!("`image` is not a PNG or JPEG: {e}")))?
            .to_rgb8();
        let depth = match (depth, unit) {
            (Some(d), Some(unit_mm)) => {
                let values = match image::load_from_memory_with_format(&d, image::ImageFormat::Png)
                {
                    Ok(image::DynamicImage::ImageLuma16(v)) => v,
                    Ok(_) => {
                        return Err(ApiError::bad_request(
                            "`depth` must be a 16-bit grayscale PNG",
                        ));
                    }
                    Err(e) => {
                        return Err(ApiError::bad_request(format!("`depth` is not a PNG: {e}")));
                    }
                };
                Some(DepthMap { values, unit_mm })
            }
            _ => None,
        };
        let frame = Frame::new(rgb, depth).map_err(|e| ApiError::bad_request(e.to_string()))?;
        let policy = Policy { kind, thresholds };
        Ok(inspect_frame(
            &st.detector,
            &policy,
            model.as_deref(),
            &st.identity,
            &frame,
        )
        .result)
    })
    .await
    .map_err(ApiError::internal)??;
    Ok(Json(result))
}

// ------------------------------------------------------------------ config

/// A change of the running policy's thresholds (until restart; the config file keeps them for
/// good).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfigPatch {
    pub policy: PolicyPatch,
}

/// At least one of the two thresholds, each in (0, 1]; `null` is refused like any other value
/// outside that range.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyPatch {
    #[serde(default, deserialize_with = "present_threshold")]
    pub rules_confident_at: Option<f64>,
    #[serde(default, deserialize_with = "present_threshold")]
    pub model_confident_at: Option<f64>,
}

// PolicyPatch's schema is written out because utoipa-gen 5 emits `min_properties` as
// `maxProperties` (and `Option` as nullable), which would document `{}` and `null` as valid
// and a patch of both thresholds as invalid.
impl utoipa::PartialSchema for PolicyPatch {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, SchemaFormat, SchemaType, Type};
        let threshold = || {
            ObjectBuilder::new()
                .schema_type(SchemaType::Type(Type::Number))
                .format(Some(SchemaFormat::KnownFormat(
                    utoipa::openapi::KnownFormat::Float,
                )))
                // (0, 1] as a 32-bit float: a smaller positive JSON number would round to 0.
                .minimum(Some(f64::from(f32::MIN_POSITIVE)))
                .maximum(Some(1.0))
                .description(Some("In (0, 1]."))
        };
        ObjectBuilder::new()
            .description(Some("At least one of the two thresholds."))
            .property("rules_confident_at", threshold())
            .property("model_confident_at", threshold())
            .min_properties(Some(1))
            .additional_properties(Some(
                utoipa::openapi::schema::AdditionalProperties::FreeForm(false),
            ))
            .into()
    }
}

impl ToSchema for PolicyPatch {}

/// The running configuration: the config file as loaded, with the current thresholds.
#[utoipa::path(get, path = "/api/v1/config", responses((status = 200, description = "the config as JSON")))]
async fn get_config(State(state): Shared) -> Json<serde_json::Value> {
    let mut c = state.config.clone();
    let t = state.shared.policy.load().thresholds;
    if let Some(p) = c.get_mut("policy").and_then(|p| p.as_object_mut()) {
        p.insert(
            "rules_confident_at".into(),
            serde_json::json!(t.rules_confident_at),
        );
        p.insert(
            "model_confident_at".into(),
            serde_json::json!(t.model_confident_at),
        );
    }
    Json(c)
}

/// Changes the hybrid thresholds (validated; nothing changes on an error).
#[utoipa::path(patch, path = "/api/v1/config", request_body = ConfigPatch,
    security(("bearer" = [])),
    responses((status = 200, description = "the new config"), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody)))]
async fn patch_config(
    State(state): Shared,
    headers: HeaderMap,
    body: Result<Json<ConfigPatch>, JsonRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    authorize(&state, &headers)?;
    let Json(patch) = body?;
    let p = patch.policy;
    let thresholds = change_thresholds(
        &state.shared.policy,
        p.rules_confident_at,
        p.model_confident_at,
        "policy",
    )
    .map_err(ApiError::bad_request)?;
    tracing::info!(?thresholds, "HTTP: policy thresholds changed");
    Ok(get_config(State(state)).await)
}

// ------------------------------------------------------------------ captures

/// Frames kept for labelling (uncertain, or asked for), oldest first. Needs the token.
#[utoipa::path(get, path = "/api/v1/captures", params(ResultsQuery), security(("bearer" = [])),
    responses((status = 200, description = "capture records"), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn captures(
    State(state): Shared,
    headers: HeaderMap,
    q: Result<Query<ResultsQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<CaptureMeta>>> {
    authorize(&state, &headers)?;
    let Query(q) = q?;
    let n = limit(q.limit)?;
    let store = state.store.clone();
    blocking(move || store.captures().list(q.after, n))
        .await
        .map(Json)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct CaptureQuery {
    /// `json` (default: the record and its result), `rgb` or `depth` (the PNG).
    #[param(pattern = "^(json|rgb|depth)$")]
    part: Option<String>,
}

/// One capture: its record and result as JSON, or its RGB or depth PNG. Needs the token.
#[utoipa::path(get, path = "/api/v1/captures/{id}", params(("id" = Uuid, Path), CaptureQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "JSON or PNG"), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn capture(
    State(state): Shared,
    headers: HeaderMap,
    id: Result<Path<Uuid>, axum::extract::rejection::PathRejection>,
    q: Result<Query<CaptureQuery>, QueryRejection>,
) -> ApiResult<Response> {
    authorize(&state, &headers)?;
    let Path(id) = id.map_err(|e| ApiError::bad_request(format!("id: {}", e.body_text())))?;
    let Query(q) = q?;
    let part = q.part.unwrap_or_else(|| "json".into());
    if !matches!(part.as_str(), "json" | "rgb" | "depth") {
        return Err(ApiError::bad_request(format!(
            "part {part:?}: use json, rgb or depth"
        )));
    }
    let store = state.store.clone();
    let cap = blocking(move || store.captures().get(id))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no capture {id}")))?;
    let png = |img: &dyn Fn(&mut Vec<u8>) -> image::ImageResult<()>| -> ApiResult<Response> {
        let mut out = Vec::new();
        img(&mut out).map_err(ApiError::internal)?;
        Ok(([(header::CONTENT_TYPE, "image/png")], out).into_response())
    };
    match part.as_str() {
        "rgb" => png(&|out| {
            cap.frame
                .rgb()
                .write_to(&mut std::io::Cursor::new(out), image::ImageFormat::Png)
        }),
        "depth" => match cap.frame.depth() {
            Some(d) => png(&|out| {
                d.values
                    .write_to(&mut std::io::Cursor::new(out), image::ImageFormat::Png)
            }),
            None => Err(ApiError::not_found(format!("capture {id} has no depth"))),
        },
        _ => Ok(Json(serde_json::json!({"result": cap.result})).into_response()),
    }
}

// ------------------------------------------------------------------ models

/// The answer to a refused model change: the code and status for each reason.
fn deploy_error(e: crate::deploy::DeployError) -> ApiError {
    use crate::deploy::DeployError as E;
    let status = match &e {
        E::Busy | E::Conflict { .. } | E::Active(_) | E::NoPrevious | E::Shadow(_) => {
            StatusCode::CONFLICT
        }
        E::NoTrustedKeys => StatusCode::FORBIDDEN,
        E::Refused(_) | E::Broken { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        E::NotFound(_) => StatusCode::NOT_FOUND,
        E::Store(_) => {
            tracing::error!(error = %e, "the model store failed");
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    ApiError::new(status, e.code(), e.to_string())
}

/// Runs a model change off the async threads.
async fn deploying<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&crate::deploy::Deployer) -> Result<T, crate::deploy::DeployError> + Send + 'static,
) -> ApiResult<T> {
    let deployer = state.deployer.clone();
    tokio::task::spawn_blocking(move || f(&deployer))
        .await
        .map_err(ApiError::internal)?
        .map_err(deploy_error)
}

/// Installed models, which one runs, and what `rollback` would go back to.
#[utoipa::path(get, path = "/api/v1/models",
    responses((status = 200, body = crate::deploy::ModelsView)))]
async fn list_models(State(state): Shared) -> ApiResult<Json<crate::deploy::ModelsView>> {
    deploying(&state, move |d| d.view()).await.map(Json)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct UploadQuery {
    /// Run the bundle once it is installed (default true); false installs it for a later
    /// `activate`.
    activate: Option<bool>,
}

/// Uploads a model bundle (the body is the bundle file, as `weld-trainer bundle` writes it),
/// checks it (signature against the trusted keys, ONNX sha256, classes and input, a load in the
/// configured backend, the golden inputs' outputs), installs it and runs it. On any failure
/// the running model stays and the answer says why.
#[utoipa::path(post, path = "/api/v1/models", params(UploadQuery),
    request_body(content = Vec<u8>, content_type = "application/x-tar"),
    security(("bearer" = [])),
    responses((status = 201, body = crate::deploy::Installed, description = "installed"),
        (status = 200, body = crate::deploy::Installed, description = "this bundle was installed already"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn upload_model(
    State(state): Shared,
    headers: HeaderMap,
    q: Result<Query<UploadQuery>, QueryRejection>,
    body: axum::body::Body,
) -> ApiResult<Response> {
    use tokio::io::AsyncWriteExt as _;
    authorize(&state, &headers)?;
    let Query(q) = q?;
    let max = state.deployer.max_bundle_bytes();
    let upload = crate::deploy::UploadFile::new(state.deployer.models().upload_path());
    let mut file = tokio::fs::File::create(upload.path())
        .await
        .map_err(ApiError::internal)?;
    let mut stream = body.into_data_stream();
    let mut received: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::bad_request(format!(
                "the upload broke off after {received} bytes: {e}; nothing was installed"
            ))
        })?;
        received += chunk.len() as u64;
        if received > max {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the bundle is larger than deploy.max_bundle_bytes = {max}"),
            ));
        }
        file.write_all(&chunk).await.map_err(ApiError::internal)?;
    }
    if received == 0 {
        return Err(ApiError::bad_request(
            "the body is empty; send the bundle file as the body",
        ));
    }
    file.sync_all().await.map_err(ApiError::internal)?;
    drop(file);
    let path = upload.keep();
    let activate = q.activate.unwrap_or(true);
    let installed = deploying(&state, move |d| d.install(&path, activate)).await?;
    let status = if installed.new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(installed)).into_response())
}

/// Runs an installed version (checked again first); the running model stays if it fails.
#[utoipa::path(post, path = "/api/v1/models/{version}/activate",
    params(("version" = String, Path, description = "an installed version")),
    security(("bearer" = [])),
    responses((status = 200, body = crate::deploy::ModelsView), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
async fn activate_model(
    State(state): Shared,
    headers: HeaderMap,
    Path(version): Path<String>,
) -> ApiResult<Json<crate::deploy::ModelsView>> {
    authorize(&state, &headers)?;
    deploying(&state, move |d| d.activate(&version))
        .await
        .map(Json)
}

/// Goes back to the model that ran before the running one (the configured model when no
/// installed one did).
#[utoipa::path(post, path = "/api/v1/models/rollback", security(("bearer" = [])),
    responses((status = 200, body = crate::deploy::ModelsView), (status = 401, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn rollback_model(
    State(state): Shared,
    headers: HeaderMap,
) -> ApiResult<Json<crate::deploy::ModelsView>> {
    authorize(&state, &headers)?;
    deploying(&state, move |d| d.rollback()).await.map(Json)
}

/// `POST /api/v1/shadow`: which installed version to run in shadow, on what share of frames.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShadowRequest {
    /// An installed version that does not run.
    pub version: String,
    /// Share of the frames the active model runs on that the candidate also runs on, (0, 1].
    /// Default 0.25.
    pub sample: Option<f64>,
}

/// Runs an installed version beside the active model on a sample of its frames; agreement
/// and latency appear in `stats` (HTTP and MQTT), `GET models` and the dashboard.
#[utoipa::path(post, path = "/api/v1/shadow", request_body = ShadowRequest,
    security(("bearer" = [])),
    responses((status = 200, body = crate::deploy::ModelsView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn start_shadow(
    State(state): Shared,
    headers: HeaderMap,
    body: Result<Json<ShadowRequest>, JsonRejection>,
) -> ApiResult<Json<crate::deploy::ModelsView>> {
    authorize(&state, &headers)?;
    let Json(req) = body?;
    deploying(&state, move |d| {
        d.start_shadow(&req.version, req.sample.unwrap_or(0.25))
    })
    .await
    .map(Json)
}

/// Makes the shadow model the active one (checked again first).
#[utoipa::path(post, path = "/api/v1/shadow/promote", security(("bearer" = [])),
    responses((status = 200, body = crate::deploy::ModelsView), (status = 401, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn promote_shadow(
    State(state): Shared,
    headers: HeaderMap,
) -> ApiResult<Json<crate::deploy::ModelsView>> {
    authorize(&state, &headers)?;
    deploying(&state, move |d| d.promote_shadow())
        .await
        .map(Json)
}

/// Stops the shadow model; the answer carries its final figures.
#[utoipa::path(delete, path = "/api/v1/shadow", security(("bearer" = [])),
    responses((status = 200, body = crate::deploy::ModelsView), (status = 401, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn stop_shadow(
    State(state): Shared,
    headers: HeaderMap,
) -> ApiResult<Json<crate::deploy::ModelsView>> {
    authorize(&state, &headers)?;
    deploying(&state, move |d| d.stop_shadow()).await.map(Json)
}

/// Removes an installed version that does not run.
#[utoipa::path(delete, path = "/api/v1/models/{version}",
    params(("version" = String, Path, description = "an installed version")),
    security(("bearer" = [])),
    responses((status = 200, body = crate::deploy::ModelsView), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete_model(
    State(state): Shared,
    headers: HeaderMap,
    Path(version): Path<String>,
) -> ApiResult<Json<crate::deploy::ModelsView>> {
    authorize(&state, &headers)?;
    deploying(&state, move |d| d.delete(&version))
        .await
        .map(Json)
}

// ------------------------------------------------------------------ metrics

/// Prometheus text: frames, drops, decided_by and class counts, per-stage latency histograms,
/// outbox depth, MQTT link, model info, camera state.
#[utoipa::path(get, path = "/metrics", responses(
    (status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain")))]
async fn metrics(State(state): Shared) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        super::metrics::render(&state),
    )
        .into_response()
}

// ------------------------------------------------------------------ the document

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", responses((status = 200, description = "OpenAPI 3.1")))]
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// Runs store work off the async threads; store errors are 500s.
async fn blocking<T: Send + 'static, E: std::fmt::Display + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)
}
