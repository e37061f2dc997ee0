//! MobileNetV2 (with a width multiplier) and ResNet50 in tch, with 3 or 4 input channels and an
//! N-class head.
//!
//! The layer names follow torchvision's (`features.3.conv.1.0.weight`, `layer2.0.downsample.1`,
//! ...), so a safetensors file of torchvision weights loads by name ([`load_weights`]), and the
//! ONNX exporter walks the same structure.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};
use thiserror::Error;

/// Which network, as the checkpoint and the bundle's manifest name it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum Architecture {
    /// MobileNetV2 with a width multiplier (1.0 is torchvision's).
    MobilenetV2 {
        width: f64,
    },
    Resnet50,
}

impl Architecture {
    /// The manifest's `architecture` string.
    pub fn manifest_name(&self) -> String {
        match self {
            Architecture::MobilenetV2 { width } if (*width - 1.0).abs() < 1e-9 => {
                "mobilenet_v2".into()
            }
            Architecture::MobilenetV2 { width } => format!("mobilenet_v2_{width}"),
            Architecture::Resnet50 => "resnet50".into(),
        }
    }

    /// Parses `mobilenet_v2`, `mobilenet_v2:0.5` or `resnet50`.
    pub fn parse(s: &str, width: f64) -> Result<Architecture, ModelError> {
        match s {
            "mobilenet_v2" | "mobilenetv2" => {
                if !(width.is_finite() && (0.1..=2.0).contains(&width)) {
                    return Err(ModelError::Width(width));
                }
                Ok(Architecture::MobilenetV2 { width })
            }
            "resnet50" => Ok(Architecture::Resnet50),
            other => Err(ModelError::Unknown(other.to_string())),
        }
    }
}

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("unknown architecture {0:?}; expected mobilenet_v2 or resnet50")]
    Unknown(String),
    #[error("--width {0} is out of range; use a width multiplier between 0.1 and 2")]
    Width(f64),
    #[error("{}: {source}", path.display())]
    Load {
        path: std::path::PathBuf,
        source: tch::TchError,
    },
    #[error("{}: {what}", path.display())]
    Weights {
        path: std::path::PathBuf,
        what: String,
    },
}

/// A network: the layers live in the `VarStore` it was built on.
#[derive(Debug)]
pub enum Net {
    MobilenetV2(Box<MobilenetV2>),
    Resnet50(Box<Resnet50>),
}

impl Net {
    /// Builds the network under `p` with `in_channels` inputs and `classes` outputs.
    pub fn new(p: &nn::Path, arch: Architecture, in_channels: i64, classes: i64) -> Net {
        match arch {
            Architecture::MobilenetV2 { width } => {
                Net::MobilenetV2(Box::new(MobilenetV2::new(p, width, in_channels, classes)))
            }
            Architecture::Resnet50 => {
                Net::Resnet50(Box::new(Resnet50::new(p, in_channels, classes)))
            }
        }
    }
}

impl ModuleT for Net {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            Net::MobilenetV2(m) => m.forward_t(xs, train),
            Net::Resnet50(m) => m.forward_t(xs, train),
        }
    }
}

/// A convolution without bias followed by batch norm, as torchvision's `Conv2dNormActivation`
/// and ResNet's conv/bn pairs are; the activation is the caller's.
#[derive(Debug)]
pub struct ConvBn {
    pub conv: nn::Conv2D,
    pub bn: nn::BatchNorm,
    pub stride: i64,
    pub padding: i64,
    pub groups: i64,
}

/// Batch norm's epsilon (torchvision's); the exporter folds it into the convolutions.
pub const BN_EPS: f64 = 1e-5;

/// `conv` and `bn` named as torchvision names them under `p`.
fn conv_bn(
    conv_p: nn::Path,
    bn_p: nn::Path,
    (cin, cout, k): (i64, i64, i64),
    stride: i64,
    groups: i64,
) -> ConvBn {
    let padding = (k - 1) / 2;
    let cfg = nn::ConvConfig {
        stride,
        padding,
        groups,
        bias: false,
        ws_init: nn::Init::Kaiming {
            dist: nn::init::NormalOrUniform::Normal,
            fan: nn::init::FanInOut::FanOut,
            non_linearity: nn::init::NonLinearity::ReLU,
        },
        ..Default::default()
    };
    let bn_cfg = nn::BatchNormConfig {
        eps: BN_EPS,
        ws_init: nn::Init::Const(1.0),
        bs_init: nn::Init::Const(0.0),
        ..Default::default()
    };
    ConvBn {
        conv: nn::conv2d(conv_p, cin, cout, k, cfg),
        bn: nn::batch_norm2d(bn_p, cout, bn_cfg),
        stride,
        padding,
        groups,
    }
}

impl ModuleT for ConvBn {
    /// The weights are cast to the input's kind (a no-op for f32): bf16 training keeps f32
    /// master weights and runs the convolution in bf16, as autocast does; batch norm takes
    /// bf16 input with f32 statistics.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let w = self.conv.ws.to_kind(xs.kind());
        xs.conv2d(
            &w,
            None::<Tensor>,
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            self.groups,
        )
        .apply_t(&self.bn, train)
    }
}

/// A linear layer in the input's kind (see [`ConvBn::forward_t`]).
fn linear_in_kind(l: &nn::Linear, xs: &Tensor) -> Tensor {
    let w = l.ws.to_kind(xs.kind());
    let b = l.bs.as_ref().map(|b| b.to_kind(xs.kind()));
    xs.linear(&w, b.as_ref())
}

/// torchvision's `_make_divisible`: channels rounded to a multiple of 8, never 10% below.
pub fn make_divisible(v: f64, divisor: i64) -> i64 {
    let d = divisor as f64;
    let mut n = ((v + d / 2.0) / d).floor() as i64 * divisor;
    n = n.max(divisor);
    if (n as f64) < 0.9 * v {
        n += divisor;
    }
    n
}

/// One inverted residual block: optional 1x1 expansion, 3x3 depthwise, 1x1 projection.
#[derive(Debug)]
pub struct InvertedResidual {
    pub expand: Option<ConvBn>,
    pub depthwise: ConvBn,
    pub project: ConvBn,
    pub residual: bool,
}

impl ModuleT for InvertedResidual {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut h = match &self.expand {
            Some(e) => e.forward_t(xs, train).relu6(),
            None => xs.shallow_clone(),
        };
        h = self.depthwise.forward_t(&h, train).relu6();
        h = self.project.forward_t(&h, train);
        if self.residual { h + xs } else { h }
    }
}

#[derive(Debug)]
pub struct MobilenetV2 {
    pub stem: ConvBn,
    pub blocks: Vec<InvertedResidual>,
    pub last: ConvBn,
    pub classifier: nn::Linear,
}

/// (expansion, output channels, repeats, first stride) per stage, as in the paper.
const MOBILENET_V2_STAGES: [(i64, i64, usize, i64); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];

impl MobilenetV2 {
    pub fn new(p: &nn::Path, width: f64, in_channels: i64, classes: i64) -> MobilenetV2 {
        let f = p / "features";
        let mut cin = make_divisible(32.0 * width, 8);
        let stem = conv_bn(&f / 0 / 0, &f / 0 / 1, (in_channels, cin, 3), 2, 1);
        let mut blocks = Vec::new();
        let mut idx = 1;
        for (t, c, n, s) in MOBILENET_V2_STAGES {
            let cout = make_divisible(c as f64 * width, 8);
            for i in 0..n {
                let stride = if i == 0 { s } else { 1 };
                let hidden = cin * t;
                let b = &f / idx / "conv";
                let (expand, dw_at) = if t != 1 {
                    (
                        Some(conv_bn(&b / 0 / 0, &b / 0 / 1, (cin, hidden, 1), 1, 1)),
                        1,
                    )
                } else {
                    (None, 0)
                };
                let depthwise = conv_bn(
                    &b / dw_at / 0,
                    &b / dw_at / 1,
                    (hidden, hidden, 3),
                    stride,
                    hidden,
                );
                let project = conv_bn(&b / (dw_at + 1), &b / (dw_at + 2), (hidden, cout, 1), 1, 1);
                blocks.push(InvertedResidual {
                    expand,
                    depthwise,
                    project,
                    residual: stride == 1 && cin == cout,
                });
                cin = cout;
                idx += 1;
            }
        }
        let last_c = make_divisible(1280.0 * width.max(1.0), 8);
        let last = conv_bn(&f / idx / 0, &f / idx / 1, (cin, last_c, 1), 1, 1);
        let classifier = linear(&(p / "classifier" / 1), last_c, classes);
        MobilenetV2 {
            stem,
            blocks,
            last,
            classifier,
        }
    }
}

/// A linear layer initialised as torchvision's classifiers are (normal, std 0.01, zero bias).
fn linear(p: &nn::Path, cin: i64, cout: i64) -> nn::Linear {
    nn::linear(
        p,
        cin,
        cout,
        nn::LinearConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 0.01,
            },
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        },
    )
}

impl ModuleT for MobilenetV2 {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut h = self.stem.forward_t(xs, train).relu6();
        for b in &self.blocks {
            h = b.forward_t(&h, train);
        }
        h = self.last.forward_t(&h, train).relu6();
        let pooled = h
            .adaptive_avg_pool2d([1, 1])
            .flatten(1, -1)
            .dropout(0.2, train);
        linear_in_kind(&self.classifier, &pooled)
    }
}

/// ResNet's bottleneck: 1x1, 3x3 (with the stride), 1x1 to 4x the width, plus the shortcut.
#[derive(Debug)]
pub struct Bottleneck {
    pub c1: ConvBn,
    pub c2: ConvBn,
    pub c3: ConvBn,
    pub downsample: Option<ConvBn>,
}

impl ModuleT for Bottleneck {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let h = self.c1.forward_t(xs, train).relu();
        let h = self.c2.forward_t(&h, train).relu();
        let h = self.c3.forward_t(&h, train);
        let short = match &self.downsample {
            Some(d) => d.forward_t(xs, train),
            None => xs.shallow_clone(),
        };
        (h + short).relu()
    }
}

#[derive(Debug)]
pub struct Resnet50 {
    pub stem: ConvBn,
    pub layers: Vec<Vec<Bottleneck>>,
    pub fc: nn::Linear,
}

impl Resnet50 {
    pub fn new(p: &nn::Path, in_channels: i64, classes: i64) -> Resnet50 {
        let stem = conv_bn(p / "conv1", p / "bn1", (in_channels, 64, 7), 2, 1);
        let mut cin = 64;
        let mut layers = Vec::new();
        for (li, (planes, blocks, stride)) in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]
            .into_iter()
            .enumerate()
        {
            let lp = p / format!("layer{}", li + 1);
            let mut layer = Vec::new();
            for bi in 0..blocks {
                let b = &lp / bi;
                let s = if bi == 0 { stride } else { 1 };
                let cout = planes * 4;
                let downsample = (bi == 0 && (s != 1 || cin != cout)).then(|| {
                    conv_bn(
                        &b / "downsample" / 0,
                        &b / "downsample" / 1,
                        (cin, cout, 1),
                        s,
                        1,
                    )
                });
                layer.push(Bottleneck {
                    c1: conv_bn(&b / "conv1", &b / "bn1", (cin, planes, 1), 1, 1),
                    c2: conv_bn(&b / "conv2", &b / "bn2", (planes, planes, 3), s, 1),
                    c3: conv_bn(&b / "conv3", &b / "bn3", (planes, cout, 1), 1, 1),
                    downsample,
                });
                cin = cout;
            }
            layers.push(layer);
        }
        let fc = nn::linear(p / "fc", 2048, classes, Default::default());
        Resnet50 { stem, layers, fc }
    }
}

impl ModuleT for Resnet50 {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut h =
            self.stem
                .forward_t(xs, train)
                .relu()
                .max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        for layer in &self.layers {
            for b in layer {
                h = b.forward_t(&h, train);
            }
        }
        linear_in_kind(&self.fc, &h.adaptive_avg_pool2d([1, 1]).flatten(1, -1))
    }
}

/// What [`load_weights`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub loaded: usize,
    /// The first convolution widened from 3 to 4 input channels (the extra one starts as the
    /// mean of the colour filters).
    pub widened: Vec<String>,
    /// Variables of another shape (a head for other classes): kept as initialised.
    pub skipped: Vec<String>,
    /// Variables of the network the file does not have.
    pub missing: Vec<String>,
}

/// Starts `vs` from a safetensors file of weights with torchvision's names (from another
/// checkpoint of this trainer, or converted from torchvision). Tensors of the first
/// convolution with 3 input channels fill a 4-channel one; heads of another size are skipped.
pub fn load_weights(vs: &nn::VarStore, path: &Path) -> Result<LoadReport, ModelError> {
    let tensors = Tensor::read_safetensors(path).map_err(|source| ModelError::Load {
        path: path.to_path_buf(),
        source,
    })?;
    let file: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
    let mut report = LoadReport::default();
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (name, mut var) in vars {
            let Some(src) = file.get(&name) else {
                report.missing.push(name);
                continue;
            };
            let src = src.to_kind(var.kind()).to_device(var.device());
            let (want, have) = (var.size(), src.size());
            if want == have {
                var.copy_(&src);
                report.loaded += 1;
            } else if want.len() == 4 && have.len() == 4 && have[1] == 3 && want[1] == 4 && {
                want[0] == have[0] && want[2..] == have[2..]
            } {
                let extra = src.mean_dim(1, true, Kind::Float);
                var.copy_(&Tensor::cat(&[src, extra], 1));
                report.widened.push(name);
                report.loaded += 1;
            } else {
                report
                    .skipped
                    .push(format!("{name} {have:?} (model has {want:?})"));
            }
        }
    });
    if report.loaded == 0 {
        return Err(ModelError::Weights {
            path: path.to_path_buf(),
            what: "no tensor of this file has a name of the network; is it weights for another \
                   architecture?"
                .into(),
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test
    use super::*;
    use tch::Device;

    fn params(vs: &nn::VarStore) -> i64 {
        vs.trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum()
    }

    #[test]
    fn parameter_counts_match_torchvision() {
        // torchvision: mobilenet_v2() 3,504,872 and resnet50() 25,557,032 parameters
        // with 1000 classes.
        let vs = nn::VarStore::new(Device::Cpu);
        let _m = Net::new(
            &vs.root(),
            Architecture::MobilenetV2 { width: 1.0 },
            3,
            1000,
        );
        assert_eq!(params(&vs), 3_504_872);
        let vs = nn::VarStore::new(Device::Cpu);
        let _m = Net::new(&vs.root(), Architecture::Resnet50, 3, 1000);
        assert_eq!(params(&vs), 25_557_032);
        // The names are torchvision's.
        let names = vs.variables();
        for n in [
            "conv1.weight",
            "layer2.0.downsample.1.running_var",
            "fc.bias",
        ] {
            assert!(names.contains_key(n), "{n}");
        }
    }

    #[test]
    fn four_channel_network_starts_from_three_channel_weights() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.safetensors");
        let arch = Architecture::MobilenetV2 { width: 0.35 };
        let vs3 = nn::VarStore::new(Device::Cpu);
        let _m3 = Net::new(&vs3.root(), arch, 3, 7);
        vs3.save(&file).unwrap();
        let vs4 = nn::VarStore::new(Device::Cpu);
        let m4 = Net::new(&vs4.root(), arch, 4, 5);
        let r = load_weights(&vs4, &file).unwrap();
        assert_eq!(r.widened, ["features.0.0.weight"]);
        assert_eq!(r.skipped.len(), 2, "{:?}", r.skipped); // the head: weight and bias
        assert!(r.missing.is_empty());
        let w3 = vs3.variables()["features.0.0.weight"].shallow_clone();
        let w4 = vs4.variables()["features.0.0.weight"].shallow_clone();
        assert!(w4.narrow(1, 0, 3).allclose(&w3, 0.0, 0.0, false));
        assert!(
            w4.narrow(1, 3, 1)
                .allclose(&w3.mean_dim(1, true, Kind::Float), 1e-6, 1e-7, false)
        );
        let y = m4.forward_t(
            &Tensor::zeros([2, 4, 64, 64], (Kind::Float, Device::Cpu)),
            false,
        );
        assert_eq!(y.size(), [2, 5]);
        assert!(load_weights(&vs4, Path::new("/nonexistent.safetensors")).is_err());
    }
}
