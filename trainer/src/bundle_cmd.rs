//! `weld-trainer keys new`, `weld-trainer bundle` and `weld-trainer bundle verify`: signing
//! keys, signed model bundles, and the checks a device makes before it installs one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use chrono::Utc;

use ndarray::{Array4, Axis};
use weld_core::bundle::{self, Bundle};
use weld_core::manifest::{Golden, InputSpec, Lineage, ModelManifest, Quantization};
use weld_core::synth::{self, SynthClass, SynthConfig};
use weld_edge::model::{BundleModel, Model, ModelOptions};

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
    /// Golden inputs carried in the bundle (0: none; devices then run it on tract only).
    pub golden: usize,
    /// Their tolerance; default [`default_tolerance`] of the precision.
    pub golden_tolerance: Option<f32>,
}

/// How far another runtime's logits may be from tract's, relative to the largest logit: f32
/// runtimes differ in summation order only (~1e-6 seen), int8 ones also in rounding (a step
/// of an activation's scale here and there).
pub fn default_tolerance(q: Quantization) -> f32 {
    match q {
        Quantization::F32 => 1e-3,
        Quantization::F16 | Quantization::Int8 => 5e-2,
    }
}

/// `count` inputs for the golden check: synthetic frames of each defect class in turn (RGB and
/// depth, 640x480, fixed seeds), through the shared preprocessing of `input`.
pub fn golden_inputs(input: &InputSpec, count: usize) -> Result<Array4<f32>> {
    let cfg = SynthConfig::default();
    let views: Vec<Array4<f32>> = (0..count)
        .map(|i| {
            let class = SynthClass::ALL[i % SynthClass::ALL.len()];
            let seed = synth::frame_seed(0x601d, i % SynthClass::ALL.len(), i);
            let frame = synth::generate(class, seed, &cfg)?.frame;
            Ok(weld_core::preprocess::preprocess(&frame, input)?)
        })
        .collect::<Result<_>>()?;
    let views: Vec<_> = views.iter().map(|v| v.view()).collect();
    Ok(ndarray::concatenate(Axis(0), &views)?)
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
    let model = load(onnx, &spec.classes, &spec.input, "tract", None)?;
    let (golden, golden_bytes) = if spec.golden > 0 {
        let x = golden_inputs(&spec.input, spec.golden)?;
        let logits = (0..spec.golden)
            .map(|i| model.logits(&x.slice(ndarray::s![i..i + 1, .., .., ..]).to_owned()))
            .collect::<Result<Vec<_>, _>>()?;
        let g = Golden {
            sha256: String::new(), // set by signing
            count: spec.golden,
            logits,
            backend: model.backend_name().into(),
            tolerance: spec
                .golden_tolerance
                .unwrap_or_else(|| default_tolerance(spec.quantization)),
        };
        // What the other runtimes of this build give, for the record: a device picks among
        // the backends that pass (they are not required to here).
        for kind in weld_edge::backend::available()
            .iter()
            .filter(|k| **k != "tract")
        {
            match load(onnx, &spec.classes, &spec.input, kind, None)
                .and_then(|m| Ok(m.check_golden(&g, &x)?))
            {
                Ok(d) => {
                    println!("golden check on {kind}: passes (worst deviation {d:.2e})");
                    metrics.insert(format!("golden_deviation_{kind}"), f64::from(d));
                }
                Err(e) => {
                    println!("golden check on {kind}: fails ({e:#}); devices will not pick {kind}")
                }
            }
        }
        (Some(g), Some(Bundle::golden_bytes(&x)))
    } else {
        (None, None)
    };
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
        golden,
    };
    let signed = Bundle::sign(manifest, bytes, golden_bytes, &signing)?;
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
/// `trusted`, the hashes, that the model loads on `backend` (`auto`: each this build has) and
/// fits the manifest, and that it reproduces the golden outputs.
pub fn load_verified(path: &Path, trusted: &[String], backend: &str) -> Result<BundleModel> {
    let options = ModelOptions {
        backend: backend.to_string(),
        ..ModelOptions::default()
    };
    Ok(Model::from_bundle(path, trusted, &options)?)
}

/// `bundle verify`: [`load_verified`], then what was checked.
pub fn verify(path: &Path, trusted: &[String], backend: &str) -> Result<()> {
    let BundleModel {
        manifest: m,
        signer,
        trials,
        chosen,
        ..
    } = load_verified(path, trusted, backend)?;
    let golden = match &m.golden {
        Some(g) => format!(
            "{} golden inputs (tolerance {:.1e}, logits from {})",
            g.count, g.tolerance, g.backend
        ),
        None => "no golden inputs: devices run it on tract only".into(),
    };
    let resize = match m.input.resize {
        weld_core::manifest::ResizeMode::Stretch => "the frame stretched".to_string(),
        weld_core::manifest::ResizeMode::BeadStrip { across_mm } => {
            format!("a strip along the bead, {across_mm} mm across")
        }
    };
    println!(
        "{}: ok\n  {} {} ({}, {:?}), created {}\n  signed by {}\n  onnx sha256 {}\n  \
         classes {}\n  input {:?} {}x{}, {resize}\n  {golden}",
        path.display(),
        m.name,
        m.version,
        m.architecture,
        m.quantization,
        m.created.to_rfc3339(),
        signer,
        m.onnx_sha256,
        m.classes.join(", "),
        m.input.channels,
        m.input.size[0],
        m.input.size[1],
    );
    for (i, t) in trials.iter().enumerate() {
        match &t.outcome {
            Ok(p) => println!(
                "  {}: loads, runs{}, {:.2} ms an inference{}",
                t.backend,
                if m.golden.is_some() {
                    format!(", reproduces the golden logits (worst {:.2e})", p.deviation)
                } else {
                    String::new()
                },
                p.ms,
                if i == chosen && trials.len() > 1 {
                    " (chosen)"
                } else {
                    ""
                }
            ),
            Err(why) => println!("  {}: not usable: {why}", t.backend),
        }
    }
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
