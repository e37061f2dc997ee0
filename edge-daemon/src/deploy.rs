//! Models pushed to the device: install, activate, roll back, delete (DESIGN.md "Model bundle",
//! HTTP `models` routes).
//!
//! A bundle is installed only when it passes everything [`Model::from_bundle`] checks, as a
//! device loads any bundle: its signature against the trusted keys of `[deploy]`, the ONNX's
//! sha256, classes and input that fit the model, a load in the configured backend, and a smoke
//! inference of the golden inputs the bundle carries, which must reproduce its golden outputs
//! (a pushed bundle without golden inputs is refused). Any failure leaves the running model
//! as it is and says exactly why. Loading and checking run while the old model keeps deciding
//! frames; the switch is one atomic pointer swap (`arc-swap`), so no frame waits for it or
//! fails because of it: a frame in flight finishes on the model it started with.
//!
//! A model that went live is on trial for [`TRIAL`]: failing on [`TRIAL_MAX_FAILURES`] frames
//! in that time (an error from the model, e.g. an input the camera cannot give) rolls it back
//! automatically ([`Deployer::check_trial`]), and the device reports why.
//!
//! One change at a time: a second install or activation while one runs is refused as busy.
//! Persistence and crash rules are those of the model store (`store/models.rs`); at start-up
//! [`startup_model`] runs the active installed version, checked again, or the first that
//! passes of the versions before it, or the configured model.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, TryLockError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::ModelSection;
use crate::model::{AUTO_BACKEND, Model, ModelError, ModelOptions};
use crate::pipeline::Shared;
use crate::store::{Activation, InstalledModel, Models, StoreError, check_version};

/// `[deploy]`: models pushed over the network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeploySection {
    /// Public keys a pushed bundle may be signed by (`.pub` files or 64 hex digits). Empty: the
    /// `[model] trusted_keys`. With neither, pushes are refused.
    pub trusted_keys: Vec<String>,
    /// Installed bundles kept on the device, 1..=32 (the running one included); older ones are
    /// removed after each install. Default 3.
    pub keep: usize,
    /// Largest bundle accepted, in bytes, 1 MiB..=1 GiB. Default 256 MiB.
    pub max_bundle_bytes: u64,
}

impl Default for DeploySection {
    fn default() -> Self {
        DeploySection {
            trusted_keys: Vec::new(),
            keep: 3,
            max_bundle_bytes: 256 * 1024 * 1024,
        }
    }
}

impl DeploySection {
    /// The keys pushed bundles are checked against: these, or else the configured model's.
    pub fn trusted_keys_with(&self, configured: Option<&ModelSection>) -> Vec<String> {
        if self.trusted_keys.is_empty() {
            configured
                .map(|m| m.trusted_keys.clone())
                .unwrap_or_default()
        } else {
            self.trusted_keys.clone()
        }
    }

    /// Every invalid value, each naming its `deploy.` key; empty when valid.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !(1..=32).contains(&self.keep) {
            out.push(format!("deploy.keep = {}: must be 1..=32", self.keep));
        }
        if !(1 << 20..=1 << 30).contains(&self.max_bundle_bytes) {
            out.push(format!(
                "deploy.max_bundle_bytes = {}: must be 1048576..=1073741824",
                self.max_bundle_bytes
            ));
        }
        for (i, k) in self.trusted_keys.iter().enumerate() {
            if let Err(e) = weld_core::bundle::read_verifying_key(k) {
                out.push(format!("deploy.trusted_keys[{i}]: {e}"));
            }
        }
        out
    }
}

/// Why a model change did not happen. The running model is unchanged in every case.
#[derive(Debug, Error)]
pub enum DeployError {
    /// Another install or activation is running.
    #[error("another model change is in progress; try again when it has finished")]
    Busy,
    /// No key is trusted for pushed bundles.
    #[error(
        "this device trusts no key for pushed models: set [deploy] trusted_keys (or [model] \
         trusted_keys)"
    )]
    NoTrustedKeys,
    /// The bundle failed a check; the message names which and why.
    #[error("the bundle is refused: {0}")]
    Refused(String),
    /// The version is installed already, from another bundle.
    #[error(
        "version {version} is already installed from another bundle (sha256 {installed}); give \
         the new bundle a new version"
    )]
    Conflict { version: String, installed: String },
    /// No installed bundle has this version.
    #[error("no installed model has version {0:?}")]
    NotFound(String),
    /// The version runs now.
    #[error("version {0} is the running model; activate another one before deleting it")]
    Active(String),
    /// A shadow of the version that runs, or a shadow command with none running.
    #[error("{0}")]
    Shadow(String),
    /// Rollback with nothing before the running model.
    #[error("nothing to roll back to: no other model ran before this one")]
    NoPrevious,
    /// An installed or configured model no longer passes its checks.
    #[error("{what} does not pass its checks now: {why}")]
    Broken { what: String, why: String },
    /// The model store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl DeployError {
    /// The short code that HTTP's `error` and MQTT's reply `error` carry.
    pub fn code(&self) -> &'static str {
        match self {
            DeployError::Busy => "busy",
            DeployError::NoTrustedKeys => "no_trusted_keys",
            DeployError::Refused(_) => "invalid_bundle",
            DeployError::Conflict { .. } => "version_conflict",
            DeployError::NotFound(_) => "not_found",
            DeployError::Active(_) => "active",
            DeployError::Shadow(_) => "shadow",
            DeployError::NoPrevious => "no_previous",
            DeployError::Broken { .. } => "broken_model",
            DeployError::Store(_) => "internal",
        }
    }
}

/// What an install did.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Installed {
    /// The installed bundle.
    pub model: InstalledModel,
    /// False when this exact bundle was installed already.
    pub new: bool,
    /// Whether it runs now.
    pub active: bool,
    /// The backend it ran on in its checks (the fastest that passed with backend `auto`).
    pub backend: String,
    /// Worst relative deviation from the bundle's golden outputs.
    pub golden_deviation: f32,
    /// Versions removed to keep `deploy.keep` installed.
    pub removed: Vec<String>,
}

/// The model store as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ModelsView {
    /// The installed version that runs; `null`: the configured model (or none) runs.
    pub active: Option<String>,
    /// What `rollback` would go back to, newest first (`null`: the configured model).
    pub previous: Vec<Option<String>>,
    /// The model deciding frames now: name, version, backend; `null` when none runs.
    pub running: Option<RunningModel>,
    /// Every installed bundle, oldest install first.
    pub installed: Vec<InstalledModel>,
    /// The candidate running in shadow, with its agreement so far.
    pub shadow: Option<weld_core::messages::ShadowStats>,
}

/// The model in the pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct RunningModel {
    pub name: String,
    pub version: String,
    pub backend: String,
}

/// How long a model that was pushed or activated is on trial: failing on frames in this time
/// rolls it back ([`Deployer::check_trial`]).
pub const TRIAL: Duration = Duration::from_secs(600);
/// Frames the model fails on (an error, not a low confidence) that end its trial in a rollback.
pub const TRIAL_MAX_FAILURES: u64 = 3;

/// The model on trial and the pipeline's counters when it went live.
#[derive(Debug)]
struct Trial {
    version: String,
    since: Instant,
    failures: u64,
    runs: u64,
}

/// Installs and switches models for one running pipeline. Share it behind an `Arc`.
#[derive(Debug)]
pub struct Deployer {
    shared: Arc<Shared>,
    models: Models,
    configured: Option<ModelSection>,
    trusted: Vec<String>,
    options: ModelOptions,
    keep: usize,
    max_bundle_bytes: u64,
    busy: Mutex<()>,
    trial: Mutex<Option<Trial>>,
}

impl Deployer {
    /// A deployer for the pipeline behind `shared`, with the model store `models`, the
    /// config's model (rollback's last resort) and `[deploy]` settings. Installed bundles load
    /// on the configured model's backend (default `auto`) with one thread per worker.
    pub fn new(
        shared: Arc<Shared>,
        models: Models,
        configured: Option<ModelSection>,
        deploy: &DeploySection,
        workers: usize,
    ) -> Deployer {
        let trusted = deploy.trusted_keys_with(configured.as_ref());
        Deployer {
            options: install_options(configured.as_ref(), workers),
            shared,
            models,
            configured,
            trusted,
            keep: deploy.keep,
            max_bundle_bytes: deploy.max_bundle_bytes,
            busy: Mutex::new(()),
            trial: Mutex::new(None),
        }
    }

    /// The model store.
    pub fn models(&self) -> &Models {
        &self.models
    }

    /// Largest upload accepted (`deploy.max_bundle_bytes`).
    pub fn max_bundle_bytes(&self) -> u64 {
        self.max_bundle_bytes
    }

    /// The store's state and the running model.
    pub fn view(&self) -> Result<ModelsView, DeployError> {
        let activation = self.models.activation()?;
        let running = self.shared.model.load_full().map(|m| RunningModel {
            name: m.name().to_string(),
            version: m.version().to_string(),
            backend: m.backend_name().to_string(),
        });
        Ok(ModelsView {
            active: activation.active,
            previous: activation.previous,
            running,
            installed: self.models.list()?,
            shadow: crate::mqtt::status::shadow_stats(&self.shared),
        })
    }

    /// Checks the bundle uploaded to `upload` (a file from [`Models::upload_path`]), installs
    /// it, and with `activate` runs it. `upload` is gone afterwards, whatever the outcome.
    pub fn install(&self, upload: &Path, activate: bool) -> Result<Installed, DeployError> {
        let result = self
            .lock()
            .and_then(|_guard| self.install_locked(upload, activate));
        if let Err(e) = std::fs::remove_file(upload)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(file = %upload.display(), error = %e, "cannot remove an upload");
        }
        match &result {
            Ok(i) => tracing::info!(
                version = %i.model.version,
                signer = %i.model.signer,
                backend = %i.backend,
                active = i.active,
                "model installed"
            ),
            Err(e) => tracing::warn!(error = %e, "model install refused; the running model stays"),
        }
        result
    }

    fn install_locked(&self, upload: &Path, activate: bool) -> Result<Installed, DeployError> {
        if self.trusted.is_empty() {
            return Err(DeployError::NoTrustedKeys);
        }
        let sha256 =
            weld_core::bundle::sha256_file_hex(upload).map_err(|e| StoreError::ModelFile {
                path: upload.to_path_buf(),
                source: e,
            })?;
        let loaded = Model::from_bundle(upload, &self.trusted, &self.options)
            .map_err(|e| DeployError::Refused(refusal(&e)))?;
        let manifest = &loaded.manifest;
        if manifest.golden.is_none() {
            return Err(DeployError::Refused(format!(
                "{} {} carries no golden inputs, so this device cannot prove it computes what \
                 the trainer measured; make it with `weld-trainer bundle`, which adds them",
                manifest.name, manifest.version
            )));
        }
        check_version(&manifest.version).map_err(DeployError::Refused)?;
        let trial = &loaded.trials[loaded.chosen];
        let golden_deviation = trial.outcome.as_ref().map_or(0.0, |p| p.deviation);
        let record = InstalledModel {
            version: manifest.version.clone(),
            name: manifest.name.clone(),
            sha256: sha256.clone(),
            bytes: std::fs::metadata(upload).map_or(0, |m| m.len()),
            signer: loaded.signer.clone(),
            quantization: format!("{:?}", manifest.quantization).to_lowercase(),
            classes: manifest.classes.clone(),
            installed: chrono::Utc::now(),
        };
        let (record, new) = match self.models.get(&record.version)? {
            Some(existing) if existing.sha256 == sha256 => (existing, false),
            Some(existing) => {
                return Err(DeployError::Conflict {
                    version: existing.version,
                    installed: existing.sha256,
                });
            }
            None => {
                self.models.install(upload, &record)?;
                (record, true)
            }
        };
        let backend = loaded.model.backend_name().to_string();
        if activate {
            self.switch(Some(record.version.clone()), loaded.model)?;
        }
        let removed = self.prune()?;
        let active = self.models.activation()?.active.as_deref() == Some(&record.version);
        Ok(Installed {
            model: record,
            new,
            active,
            backend,
            golden_deviation,
            removed,
        })
    }

    /// Runs the installed `version`, checked again first (the trusted keys may have changed).
    pub fn activate(&self, version: &str) -> Result<ModelsView, DeployError> {
        let guard = self.lock()?;
        let model = self.load_installed(version)?;
        self.switch(Some(version.to_string()), model)?;
        tracing::info!(%version, "model activated");
        drop(guard);
        self.view()
    }

    /// Goes back to the model that ran before the running one (the configured model when no
    /// installed one did). Undoes: a second rollback goes one further back.
    pub fn rollback(&self) -> Result<ModelsView, DeployError> {
        let guard = self.lock()?;
        let activation = self.models.activation()?;
        let Some((target, rest)) = activation.previous.split_first() else {
            return Err(DeployError::NoPrevious);
        };
        let model = match target {
            Some(v) => Some(self.load_installed(v)?),
            None => self.load_configured()?,
        };
        let next = Activation {
            active: target.clone(),
            previous: rest.to_vec(),
        };
        self.models.set_activation(&next)?;
        self.shared.model.store(model.map(Arc::new));
        self.shared.model_error.store(None);
        *self.trial_lock() = None;
        tracing::info!(version = ?target, "model rolled back");
        drop(guard);
        self.view()
    }

    /// Runs the installed `version` (checked again first) in shadow beside the active model,
    /// on `sample` (0 < sample <= 1) of the frames the active model runs on; replaces any
    /// shadow that ran. Its answers are compared in the stats, never used.
    pub fn start_shadow(&self, version: &str, sample: f64) -> Result<ModelsView, DeployError> {
        if !(sample > 0.0 && sample <= 1.0) {
            return Err(DeployError::Shadow(format!(
                "sample = {sample}: must be in (0, 1], the share of the model's frames the \
                 candidate also runs on"
            )));
        }
        let guard = self.lock()?;
        if self.models.activation()?.active.as_deref() == Some(version) {
            return Err(DeployError::Shadow(format!(
                "version {version} is the running model; shadow another one"
            )));
        }
        let model = self.load_installed(version)?;
        let every = (1.0 / sample).round().max(1.0) as u64;
        self.shared
            .shadow
            .store(Some(Arc::new(crate::pipeline::Shadow::new(
                model,
                version.to_string(),
                every,
            ))));
        tracing::info!(%version, every, "shadow model started");
        drop(guard);
        self.view()
    }

    /// Stops the shadow; its figures are in the answer, as they were.
    pub fn stop_shadow(&self) -> Result<ModelsView, DeployError> {
        let view = self.view()?;
        if self.shared.shadow.swap(None).is_none() {
            return Err(DeployError::Shadow("no shadow model runs".into()));
        }
        tracing::info!("shadow model stopped");
        Ok(view)
    }

    /// Makes the shadow the active model (checked again, as any activation), then stops it.
    pub fn promote_shadow(&self) -> Result<ModelsView, DeployError> {
        let Some(shadow) = self.shared.shadow.load_full() else {
            return Err(DeployError::Shadow("no shadow model runs".into()));
        };
        let version = shadow.version.clone();
        drop(shadow);
        let guard = self.lock()?;
        let model = self.load_installed(&version)?;
        self.switch(Some(version.clone()), model)?;
        self.shared.shadow.store(None);
        tracing::info!(%version, "shadow model promoted");
        drop(guard);
        self.view()
    }

    /// Removes an installed version that does not run.
    pub fn delete(&self, version: &str) -> Result<ModelsView, DeployError> {
        let guard = self.lock()?;
        let mut activation = self.models.activation()?;
        if activation.active.as_deref() == Some(version) {
            return Err(DeployError::Active(version.to_string()));
        }
        if self
            .shared
            .shadow
            .load()
            .as_ref()
            .is_some_and(|s| s.version == version)
        {
            return Err(DeployError::Shadow(format!(
                "version {version} runs in shadow; stop the shadow before deleting it"
            )));
        }
        if !self.models.remove(version)? {
            return Err(DeployError::NotFound(version.to_string()));
        }
        activation
            .previous
            .retain(|p| p.as_deref() != Some(version));
        self.models.set_activation(&activation)?;
        tracing::info!(%version, "installed model deleted");
        drop(guard);
        self.view()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, ()>, DeployError> {
        match self.busy.try_lock() {
            Ok(g) => Ok(g),
            // A panic during a change leaves the store consistent (its crash rules); go on.
            Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
            Err(TryLockError::WouldBlock) => Err(DeployError::Busy),
        }
    }

    /// Records `version` as active, then puts `model` on the line. Stored first: a crash
    /// between the two restarts on the new model, which has passed every check.
    fn switch(&self, version: Option<String>, model: Model) -> Result<(), DeployError> {
        let next = self.models.activation()?.then(version.clone());
        self.models.set_activation(&next)?;
        let stats = &self.shared.stats;
        *self.trial_lock() = version.map(|version| Trial {
            version,
            since: Instant::now(),
            failures: stats.model_failures.load(Ordering::Relaxed),
            runs: stats.model_runs.load(Ordering::Relaxed),
        });
        self.shared.model.store(Some(Arc::new(model)));
        self.shared.model_error.store(None);
        Ok(())
    }

    fn trial_lock(&self) -> std::sync::MutexGuard<'_, Option<Trial>> {
        self.trial
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Ends the trial of the model that went live last: after [`TRIAL`] without trouble it
    /// passes; when it has failed on [`TRIAL_MAX_FAILURES`] frames it is rolled back, and the
    /// reason is kept in the device status (degraded) until the next model change. Call it
    /// every second or so; returns the reason when it rolled back.
    pub fn check_trial(&self) -> Option<String> {
        let (version, failed, ran) = {
            let mut trial = self.trial_lock();
            let t = trial.as_ref()?;
            if t.since.elapsed() > TRIAL {
                *trial = None;
                return None;
            }
            let stats = &self.shared.stats;
            let failed = stats.model_failures.load(Ordering::Relaxed) - t.failures;
            if failed < TRIAL_MAX_FAILURES {
                return None;
            }
            let ran = stats.model_runs.load(Ordering::Relaxed) - t.runs;
            (t.version.clone(), failed, ran)
        };
        match self.rollback() {
            Ok(view) => {
                let now = view.running.map_or("no model".to_string(), |m| {
                    format!("{} {}", m.name, m.version)
                });
                let why = format!(
                    "model {version} failed on {failed} of the {ran} frames it was asked about \
                     since it went live, and was rolled back automatically; running {now}"
                );
                tracing::error!("{why}");
                self.shared.model_error.store(Some(Arc::new(why.clone())));
                Some(why)
            }
            Err(DeployError::Busy) => None,
            Err(e) => {
                tracing::error!(%version, error = %e, "the failing model could not be rolled back");
                None
            }
        }
    }

    fn load_installed(&self, version: &str) -> Result<Model, DeployError> {
        if self.models.get(version)?.is_none() {
            return Err(DeployError::NotFound(version.to_string()));
        }
        load_installed(&self.models, version, &self.trusted, &self.options).map_err(|e| {
            DeployError::Broken {
                what: format!("installed model {version}"),
                why: refusal(&e),
            }
        })
    }

    fn load_configured(&self) -> Result<Option<Model>, DeployError> {
        crate::daemon::load_model(self.configured.as_ref(), self.options.threads).map_err(|e| {
            DeployError::Broken {
                what: "the configured model".into(),
                why: e.to_string(),
            }
        })
    }

    /// Removes the oldest installs beyond `keep`, never the running one or the shadow.
    fn prune(&self) -> Result<Vec<String>, DeployError> {
        let mut activation = self.models.activation()?;
        let installed = self.models.list()?;
        let mut excess = installed.len().saturating_sub(self.keep);
        let mut removed = Vec::new();
        let shadow = self.shared.shadow.load_full().map(|s| s.version.clone());
        for m in installed {
            if excess == 0 {
                break;
            }
            if activation.active.as_deref() == Some(&m.version)
                || shadow.as_deref() == Some(&m.version)
            {
                continue;
            }
            self.models.remove(&m.version)?;
            activation
                .previous
                .retain(|p| p.as_deref() != Some(&m.version));
            removed.push(m.version);
            excess -= 1;
        }
        if !removed.is_empty() {
            self.models.set_activation(&activation)?;
            tracing::info!(?removed, "removed old installed models");
        }
        Ok(removed)
    }
}

/// How installed bundles load: the configured model's backend and ONNX Runtime library, one
/// thread per worker.
fn install_options(configured: Option<&ModelSection>, workers: usize) -> ModelOptions {
    ModelOptions {
        backend: configured.map_or_else(|| AUTO_BACKEND.to_string(), |m| m.backend.clone()),
        threads: workers,
        ort_library: configured.and_then(|m| m.ort_library.clone()),
        name: None,
        version: None,
    }
}

fn load_installed(
    models: &Models,
    version: &str,
    trusted: &[String],
    options: &ModelOptions,
) -> Result<Model, ModelError> {
    Model::from_bundle(&models.path(version), trusted, options).map(|b| b.model)
}

/// A model error as a refusal: without the temporary upload's file name, which means nothing
/// to the sender.
fn refusal(e: &ModelError) -> String {
    match e {
        ModelError::Bundle { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// The model a daemon starts with: the active installed version if it passes its checks,
/// else the first of the versions before it that does (the activation is then corrected),
/// else the configured model. `Err` is the configured model's own failure.
pub fn startup_model(
    models: &Models,
    configured: Option<&ModelSection>,
    deploy: &DeploySection,
    workers: usize,
) -> Result<Option<Model>, ModelError> {
    let activation = match models.activation() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the active model; running the configured model");
            Activation::default()
        }
    };
    let trusted = deploy.trusted_keys_with(configured);
    let options = install_options(configured, workers);
    let chain: Vec<Option<String>> = std::iter::once(activation.active)
        .chain(activation.previous)
        .collect();
    // The first installed version that passes, up to the configured model (`None`).
    let mut runs = None;
    for (i, candidate) in chain.iter().enumerate() {
        let Some(version) = candidate else {
            break;
        };
        match load_installed(models, version, &trusted, &options) {
            Ok(model) => {
                tracing::info!(%version, "running the installed model");
                runs = Some((i, model));
                break;
            }
            Err(e) => tracing::error!(
                %version,
                error = %e,
                "the installed model does not pass its checks; trying the one before it"
            ),
        }
    }
    let (i, model) = match runs {
        Some((i, model)) => (i, Some(model)),
        None => (
            chain
                .iter()
                .position(Option::is_none)
                .unwrap_or(chain.len()),
            None,
        ),
    };
    if i > 0 {
        // What ran before the one that runs now stays the rollback chain.
        let corrected = Activation {
            active: chain.get(i).cloned().flatten(),
            previous: chain.get(i + 1..).map(<[_]>::to_vec).unwrap_or_default(),
        };
        if let Err(e) = models.set_activation(&corrected) {
            tracing::error!(error = %e, "cannot record the model that runs");
        }
    }
    match model {
        Some(model) => Ok(Some(model)),
        None => crate::daemon::load_model(configured, workers),
    }
}

/// The file an upload goes to and its removal when the request ends early (client gone,
/// timeout): dropped before [`UploadFile::keep`], it removes the file.
#[derive(Debug)]
pub struct UploadFile {
    path: Option<PathBuf>,
}

impl UploadFile {
    /// Takes charge of `path`.
    pub fn new(path: PathBuf) -> UploadFile {
        UploadFile { path: Some(path) }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }

    /// Hands the file on (to [`Deployer::install`], which removes it itself).
    pub fn keep(mut self) -> PathBuf {
        self.path.take().unwrap_or_default()
    }
}

impl Drop for UploadFile {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}
