//! `weld-trainer export`: a checkpoint's network as ONNX (opset 17), written in Rust from the
//! tch weights, with every batch norm folded into the convolution before it, then checked:
//! the file loads in tract and its logits match tch's own forward.
//!
//! The graph is the network's own structure ([`Net`]), walked layer by layer: Conv (bias from
//! the folded batch norm), Clip(0, 6) for ReLU6, Relu, Add for residuals, MaxPool,
//! GlobalAveragePool, Flatten and Gemm. Nothing else, so tract, ONNX Runtime and the
//! quantizer all see the same few operators.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ndarray::Array4;
use prost::Message;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};
use tract_onnx::pb;

use crate::card::{CARD_FORMAT, ModelCard};
use crate::onnx::{Attr, Graph, OUTPUT};
use crate::torch::models::{BN_EPS, ConvBn, InvertedResidual, Net};
use crate::torch::train::{Checkpoint, load_checkpoint};
use weld_core::manifest::{Lineage, Quantization};

/// Largest difference allowed between tch's logits and the exported model's.
pub const PARITY_TOLERANCE: f32 = 1e-4;

/// A tensor's values as row-major f32 on the CPU.
fn values(t: &Tensor) -> Result<Vec<f32>> {
    Vec::<f32>::try_from(
        t.detach()
            .to_kind(Kind::Float)
            .to_device(Device::Cpu)
            .contiguous()
            .flatten(0, -1),
    )
    .context("reading a tensor of the network")
}

/// The convolution's weights with the batch norm after it folded in:
/// `w' = w * gamma / sqrt(var + eps)` per output channel, `b' = beta - mean * gamma /
/// sqrt(var + eps)` (computed in f64).
fn fold(cb: &ConvBn) -> Result<(Vec<usize>, Vec<f32>, Vec<f32>)> {
    let dims: Vec<usize> = cb.conv.ws.size().iter().map(|&d| d as usize).collect();
    let w = values(&cb.conv.ws)?;
    let cout = dims[0];
    let mean = values(&cb.bn.running_mean)?;
    let var = values(&cb.bn.running_var)?;
    let gamma = match &cb.bn.ws {
        Some(t) => values(t)?,
        None => vec![1.0; cout],
    };
    let beta = match &cb.bn.bs {
        Some(t) => values(t)?,
        None => vec![0.0; cout],
    };
    let per = w.len() / cout;
    let mut wf = Vec::with_capacity(w.len());
    let mut bf = Vec::with_capacity(cout);
    for o in 0..cout {
        let scale = f64::from(gamma[o]) / (f64::from(var[o]) + BN_EPS).sqrt();
        wf.extend(
            w[o * per..(o + 1) * per]
                .iter()
                .map(|&v| (f64::from(v) * scale) as f32),
        );
        bf.push((f64::from(beta[o]) - f64::from(mean[o]) * scale) as f32);
    }
    Ok((dims, wf, bf))
}

/// Walks a network into a [`Graph`].
struct Writer {
    g: Graph,
}

impl Writer {
    /// Conv + folded batch norm named `name`, reading `x`.
    fn conv_bn(&mut self, name: &str, x: &str, cb: &ConvBn) -> Result<String> {
        let (dims, w, b) = fold(cb)?;
        let wn = self.g.constant(&format!("{name}.weight"), &dims, &w);
        let bn = self.g.constant(&format!("{name}.bias"), &[dims[0]], &b);
        Ok(self.g.conv(
            name,
            x,
            &wn,
            &bn,
            dims[3],
            cb.stride as usize,
            cb.padding as usize,
            cb.groups as usize,
        ))
    }

    fn inverted_residual(&mut self, name: &str, x: &str, b: &InvertedResidual) -> Result<String> {
        let mut h = x.to_string();
        if let Some(e) = &b.expand {
            let c = self.conv_bn(&format!("{name}.expand"), &h, e)?;
            h = self.g.relu6(&format!("{name}.expand.relu6"), &c);
        }
        let c = self.conv_bn(&format!("{name}.depthwise"), &h, &b.depthwise)?;
        h = self.g.relu6(&format!("{name}.depthwise.relu6"), &c);
        h = self.conv_bn(&format!("{name}.project"), &h, &b.project)?;
        if b.residual {
            h = self.g.node("Add", &format!("{name}.add"), &[&h, x], &[]);
        }
        Ok(h)
    }

    /// Global average pool, flatten and the linear classifier (`Gemm`, weight `[out, in]`).
    fn head(&mut self, x: &str, linear: &nn::Linear) -> Result<String> {
        let p = self.g.node("GlobalAveragePool", "pool", &[x], &[]);
        let f = self
            .g
            .node("Flatten", "flatten", &[&p], &[("axis", Attr::Int(1))]);
        let dims: Vec<usize> = linear.ws.size().iter().map(|&d| d as usize).collect();
        let w = self
            .g
            .constant("classifier.weight", &dims, &values(&linear.ws)?);
        let bias = match &linear.bs {
            Some(b) => values(b)?,
            None => vec![0.0; dims[0]],
        };
        let b = self.g.constant("classifier.bias", &[dims[0]], &bias);
        Ok(self
            .g
            .node("Gemm", OUTPUT, &[&f, &w, &b], &[("transB", Attr::Int(1))]))
    }

    fn net(&mut self, net: &Net) -> Result<()> {
        match net {
            Net::MobilenetV2(m) => {
                let c = self.conv_bn("stem", crate::onnx::INPUT, &m.stem)?;
                let mut h = self.g.relu6("stem.relu6", &c);
                for (i, b) in m.blocks.iter().enumerate() {
                    h = self.inverted_residual(&format!("block{}", i + 1), &h, b)?;
                }
                let c = self.conv_bn("last", &h, &m.last)?;
                let h = self.g.relu6("last.relu6", &c);
                self.head(&h, &m.classifier)?;
            }
            Net::Resnet50(r) => {
                let c = self.conv_bn("stem", crate::onnx::INPUT, &r.stem)?;
                let h = self.g.node("Relu", "stem.relu", &[&c], &[]);
                let mut h = self.g.node(
                    "MaxPool",
                    "stem.maxpool",
                    &[&h],
                    &[
                        ("kernel_shape", Attr::Ints(vec![3, 3])),
                        ("strides", Attr::Ints(vec![2, 2])),
                        ("pads", Attr::Ints(vec![1, 1, 1, 1])),
                    ],
                );
                for (li, layer) in r.layers.iter().enumerate() {
                    for (bi, b) in layer.iter().enumerate() {
                        let n = format!("layer{}.{bi}", li + 1);
                        let c1 = self.conv_bn(&format!("{n}.conv1"), &h, &b.c1)?;
                        let r1 = self.g.node("Relu", &format!("{n}.relu1"), &[&c1], &[]);
                        let c2 = self.conv_bn(&format!("{n}.conv2"), &r1, &b.c2)?;
                        let r2 = self.g.node("Relu", &format!("{n}.relu2"), &[&c2], &[]);
                        let c3 = self.conv_bn(&format!("{n}.conv3"), &r2, &b.c3)?;
                        let short = match &b.downsample {
                            Some(d) => self.conv_bn(&format!("{n}.downsample"), &h, d)?,
                            None => h.clone(),
                        };
                        let s = self.g.node("Add", &format!("{n}.add"), &[&c3, &short], &[]);
                        h = self.g.node("Relu", &format!("{n}.relu"), &[&s], &[]);
                    }
                }
                self.head(&h, &r.fc)?;
            }
        }
        Ok(())
    }
}

/// The ONNX model of `net` for inputs `[batch, channels, h, w]`.
pub fn to_onnx(
    net: &Net,
    (channels, h, w): (usize, usize, usize),
    classes: usize,
    doc: &str,
) -> Result<pb::ModelProto> {
    let mut wr = Writer { g: Graph::new() };
    tch::no_grad(|| wr.net(net))?;
    Ok(wr.g.model((channels, h, w), classes, doc))
}

/// The card of a checkpoint's f32 export: its classes, input, figures and lineage.
pub fn card_of(c: &Checkpoint) -> Result<ModelCard> {
    let mut metrics = std::collections::BTreeMap::new();
    if let Some(m) = &c.metrics {
        metrics.insert("val_accuracy".to_string(), m.val_accuracy);
        metrics.insert("val_macro_f1".to_string(), m.val_macro_f1);
    }
    let mut training_config =
        serde_json::to_value(&c.config).context("encoding the training config")?;
    if let Some(o) = training_config.as_object_mut() {
        o.insert("epoch".into(), c.epoch.into());
        o.insert("best_epoch".into(), c.best_epoch.into());
    }
    Ok(ModelCard {
        format: CARD_FORMAT.into(),
        architecture: c.architecture.manifest_name(),
        classes: c.classes.clone(),
        input: c.input.clone(),
        quantization: Quantization::F32,
        metrics,
        lineage: Lineage {
            dataset_hash: c.dataset_version.clone(),
            training_config,
        },
    })
}

/// `count` seeded inputs `[1, c, h, w]` of standard normal values: the scale of normalised
/// images, and with no structure a folding or layout mistake could hide behind.
pub fn probe_inputs(shape: [usize; 4], count: usize, seed: u64) -> Vec<Array4<f32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..count)
        .map(|_| Array4::from_shape_simple_fn(shape, || StandardNormal.sample(&mut rng)))
        .collect()
}

/// tch's logits for `x` (evaluation mode).
pub fn tch_logits(vs: &nn::VarStore, net: &Net, x: &Array4<f32>) -> Result<Vec<f32>> {
    let shape: Vec<i64> = x.shape().iter().map(|&d| d as i64).collect();
    let data: Vec<f32> = x.iter().copied().collect();
    let t = Tensor::from_slice(&data)
        .view(shape.as_slice())
        .to_device(vs.device());
    values(&tch::no_grad(|| net.forward_t(&t, false)))
}

/// What `export` wrote and measured.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub onnx: PathBuf,
    pub card: PathBuf,
    pub bytes: usize,
    pub nodes: usize,
    /// Largest |tch - tract| over the probe inputs' logits.
    pub max_abs_diff: f32,
}

/// `weld-trainer export`: writes `out` and its card, after checking the model in tract.
pub fn export(checkpoint: &Path, out: &Path) -> Result<ExportReport> {
    let (c, vs, net) = load_checkpoint(checkpoint, Device::Cpu)?;
    let [w, h] = c.input.size;
    let shape = [1, c.input.channels.len(), h as usize, w as usize];
    let doc = format!(
        "{} for {} from {} (epoch {}, dataset {})",
        c.architecture.manifest_name(),
        c.classes.join(", "),
        checkpoint.display(),
        c.epoch,
        crate::versions::short(&c.dataset_version)
    );
    let model = to_onnx(&net, (shape[1], shape[2], shape[3]), c.classes.len(), &doc)?;
    let nodes = model.graph.as_ref().map_or(0, |g| g.node.len());
    let bytes = model.encode_to_vec();
    let tmp = crate::onnx::write_beside_unchecked(out, &bytes)?;
    let max_abs_diff = parity(tmp.path(), &vs, &net, shape)?;
    if max_abs_diff > PARITY_TOLERANCE {
        bail!(
            "the exported model's logits differ from the checkpoint's by {max_abs_diff:.2e} \
             (allowed {PARITY_TOLERANCE:.0e}); nothing was written"
        );
    }
    tmp.persist(out)
        .with_context(|| format!("writing {}", out.display()))?;
    let card = card_of(&c)?.write_beside(out)?;
    Ok(ExportReport {
        onnx: out.to_owned(),
        card,
        bytes: bytes.len(),
        nodes,
        max_abs_diff,
    })
}

/// Largest |tch - tract| over 4 probe inputs.
fn parity(onnx: &Path, vs: &nn::VarStore, net: &Net, shape: [usize; 4]) -> Result<f32> {
    let b = weld_edge::backend::load("tract", onnx, shape, 1)
        .context("the exported model does not load in tract")?;
    let mut worst = 0.0f32;
    for x in probe_inputs(shape, 4, 17) {
        let want = tch_logits(vs, net, &x)?;
        let got = b.infer(x.view())?;
        if got.len() != want.len() {
            bail!(
                "the exported model gives {} logits, the checkpoint {}",
                got.len(),
                want.len()
            );
        }
        for (a, b) in got.iter().zip(&want) {
            worst = worst.max((a - b).abs());
        }
    }
    Ok(worst)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test
    use super::*;
    use crate::torch::models::Architecture;

    /// A network whose batch norms are not the identity: random statistics, scales and
    /// shifts, so that a folding mistake shows in the logits.
    fn random_net(arch: Architecture, channels: i64, classes: i64) -> (nn::VarStore, Net) {
        tch::manual_seed(7);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Net::new(&vs.root(), arch, channels, classes);
        tch::no_grad(|| {
            for (name, mut t) in vs.variables() {
                if t.dim() == 2 {
                    // The classifier: logits of a few units, not torchvision's ~0.01.
                    t.copy_(&(Tensor::randn_like(&t) * 0.3));
                    continue;
                }
                if t.dim() != 1 {
                    continue;
                }
                let r = Tensor::rand_like(&t);
                if name.ends_with("running_var") {
                    t.copy_(&(r * 1.5 + 0.5));
                } else if name.ends_with("bn3.weight") {
                    // Small last scales in ResNet's residual branches, as trained networks
                    // have: else 16 blocks of random gains give logits in the thousands.
                    t.copy_(&(r * 0.2 + 0.05));
                } else if name.ends_with("weight") {
                    t.copy_(&(r + 0.5));
                } else {
                    t.copy_(&(r - 0.5));
                }
            }
        });
        (vs, net)
    }

    fn write(dir: &Path, name: &str, net: &Net, shape: [usize; 4], classes: usize) -> PathBuf {
        let m = to_onnx(net, (shape[1], shape[2], shape[3]), classes, "test").unwrap();
        let path = dir.join(name);
        std::fs::write(&path, m.encode_to_vec()).unwrap();
        path
    }

    /// Largest |backend - tch| over 3 probe inputs.
    fn max_diff(
        backend: &str,
        path: &Path,
        vs: &nn::VarStore,
        net: &Net,
        shape: [usize; 4],
    ) -> f32 {
        let b = weld_edge::backend::load(backend, path, shape, 1).unwrap();
        let mut worst = 0.0f32;
        for x in probe_inputs(shape, 3, 5) {
            let want = tch_logits(vs, net, &x).unwrap();
            let got = b.infer(x.view()).unwrap();
            assert_eq!(got.len(), want.len());
            // Logits of a few units that vary: a tolerance of 1e-4 means something.
            assert!(want.iter().any(|v| (v - want[0]).abs() > 0.1), "{want:?}");
            assert!(want.iter().any(|v| v.abs() > 0.5), "{want:?}");
            for (a, b) in got.iter().zip(&want) {
                worst = worst.max((a - b).abs());
            }
        }
        worst
    }

    /// `onnx.checker.check_model(full_check=True)` from Python's `onnx`, which the test script
    /// installs into `.tools/onnx`.
    fn onnx_checker(path: &Path) {
        let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/onnx");
        assert!(
            lib.join("onnx").is_dir(),
            "Python's onnx is not in {}: run tests/run.sh, which installs it",
            lib.display()
        );
        let out = std::process::Command::new("python3")
            .env("PYTHONPATH", &lib)
            .args([
                "-c",
                "import sys, onnx; onnx.checker.check_model(sys.argv[1], full_check=True)",
            ])
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "onnx.checker refused {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn ops(path: &Path) -> std::collections::BTreeSet<String> {
        let m = pb::ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap();
        m.graph
            .unwrap()
            .node
            .into_iter()
            .map(|n| n.op_type)
            .collect()
    }

    #[test]
    fn mobilenet_v2_with_height_matches_tch_in_tract_and_onnx_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let (vs, net) = random_net(Architecture::MobilenetV2 { width: 0.35 }, 4, 3);
        // Not square: a height/width mix-up would not load or would differ.
        let shape = [1, 4, 48, 64];
        let path = write(dir.path(), "m.onnx", &net, shape, 3);
        let d = max_diff("tract", &path, &vs, &net, shape);
        assert!(d <= PARITY_TOLERANCE, "tract differs by {d}");
        #[cfg(feature = "ort")]
        {
            let d = max_diff("ort", &path, &vs, &net, shape);
            assert!(d <= PARITY_TOLERANCE, "ONNX Runtime differs by {d}");
        }
        onnx_checker(&path);
        let want: std::collections::BTreeSet<String> = [
            "Conv",
            "Clip",
            "Add",
            "GlobalAveragePool",
            "Flatten",
            "Gemm",
        ]
        .map(String::from)
        .into();
        assert_eq!(ops(&path), want, "batch norm folded, nothing else");
    }

    #[test]
    fn resnet50_matches_tch_in_tract_and_onnx_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let (vs, net) = random_net(Architecture::Resnet50, 3, 5);
        let shape = [1, 3, 64, 64];
        let path = write(dir.path(), "r.onnx", &net, shape, 5);
        let d = max_diff("tract", &path, &vs, &net, shape);
        assert!(d <= PARITY_TOLERANCE, "tract differs by {d}");
        #[cfg(feature = "ort")]
        {
            let d = max_diff("ort", &path, &vs, &net, shape);
            assert!(d <= PARITY_TOLERANCE, "ONNX Runtime differs by {d}");
        }
        onnx_checker(&path);
        assert!(!ops(&path).contains("BatchNormalization"));
    }

    #[test]
    fn folding_matches_conv_then_batch_norm() {
        // One ConvBn alone, against tch's conv + batch norm in evaluation mode.
        let (vs, net) = random_net(Architecture::MobilenetV2 { width: 0.35 }, 3, 2);
        let Net::MobilenetV2(m) = &net else {
            unreachable!()
        };
        let x = Tensor::randn([1, 3, 16, 16], (Kind::Float, Device::Cpu));
        let want = tch::no_grad(|| m.stem.forward_t(&x, false));
        let (dims, w, b) = fold(&m.stem).unwrap();
        let dims: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        let wt = Tensor::from_slice(&w).view(dims.as_slice());
        let bt = Tensor::from_slice(&b);
        let got = x.conv2d(&wt, Some(&bt), [2, 2], [1, 1], [1, 1], 1);
        let diff = f64::try_from((got - want).abs().max()).unwrap();
        assert!(diff < 1e-5, "{diff}");
        drop(vs);
    }
}
