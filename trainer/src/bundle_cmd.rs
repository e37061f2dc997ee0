//! `weld-trainer keys new`, `weld-trainer bundle` and `weld-trainer bundle verify`: signing
//! keys, signed model bundles, and the checks a device makes before it installs one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use chrono::Utc;

use weld_core::bundle::{self, Bundle};
use weld_core::manifest::{InputSpec, Lineage, ModelManifest, Quantization};
use weld_edge::model::{Model, ModelOptions};

use crate::card::ModelCard;

/// Writes a new key pair: `out` (the secret) and the public key beside it (`.pub`).
pub fn keys_new(out: &Path) -> Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let key = bundle::generate_key()?;
    let public = bundle::write_key_pair(out, &key)?;
    println!(
        "secret key {} (keep it on the signing machine)\npublic key {} (id {}): add it to the \
         devices' trusted keys",
        out.display(),
        public.display(),
        bundle::key_id(&key.verifying_key())
    );
    Ok(())
}

/// What goes into a bundle besides the ONNX file.
#[derive(Debug, Clone)]
pub struct BundleSpec {
    pub name: String,
    pub version: String,
    pub architecture: String,
    pub classes: Vec<String>,
    pub input: InputSpec,
    pub quantization: Quantization,
    /// A JSON object of evaluation figures (`{"accuracy": 0.97, ...}`), added to the card's.
    pub metrics: Option<PathBuf>,
    /// The model card beside the ONNX: its figures and lineage go into the manifest.
    pub card: Option<ModelCard>,
}

/// Checks that `onnx` loads and fits `classes` and `input` (one inference on the tract
/// backend), signs the manifest with `key` and writes the bundle to `out`.
pub fn create(onnx: &Path, spec: BundleSpec, key: &Path, out: &Path) -> Result<()> {
    let signing = bundle::read_signing_key(key)?;
    let bytes = std::fs::read(onnx).with_context(|| format!("reading {}", onnx.display()))?;
    let (mut metrics, lineage) = match &spec.card {
        Some(c) => (c.metrics.clone(), c.lineage.clone()),
        None => (BTreeMap::new(), Lineage::default()),
    };
    let extra: BTreeMap<String, f64> = match &spec.metrics {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str(&text).with_context(|| {
                format!(
                    "{}: expected a JSON object of numbers, e.g. {{\"accuracy\": 0.97}}",
                    p.display()
                )
            })?
        }
        None => BTreeMap::new(),
    };
    metrics.extend(extra);
    // Before signing: a bundle that cannot run is refused here, not on the line.
    load(onnx, &spec.classes, &spec.input, "tract", None)?;
    let manifest = ModelManifest {
        name: spec.name,
        version: spec.version,
        created: Utc::now(),
        architecture: spec.architecture,
        classes: spec.classes,
        input: spec.input,
        onnx_sha256: String::new(), // set by signing
        quantization: spec.quantization,
        metrics,
        lineage,
    };
    let signed = Bundle::sign(manifest, bytes, &signing)?;
    let tar = signed.to_tar().context("writing the bundle")?;
    weld_core::fsutil::write_atomic(out, &tar)
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "wrote {} ({} {}, {} bytes, onnx sha256 {}, signed by {})",
        out.display(),
        signed.manifest.name,
        signed.manifest.version,
        tar.len(),
        signed.manifest.onnx_sha256,
        bundle::key_id(&signing.verifying_key())
    );
    Ok(())
}

/// The device's checks, without installing: the layout, the manifest, the signature against
/// `trusted`, the ONNX hash, and that the model loads on `backend` and fits the manifest.
/// Returns the bundle, the signer and the loaded model.
pub fn load_verified(
    path: &Path,
    trusted: &[String],
    backend: &str,
) -> Result<(Bundle, ed25519_dalek::VerifyingKey, Model)> {
    let keys = trusted
        .iter()
        .map(|t| bundle::read_verifying_key(t))
        .collect::<Result<Vec<_>, _>>()?;
    let b = Bundle::read(path).with_context(|| format!("{}", path.display()))?;
    let signer = b
        .verify(&keys)
        .with_context(|| format!("{}", path.display()))?;
    let dir = tempfile::tempdir().context("creating a temporary folder for the model")?;
    let onnx = dir.path().join(bundle::MODEL_FILE);
    std::fs::write(&onnx, &b.onnx).with_context(|| format!("writing {}", onnx.display()))?;
    let m = &b.manifest;
    let identity = Some((m.name.clone(), m.version.clone()));
    let model = load(&onnx, &m.classes, &m.input, backend, identity)
        .with_context(|| format!("{}: the manifest does not fit the model", path.display()))?;
    Ok((b, signer, model))
}

/// `bundle verify`: [`load_verified`], then what was checked.
pub fn verify(path: &Path, trusted: &[String], backend: &str) -> Result<()> {
    let (b, signer, model) = load_verified(path, trusted, backend)?;
    let m = &b.manifest;
    println!(
        "{}: ok\n  {} {} ({}, {:?}), created {}\n  signed by {}\n  onnx sha256 {} ({} bytes)\n  \
         classes {}\n  input {:?} {}x{}\n  loads and runs on {}",
        path.display(),
        m.name,
        m.version,
        m.architecture,
        m.quantization,
        m.created.to_rfc3339(),
        bundle::key_id(&signer),
        m.onnx_sha256,
        b.onnx.len(),
        m.classes.join(", "),
        m.input.channels,
        m.input.size[0],
        m.input.size[1],
        model.backend_name()
    );
    Ok(())
}

/// Loads `onnx` on `backend` as a device would: `Model::from_onnx` checks the channels and size
/// against `input`, runs one inference and checks the output width against `classes` (and
/// names an unknown or missing backend). `identity` is the manifest's name and version.
fn load(
    onnx: &Path,
    classes: &[String],
    input: &InputSpec,
    backend: &str,
    identity: Option<(String, String)>,
) -> Result<Model> {
    let (name, version) = identity.unzip();
    let options = ModelOptions {
        backend: backend.to_string(),
        name,
        version,
        ..ModelOptions::default()
    };
    Ok(Model::from_onnx(
        onnx,
        classes.to_vec(),
        input.clone(),
        &options,
    )?)
}
