//! `weld-trainer label DATASET`: a local web page for labelling a dataset's `unlabeled/`
//! frames and reviewing its labels, keyboard first.
//!
//! The server binds 127.0.0.1 only and carries its page in the binary (plants are offline).
//! When it starts it judges every frame once, with the rules and (given `--model`) the model,
//! so the page can draw the heuristic's findings, show the model's pre-label and order the
//! queues. Saving moves the frame pair into its class folder through [`store::LabelStore`],
//! which logs every change in `changes.jsonl` and can undo the last one.

pub mod store;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use weld_core::dataset::{Dataset, Sample};
use weld_core::frame::{DepthMap, load_depth, load_rgb};
use weld_core::rules::{Detector, RulesConfig};
use weld_edge::config::ModelSection;
use weld_edge::http::dashboard::{asset, page};
use weld_edge::model::Model;

use store::{Judgement, LabelError, LabelStore, Opinion, Queue};

const INDEX_HTML: &str = include_str!("page/index.html");
const LABEL_JS: &str = include_str!("page/label.js");
const LABEL_CSS: &str = include_str!("page/label.css");

/// Only this server's own script, styles, API and images.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
                   img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; \
                   base-uri 'none'; form-action 'none'";

/// Width of the bulk view's thumbnails, pixels.
const THUMB_WIDTH: u32 = 320;

/// What `label` was asked to do.
#[derive(Debug, Clone)]
pub struct LabelOptions {
    pub dataset: PathBuf,
    /// A signed bundle, or `builtin` for the default model built into weld-edge.
    pub model: Option<PathBuf>,
    pub trusted: Vec<String>,
    pub backend: String,
    /// The rules' config (default: the built-in one).
    pub rules: Option<PathBuf>,
    /// 0: any free port.
    pub port: u16,
    /// Who the change log names.
    pub user: String,
}

struct AppState {
    store: Mutex<LabelStore>,
    user: String,
    dataset: String,
    depth_unit_mm: Option<f32>,
    model: Option<(String, String)>,
}

type Shared = Arc<AppState>;

/// Loads the model the pre-labels come from (`builtin`: weld-edge's default model).
fn load_model(opts: &LabelOptions) -> Result<Option<Model>> {
    let Some(path) = &opts.model else {
        return Ok(None);
    };
    let section = if path.as_os_str() == "builtin" && !path.exists() {
        if !opts.trusted.is_empty() {
            anyhow::bail!("--model builtin brings its own key: give no --trusted with it");
        }
        ModelSection {
            backend: opts.backend.clone(),
            ..ModelSection::builtin()
        }
    } else {
        if opts.trusted.is_empty() {
            anyhow::bail!(
                "--model {}: give --trusted KEY (the key the bundle is signed by)",
                path.display()
            );
        }
        ModelSection {
            builtin: false,
            bundle: Some(path.clone()),
            trusted_keys: opts.trusted.clone(),
            backend: opts.backend.clone(),
            ..ModelSection::builtin()
        }
    };
    weld_edge::daemon::load_model(Some(&section), rayon::current_num_threads())
        .with_context(|| format!("loading the model {}", path.display()))
}

/// What the rules and the model make of one frame.
fn judge(ds: &Dataset, s: &Sample, detector: &Detector, model: Option<&Model>) -> Judgement {
    let frame = match ds.load(s) {
        Ok(f) => f,
        Err(e) => {
            return Judgement {
                error: Some(e.to_string()),
                ..Judgement::default()
            };
        }
    };
    let rules = detector.inspect(&frame);
    let mut j = Judgement {
        width: frame.width(),
        height: frame.height(),
        rules: Some(Opinion {
            class: rules.class,
            confidence: rules.confidence,
        }),
        findings: rules.findings,
        model: None,
        error: None,
    };
    if let Some(m) = model {
        match m.predict(&frame) {
            Ok(p) => {
                j.model = Some(Opinion {
                    class: p.class,
                    confidence: p.confidence,
                })
            }
            Err(e) => j.error = Some(format!("model: {e}")),
        }
    }
    j
}

/// Opens the dataset, judges its frames and serves the page until ctrl-c.
pub fn run(opts: &LabelOptions) -> Result<()> {
    let model = load_model(opts)?;
    let rules_cfg = match &opts.rules {
        Some(p) => RulesConfig::load(p)?,
        None => RulesConfig::default(),
    };
    let detector = Detector::new(rules_cfg)?;
    let started = Instant::now();
    let store = LabelStore::open(&opts.dataset, |ds, s| {
        judge(ds, s, &detector, model.as_ref())
    })
    .with_context(|| format!("opening the dataset {}", opts.dataset.display()))?;
    for p in store.problems() {
        eprintln!("warning: {p}");
    }
    eprintln!(
        "judged {} frames in {:.1} s ({}); {} change(s) can be undone",
        store.frames().len(),
        started.elapsed().as_secs_f64(),
        match &model {
            Some(m) => format!("rules and {}", m.name()),
            None => "rules only; --model adds pre-labels".into(),
        },
        store.undoable()
    );
    let state = Arc::new(AppState {
        depth_unit_mm: store.depth_unit_mm(),
        store: Mutex::new(store),
        user: opts.user.clone(),
        dataset: opts.dataset.display().to_string(),
        model: model
            .as_ref()
            .map(|m| (m.name().to_string(), m.version().to_string())),
    });
    drop(model);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], opts.port)))
            .await
            .with_context(|| format!("binding 127.0.0.1:{}", opts.port))?;
        let addr = listener.local_addr()?;
        println!("labelling page: http://{addr}/ (ctrl-c stops)");
        axum::serve(listener, routes(state))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok(())
    })
}

fn routes(state: Shared) -> Router {
    Router::new()
        .route("/", get(index))
        .route(
            "/label.js",
            get(|| async { asset("text/javascript; charset=utf-8", LABEL_JS) }),
        )
        .route(
            "/label.css",
            get(|| async { asset("text/css; charset=utf-8", LABEL_CSS) }),
        )
        .route("/api/info", get(info))
        .route("/api/queue", get(queue))
        .route("/api/frames/:folder/:stem/:view", get(image))
        .route("/api/label", post(label))
        .route("/api/undo", post(undo))
        .with_state(state)
}

async fn index() -> Response {
    page(INDEX_HTML, CSP)
}

/// An error as the page shows it: a status and `{"error": message}`.
fn fail(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": message.to_string() }))).into_response()
}

fn label_error(e: &LabelError) -> Response {
    let status = match e {
        LabelError::NoFrame(_) | LabelError::NothingToUndo => StatusCode::NOT_FOUND,
        LabelError::NameTaken { .. } => StatusCode::CONFLICT,
        LabelError::UnknownClass(..) | LabelError::NoFrames | LabelError::NeedsModel(_) => {
            StatusCode::BAD_REQUEST
        }
        LabelError::Dataset(_) | LabelError::Io { .. } | LabelError::BadLog { .. } => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    fail(status, e)
}

fn summary(state: &AppState, store: &LabelStore) -> serde_json::Value {
    json!({
        "dataset": state.dataset,
        "classes": store.classes(),
        "counts": store.counts(),
        "undoable": store.undoable(),
        "user": state.user,
        "model": state.model.as_ref().map(|(name, version)| json!({"name": name, "version": version})),
    })
}

async fn info(State(state): State<Shared>) -> Response {
    let store = state.store.lock().unwrap_or_else(|p| p.into_inner());
    Json(summary(&state, &store)).into_response()
}

#[derive(Deserialize)]
struct QueueParams {
    mode: Option<String>,
}

async fn queue(State(state): State<Shared>, Query(q): Query<QueueParams>) -> Response {
    let mode = q.mode.unwrap_or_else(|| "unlabeled".into());
    let Some(queue) = Queue::parse(&mode) else {
        return fail(
            StatusCode::BAD_REQUEST,
            format!(
                "unknown queue {mode:?}: unlabeled, confidence, disagreement, all or class:NAME"
            ),
        );
    };
    let store = state.store.lock().unwrap_or_else(|p| p.into_inner());
    match store.queue(&queue, state.model.is_some()) {
        Ok(ids) => {
            let frames: Vec<_> = ids.iter().filter_map(|id| store.frame(id)).collect();
            Json(json!({ "mode": mode, "frames": frames })).into_response()
        }
        Err(e) => label_error(&e),
    }
}

/// `rgb` (the file as stored), `depth` (false colour, JPEG) or `thumb` (the RGB, 320 pixels
/// wide, JPEG).
async fn image(
    State(state): State<Shared>,
    UrlPath((folder, stem, view)): UrlPath<(String, String, String)>,
) -> Response {
    let id = format!("{folder}/{stem}");
    let (rgb, depth) = {
        let store = state.store.lock().unwrap_or_else(|p| p.into_inner());
        match store.frame(&id) {
            Some(f) => (
                f.rgb_path().to_path_buf(),
                f.depth_path().map(Path::to_path_buf),
            ),
            None => return label_error(&LabelError::NoFrame(id)),
        }
    };
    let unit = state.depth_unit_mm.unwrap_or(1.0);
    let made = tokio::task::spawn_blocking(move || render(&view, &rgb, depth.as_deref(), unit))
        .await
        .unwrap_or_else(|e| Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string())));
    match made {
        Ok((content_type, bytes)) => (
            [
                (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            ],
            Body::from(bytes),
        )
            .into_response(),
        Err((status, message)) => fail(status, message),
    }
}

type Rendered = Result<(&'static str, Vec<u8>), (StatusCode, String)>;

fn render(view: &str, rgb: &Path, depth: Option<&Path>, unit_mm: f32) -> Rendered {
    let internal = |e: &dyn std::fmt::Display| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    let jpeg = |img: &image::RgbImage| -> Rendered {
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .encode_image(img)
            .map_err(|e| internal(&e))?;
        Ok(("image/jpeg", out))
    };
    match view {
        "rgb" => {
            let bytes = std::fs::read(rgb).map_err(|e| internal(&e))?;
            let png = rgb
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("png"));
            Ok((if png { "image/png" } else { "image/jpeg" }, bytes))
        }
        "thumb" => {
            let img = load_rgb(rgb).map_err(|e| internal(&e))?;
            let h = (u64::from(img.height()) * u64::from(THUMB_WIDTH)
                / u64::from(img.width().max(1)))
            .max(1) as u32;
            jpeg(&image::imageops::thumbnail(&img, THUMB_WIDTH, h))
        }
        "depth" => {
            let Some(depth) = depth else {
                return Err((StatusCode::NOT_FOUND, "this frame has no depth".into()));
            };
            let values = load_depth(depth).map_err(|e| internal(&e))?;
            jpeg(&weld_core::viz::depth_false_colour(&DepthMap {
                values,
                unit_mm,
            }))
        }
        other => Err((
            StatusCode::NOT_FOUND,
            format!("no view {other:?}: rgb, depth or thumb"),
        )),
    }
}

#[derive(Deserialize)]
struct LabelBody {
    frames: Vec<String>,
    /// A class, or null for `unlabeled/`.
    label: Option<String>,
}

async fn label(
    State(state): State<Shared>,
    body: Result<Json<LabelBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return fail(StatusCode::BAD_REQUEST, e.body_text()),
    };
    change(state, move |store, user| {
        store.relabel(&body.frames, body.label.as_deref(), user)
    })
    .await
}

async fn undo(State(state): State<Shared>) -> Response {
    change(state, |store, user| store.undo(user)).await
}

/// Runs a change of the store off the async threads (it renames files and syncs the log) and
/// answers with what moved and the new counts.
async fn change(
    state: Shared,
    f: impl FnOnce(&mut LabelStore, &str) -> Result<store::Applied, LabelError> + Send + 'static,
) -> Response {
    let done = tokio::task::spawn_blocking(move || {
        let mut store = state.store.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut store, &state.user).map(|a| (a, summary(&state, &store)))
    })
    .await;
    match done {
        Ok(Ok((applied, info))) => Json(json!({
            "change": applied.change,
            "moved": applied.moved.iter().map(|(from, to)| json!({"from": from, "to": to})).collect::<Vec<_>>(),
            "info": info,
        }))
        .into_response(),
        Ok(Err(e)) => label_error(&e),
        Err(e) => fail(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}
