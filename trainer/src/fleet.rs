//! The devices of a plant (`--devices fleet.toml`) and what the trainer does to them over their
//! HTTP API: `push` a bundle to many at once (optionally a canary first), `devices status`,
//! and `dataset pull` of the frames they captured.
//!
//! ```toml
//! [defaults]
//! token_file = "tokens/line2"     # or token_env; relative paths are from this file's folder
//! timeout_s = 60                  # per request
//!
//! [[device]]
//! name = "rdk-01"
//! url = "http://10.0.2.11:8080"
//! # token_file / token_env here override the defaults for this device
//! ```

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Most devices pushed to at the same time.
pub const MAX_CONCURRENCY: usize = 64;

#[derive(Debug, Error)]
pub enum FleetError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    #[error("{}: {} problem(s):\n  - {}", path.display(), problems.len(), problems.join("\n  - "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FleetFile {
    #[serde(default)]
    defaults: Defaults,
    #[serde(default, rename = "device")]
    devices: Vec<DeviceEntry>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Defaults {
    token_file: Option<PathBuf>,
    token_env: Option<String>,
    timeout_s: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceEntry {
    name: String,
    url: String,
    token_file: Option<PathBuf>,
    token_env: Option<String>,
}

/// One device, ready to call.
#[derive(Debug, Clone)]
pub struct Device {
    pub name: String,
    /// `http://host:port`, no trailing slash.
    pub url: String,
    token: String,
}

/// The devices of a fleet file and the per-request timeout.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub devices: Vec<Device>,
    pub timeout: Duration,
}

impl Fleet {
    /// Reads and checks a fleet file; every problem (names, URLs, tokens) is listed at once.
    pub fn load(path: &Path) -> Result<Fleet, FleetError> {
        let text = std::fs::read_to_string(path).map_err(|source| FleetError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let file: FleetFile = toml::from_str(&text).map_err(|e| FleetError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut problems = Vec::new();
        if file.devices.is_empty() {
            problems.push("no [[device]] entries".to_string());
        }
        let timeout_s = file.defaults.timeout_s.unwrap_or(60);
        if !(1..=3600).contains(&timeout_s) {
            problems.push(format!(
                "defaults.timeout_s = {timeout_s}: must be 1..=3600"
            ));
        }
        let mut devices = Vec::new();
        for (i, d) in file.devices.iter().enumerate() {
            let at = format!("device[{i}] ({:?})", d.name);
            if d.name.trim().is_empty() {
                problems.push(format!("device[{i}]: name is empty"));
            } else if file.devices[..i].iter().any(|o| o.name == d.name) {
                problems.push(format!("{at}: the name is used twice"));
            }
            let url = d.url.trim_end_matches('/').to_string();
            match url.strip_prefix("http://") {
                Some(rest) if !rest.is_empty() && !rest.contains('/') => {}
                Some(_) => problems.push(format!(
                    "{at}: url {:?} must be http://HOST:PORT, without a path",
                    d.url
                )),
                None if url.starts_with("https://") => problems.push(format!(
                    "{at}: url {:?}: this weld-trainer speaks plain HTTP to devices (the \
                     requests carry the device's token); reach HTTPS devices through a tunnel",
                    d.url
                )),
                None => problems.push(format!("{at}: url {:?} must start with http://", d.url)),
            }
            let token = read_token(
                base,
                d.token_file.as_ref().or(file.defaults.token_file.as_ref()),
                d.token_env.as_ref().or(file.defaults.token_env.as_ref()),
            );
            match token {
                Ok(token) => devices.push(Device {
                    name: d.name.clone(),
                    url,
                    token,
                }),
                Err(why) => problems.push(format!("{at}: {why}")),
            }
        }
        if problems.is_empty() {
            Ok(Fleet {
                devices,
                timeout: Duration::from_secs(timeout_s),
            })
        } else {
            Err(FleetError::Invalid {
                path: path.to_path_buf(),
                problems,
            })
        }
    }

    fn agent(&self) -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(self.timeout))
            .build()
            .into()
    }
}

/// The device's API token: the first line of `file` (relative to `base`), or `env`.
fn read_token(base: &Path, file: Option<&PathBuf>, env: Option<&String>) -> Result<String, String> {
    let token = match (file, env) {
        (Some(f), _) => {
            let path = base.join(f);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("token_file {}: {e}", path.display()))?;
            text.lines().next().unwrap_or("").trim().to_string()
        }
        (None, Some(var)) => std::env::var(var)
            .map_err(|_| format!("token_env {var}: the variable is not set"))?
            .trim()
            .to_string(),
        (None, None) => {
            return Err("no token: set token_file or token_env (here or in [defaults])".into());
        }
    };
    if token.is_empty() {
        return Err("the token is empty".into());
    }
    Ok(token)
}

/// One device's answer, read whole.
struct Answer {
    status: u16,
    body: Vec<u8>,
}

/// Largest JSON answer read.
const MAX_JSON_BYTES: u64 = 16 * 1024 * 1024;
/// Largest image read (a capture's PNG).
const MAX_IMAGE_BYTES: u64 = 64 * 1024 * 1024;

impl Answer {
    /// The JSON body when the status is 2xx; else the device's `{"error", "detail"}` as text.
    fn json(&self) -> Result<serde_json::Value, String> {
        let text = String::from_utf8_lossy(&self.body);
        let v: serde_json::Value = serde_json::from_slice(&self.body).map_err(|e| {
            format!(
                "HTTP {}: not JSON ({e}): {}",
                self.status,
                text.chars().take(200).collect::<String>()
            )
        })?;
        if (200..300).contains(&self.status) {
            Ok(v)
        } else {
            Err(format!(
                "HTTP {} {}: {}",
                self.status,
                v["error"].as_str().unwrap_or("error"),
                v["detail"].as_str().unwrap_or(&text)
            ))
        }
    }

    /// The body as it came (a PNG) when the status is 2xx; else the device's error as text.
    fn bytes(self) -> Result<Vec<u8>, String> {
        if (200..300).contains(&self.status) {
            Ok(self.body)
        } else {
            self.json().map(|_| Vec::new())
        }
    }
}

/// The answer to `r`, at most [`MAX_JSON_BYTES`].
fn answer(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<Answer, String> {
    answer_up_to(r, MAX_JSON_BYTES)
}

fn answer_up_to(
    r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    limit: u64,
) -> Result<Answer, String> {
    let mut r = r.map_err(|e| format!("no answer: {e}"))?;
    let status = r.status().as_u16();
    let body = r
        .body_mut()
        .with_config()
        .limit(limit)
        .read_to_vec()
        .map_err(|e| format!("HTTP {status}: the answer broke off: {e}"))?;
    Ok(Answer { status, body })
}

impl Device {
    fn get(&self, agent: &ureq::Agent, path: &str) -> Result<serde_json::Value, String> {
        answer(agent.get(format!("{}{path}", self.url)).call())?.json()
    }

    /// `request` with this device's token.
    fn authed<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        request.header("Authorization", format!("Bearer {}", self.token))
    }

    /// A call that needs the token, answered with bytes (a PNG, or JSON to parse).
    fn get_auth_bytes(&self, agent: &ureq::Agent, path: &str) -> Result<Vec<u8>, String> {
        answer_up_to(
            self.authed(agent.get(format!("{}{path}", self.url))).call(),
            MAX_IMAGE_BYTES,
        )?
        .bytes()
    }

    /// A call with a JSON body that needs the token.
    fn post_json(
        &self,
        agent: &ureq::Agent,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        answer(
            self.authed(agent.post(format!("{}{path}", self.url)))
                .header("Content-Type", "application/json")
                .send(body.to_string()),
        )?
        .json()
    }

    fn delete(&self, agent: &ureq::Agent, path: &str) -> Result<serde_json::Value, String> {
        answer(
            self.authed(agent.delete(format!("{}{path}", self.url)))
                .call(),
        )?
        .json()
    }

    fn upload(
        &self,
        agent: &ureq::Agent,
        bundle: &[u8],
        activate: bool,
    ) -> Result<serde_json::Value, String> {
        answer(
            self.authed(agent.post(format!("{}/api/v1/models?activate={activate}", self.url)))
                .header("Content-Type", "application/x-tar")
                .send(bundle),
        )?
        .json()
    }
}

/// How `push` goes about it.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// Run the bundle once installed (else install only).
    pub activate: bool,
    /// Devices pushed to at the same time, 1..=[`MAX_CONCURRENCY`].
    pub concurrency: usize,
    /// Push to the first device alone and run the bundle there in shadow this long, beside
    /// the model it runs; go on only if the bundle agreed with it on at least
    /// `min_agreement` of the frames and failed on none (then, with `activate`, it is promoted
    /// there and must go on deciding frames).
    pub canary: Option<Duration>,
    /// Share of the canary's model frames the bundle must agree on, 0..=1.
    pub min_agreement: f64,
}

/// What happened on one device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceReport {
    pub device: String,
    pub url: String,
    /// Installed (and running, with `activate`).
    pub ok: bool,
    /// `installed`, `already installed`, `refused`, `unreachable`, `not pushed`.
    pub outcome: String,
    /// The backend the device checked it on.
    pub backend: Option<String>,
    /// Why not, as the device (or the network) said it.
    pub error: Option<String>,
    /// Seconds from the first byte sent to the device's answer.
    pub seconds: f64,
}

/// The whole push.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PushReport {
    pub bundle: String,
    pub version: String,
    pub devices: Vec<DeviceReport>,
    /// What the canary showed, when there was one.
    pub canary: Option<String>,
    pub seconds: f64,
}

impl PushReport {
    /// Devices that did not take the bundle.
    pub fn failed(&self) -> usize {
        self.devices.iter().filter(|d| !d.ok).count()
    }
}

/// Pushes `bundle` (the bytes of a bundle file, version `version`) to every device, at most
/// `concurrency` at a time, calling `progress` after each device's answer.
pub fn push(
    fleet: &Fleet,
    bundle_name: &str,
    bundle: &[u8],
    version: &str,
    opts: &PushOptions,
    progress: &(dyn Fn(&DeviceReport) + Sync),
) -> PushReport {
    let started = Instant::now();
    let agent = fleet.agent();
    let one = |d: &Device, activate: bool| {
        let t = Instant::now();
        let r = d.upload(&agent, bundle, activate);
        let seconds = t.elapsed().as_secs_f64();
        let report = match r {
            Ok(v) => DeviceReport {
                device: d.name.clone(),
                url: d.url.clone(),
                ok: true,
                outcome: if v["new"] == false {
                    "already installed".into()
                } else {
                    "installed".into()
                },
                backend: v["backend"].as_str().map(String::from),
                error: None,
                seconds,
            },
            Err(why) => DeviceReport {
                device: d.name.clone(),
                url: d.url.clone(),
                ok: false,
                outcome: if why.starts_with("no answer") {
                    "unreachable".into()
                } else {
                    "refused".into()
                },
                backend: None,
                error: Some(why),
                seconds,
            },
        };
        progress(&report);
        report
    };
    let mut reports: Vec<Option<DeviceReport>> = vec![None; fleet.devices.len()];
    let mut canary_note = None;
    let mut rest: &[Device] = &fleet.devices;
    let mut offset = 0;
    if let (Some(wait), Some(first)) = (opts.canary, fleet.devices.first()) {
        // Installed only: it runs in shadow first.
        let r = one(first, false);
        let ok = r.ok;
        reports[0] = Some(r);
        let verdict = if ok {
            watch_canary(&agent, first, version, wait, opts)
        } else {
            Err("the canary refused the bundle".into())
        };
        match verdict {
            Ok(note) => {
                canary_note = Some(note);
                rest = &fleet.devices[1..];
                offset = 1;
            }
            Err(why) => {
                for (i, d) in fleet.devices.iter().enumerate().skip(1) {
                    reports[i] = Some(DeviceReport {
                        device: d.name.clone(),
                        url: d.url.clone(),
                        ok: false,
                        outcome: "not pushed".into(),
                        backend: None,
                        error: Some(format!("stopped after the canary: {why}")),
                        seconds: 0.0,
                    });
                }
                canary_note = Some(format!("stopped: {why}"));
                rest = &[];
            }
        }
    }
    let every = |d: &Device| one(d, opts.activate);
    for (i, r) in map_bounded(rest, opts.concurrency, every)
        .into_iter()
        .enumerate()
    {
        reports[offset + i] = Some(r);
    }
    PushReport {
        bundle: bundle_name.to_string(),
        version: version.to_string(),
        devices: reports.into_iter().flatten().collect(),
        canary: canary_note,
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// The canary's trial: `version` (installed, not running) in shadow on every frame the active
/// model decides for `wait`; then its agreement and failures decide. With `activate` it is
/// promoted and must still run and decide frames a moment later. `Ok` describes what it did.
fn watch_canary(
    agent: &ureq::Agent,
    d: &Device,
    version: &str,
    wait: Duration,
    opts: &PushOptions,
) -> Result<String, String> {
    d.post_json(
        agent,
        "/api/v1/shadow",
        &serde_json::json!({"version": version, "sample": 1.0}),
    )?;
    std::thread::sleep(wait);
    let stats = d.get(agent, "/api/v1/stats")?;
    let sh = &stats["shadow"];
    let frames = sh["frames"].as_u64().unwrap_or(0);
    let agreement = sh["agreement"].as_f64().unwrap_or(0.0);
    let failures = sh["failures"].as_u64().unwrap_or(0);
    let figures = format!(
        "{version} in shadow on {} for {:.0} s: agreed on {:.1}% of {frames} frames, {failures} \
         failed, p50 {:.1} ms (the running model {:.1} ms)",
        d.name,
        wait.as_secs_f64(),
        agreement * 100.0,
        sh["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
        sh["active_latency_ms"]["p50"].as_f64().unwrap_or(0.0),
    );
    let verdict = if sh.is_null() || sh["version"] != version {
        Err(format!("{} runs no shadow of {version}", d.name))
    } else if frames == 0 {
        Err(format!(
            "{figures}: no frame to compare (the running model decided none); watch longer"
        ))
    } else if failures > 0 {
        Err(format!("{figures}: it failed on frames"))
    } else if agreement < opts.min_agreement {
        Err(format!(
            "{figures}: below --min-agreement {:.1}%",
            opts.min_agreement * 100.0
        ))
    } else {
        Ok(figures)
    };
    let figures = match verdict {
        Ok(f) => f,
        Err(why) => {
            // Leave the canary as it was: its model, no shadow.
            let _ = d.delete(agent, "/api/v1/shadow");
            return Err(why);
        }
    };
    if !opts.activate {
        d.delete(agent, "/api/v1/shadow")?;
        return Ok(figures);
    }
    let processed = |v: &serde_json::Value| v["frames"]["processed"].as_u64().unwrap_or(0);
    d.post_json(agent, "/api/v1/shadow/promote", &serde_json::json!({}))?;
    let before = processed(&d.get(agent, "/api/v1/stats")?);
    std::thread::sleep(Duration::from_secs(1));
    let after = processed(&d.get(agent, "/api/v1/stats")?);
    let models = d.get(agent, "/api/v1/models")?;
    let running = models["running"]["version"].as_str().unwrap_or("none");
    if running != version {
        return Err(format!(
            "{figures}; promoted, but {} runs {running}",
            d.name
        ));
    }
    if after <= before {
        return Err(format!(
            "{figures}; promoted, but {} decides no frames",
            d.name
        ));
    }
    Ok(format!("{figures}; promoted"))
}

/// One device as `devices status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceStatus {
    pub device: String,
    pub url: String,
    /// `online`, `degraded`, `offline` (as the device says), or `unreachable`.
    pub state: String,
    pub model: Option<String>,
    pub installed: Vec<String>,
    pub camera: Option<String>,
    pub fps: Option<f64>,
    pub dropped: Option<u64>,
    /// Why not online (the device's reasons, or the network's error).
    pub reasons: Vec<String>,
}

/// Asks every device (concurrently) for its status, stats and models.
pub fn status(fleet: &Fleet) -> Vec<DeviceStatus> {
    let agent = fleet.agent();
    let ask = |d: &Device| -> Result<DeviceStatus, String> {
        let status = d.get(&agent, "/api/v1/status")?;
        let stats = d.get(&agent, "/api/v1/stats")?;
        let models = d.get(&agent, "/api/v1/models")?;
        let strings = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        Ok(DeviceStatus {
            device: d.name.clone(),
            url: d.url.clone(),
            state: status["state"].as_str().unwrap_or("unknown").to_string(),
            model: models["running"]["version"].as_str().map(String::from),
            installed: models["installed"]
                .as_array()
                .map(|l| {
                    l.iter()
                        .filter_map(|m| m["version"].as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
            camera: status["camera"].as_str().map(String::from),
            fps: stats["fps"].as_f64(),
            dropped: stats["frames"]["dropped"].as_u64(),
            reasons: strings(&status["reasons"]),
        })
    };
    let answers = map_bounded(&fleet.devices, MAX_CONCURRENCY, ask);
    fleet
        .devices
        .iter()
        .zip(answers)
        .map(|(d, answer)| match answer {
            Ok(st) => st,
            Err(why) => DeviceStatus {
                device: d.name.clone(),
                url: d.url.clone(),
                state: "unreachable".into(),
                model: None,
                installed: Vec::new(),
                camera: None,
                fps: None,
                dropped: None,
                reasons: vec![why],
            },
        })
        .collect()
}

/// What `dataset pull` got from one device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PullReport {
    pub device: String,
    /// Frames written into `unlabeled/`.
    pub new: usize,
    /// Frames already there from an earlier pull.
    pub skipped: usize,
    /// Why the device's captures could not be read (all or the rest of them).
    pub error: Option<String>,
}

/// Copies every device's captured frames (`GET /api/v1/captures`, the frames the device was
/// unsure of or was asked to keep) into `unlabeled` as `DEVICE-ID.png` and `DEVICE-ID.depth.png`
/// (the dataset format), each file written whole or not at all; frames already there are not
/// fetched again.
/// A frame whose depth unit differs from `depth_unit_mm` (the dataset's) is not copied: its
/// heights would read wrong; the report says so.
pub fn pull(fleet: &Fleet, unlabeled: &Path, depth_unit_mm: Option<f32>) -> Vec<PullReport> {
    let agent = fleet.agent();
    let one = |d: &Device| {
        let mut report = PullReport {
            device: d.name.clone(),
            new: 0,
            skipped: 0,
            error: None,
        };
        if let Err(e) = pull_device(&agent, d, unlabeled, depth_unit_mm, &mut report) {
            report.error = Some(e);
        }
        report
    };
    map_bounded(&fleet.devices, 8, one)
}

fn pull_device(
    agent: &ureq::Agent,
    d: &Device,
    unlabeled: &Path,
    depth_unit_mm: Option<f32>,
    report: &mut PullReport,
) -> Result<(), String> {
    let mut after: Option<String> = None;
    loop {
        let query = match &after {
            Some(id) => format!("/api/v1/captures?limit=1000&after={id}"),
            None => "/api/v1/captures?limit=1000".to_string(),
        };
        let page: Vec<serde_json::Value> =
            serde_json::from_slice(&d.get_auth_bytes(agent, &query)?)
                .map_err(|e| format!("the capture list is not JSON: {e}"))?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        after = last["id"].as_str().map(String::from);
        for c in &page {
            let id = c["id"]
                .as_str()
                .filter(|id| uuid_like(id))
                .ok_or_else(|| format!("a capture without a valid id: {c}"))?;
            let stem = format!("{}-{id}", d.name);
            let rgb = unlabeled.join(format!("{stem}.png"));
            if rgb.is_file() {
                report.skipped += 1;
                continue;
            }
            // Depth first: the RGB file is what marks a frame as there.
            if c["has_depth"] == true {
                let unit = c["depth_unit_mm"].as_f64().map(|u| u as f32);
                let fits = matches!((unit, depth_unit_mm), (Some(a), Some(b)) if (a - b).abs() <= b * 1e-4);
                if !fits {
                    return Err(format!(
                        "capture {id} has depth in units of {} mm, the dataset's depth_unit_mm is \
                         {}; pull into a dataset made for this camera",
                        unit.map_or("?".into(), |u| u.to_string()),
                        depth_unit_mm.map_or("not set".into(), |u| u.to_string())
                    ));
                }
                let depth =
                    d.get_auth_bytes(agent, &format!("/api/v1/captures/{id}?part=depth"))?;
                let path = unlabeled.join(format!("{stem}{}", weld_core::frame::DEPTH_SUFFIX));
                weld_core::fsutil::write_atomic(&path, &depth)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
            let bytes = d.get_auth_bytes(agent, &format!("/api/v1/captures/{id}?part=rgb"))?;
            weld_core::fsutil::write_atomic(&rgb, &bytes)
                .map_err(|e| format!("{}: {e}", rgb.display()))?;
            report.new += 1;
        }
        if after.is_none() {
            return Ok(());
        }
    }
}

/// Hex digits and dashes only: an id that is safe in a file name and a URL.
fn uuid_like(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

/// `f` over `items` on at most `concurrency` threads, results in the order of `items`.
fn map_bounded<T: Sync, R: Send>(
    items: &[T],
    concurrency: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let done = Mutex::new(Vec::with_capacity(items.len()));
    std::thread::scope(|s| {
        for _ in 0..concurrency.clamp(1, MAX_CONCURRENCY).min(items.len()) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let r = f(item);
                    if let Ok(mut done) = done.lock() {
                        done.push((i, r));
                    }
                }
            });
        }
    });
    let mut done = done.into_inner().unwrap_or_default();
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}
