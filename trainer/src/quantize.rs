//! `weld-trainer quantize`: post-training int8 of an exported model, in the form tract runs
//! fastest (docs/PERFORMANCE.md "Quantization" has the measurements behind each choice).
//!
//! tract dequantizes QDQ models to f32 (slower than f32), and has real int8 kernels only
//! behind `QLinearConv`/`QLinearMatMul`; its int8 depthwise convolution is a per-group matmul
//! far slower than its f32 depthwise kernel. So the pointwise (1x1) convolutions, where
//! almost all of MobileNetV2's arithmetic is, become `QLinearConv` with int8 weights
//! (symmetric; per tensor, which tract folds into its kernel, unless that costs more than a
//! point of held-out accuracy, then per output channel) and int8 activations, and their ReLU6 is
//! folded into the output range (zero point -128, so saturation is the clip). Depthwise and
//! strided convolutions, residual adds and the head stay f32, with `DequantizeLinear` and
//! `QuantizeLinear` where the two meet. Activation ranges come from running the f32 model in
//! tract over calibration frames, with every intermediate tensor as an output.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use ndarray::Array4;
use prost::Message;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rayon::prelude::*;
use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::prelude::{
    DatumType, Framework, InferenceFact, InferenceModelExt, IntoRunnable, Tensor, tvec,
};
use weld_core::dataset::{Dataset, Sample};
use weld_core::manifest::Quantization;

use crate::card::ModelCard;
use crate::onnx::{Attr, Graph, INPUT, OUTPUT};
use crate::versions::{self, Part, Split};

/// How activation ranges are taken from the calibration frames.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RangeMethod {
    /// The smallest and largest value seen.
    MinMax,
    /// Per frame, this percentile of |value| (e.g. 99.99), averaged over the frames: one
    /// outlier pixel does not stretch the scale for all the others.
    Percentile(f64),
}

/// Which convolutions run in int8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConvSelect {
    /// 1x1, group 1 (MobileNetV2's expand and project, ResNet's 1x1s).
    Pointwise,
    /// Every convolution but depthwise ones.
    Dense,
    /// Every convolution (tract's int8 depthwise path is slow; for measurement).
    All,
}

/// The int8 form written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheme {
    pub convs: ConvSelect,
    /// One weight scale per output channel (else one per tensor).
    pub per_channel: bool,
    /// Tensors that are never negative (after ReLU/ReLU6) use zero point -128 and the full
    /// 8 bits, the clip folded into saturation; else every activation is symmetric (zero
    /// point 0) and ReLU6 is an int8 `Clip`.
    pub unsigned_relu: bool,
}

impl Default for Scheme {
    fn default() -> Scheme {
        Scheme {
            convs: ConvSelect::Pointwise,
            per_channel: true,
            unsigned_relu: true,
        }
    }
}

/// Weight scales: one per output channel, one per tensor, or measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightScales {
    /// One per tensor when that costs at most 1 point of held-out accuracy, else per channel.
    Auto,
    PerChannel,
    PerTensor,
}

/// The held-out accuracy the faster per-tensor form may lose against f32 and still be kept:
/// the loss a device accepts when it picks an int8 bundle over the f32 one.
use weld_edge::model::MAX_ACCURACY_DROP;

#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    pub dataset: PathBuf,
    /// Calibrate on its train part and judge on its test part (val when test is empty).
    pub split: Option<PathBuf>,
    pub calibration_frames: usize,
    pub range: RangeMethod,
    /// The form; its `per_channel` is decided by `weights`.
    pub scheme: Scheme,
    pub weights: WeightScales,
    /// Seed of the choice of calibration frames.
    pub seed: u64,
}

/// A tensor's value range over the calibration frames.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Range {
    min: f32,
    max: f32,
}

/// int8 parameters of one tensor: `real = (q - zero_point) * scale`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct QParams {
    scale: f32,
    zero_point: i8,
}

impl QParams {
    fn of(r: Range, unsigned_relu: bool) -> QParams {
        if unsigned_relu && r.min >= 0.0 {
            QParams {
                scale: (r.max / 255.0).max(1e-8),
                zero_point: -128,
            }
        } else {
            QParams {
                scale: (r.min.abs().max(r.max.abs()) / 127.0).max(1e-8),
                zero_point: 0,
            }
        }
    }
}

/// An f32 model as the exporter writes it: nodes in order and f32 constants by name.
struct F32Model {
    proto: pb::ModelProto,
    consts: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

fn attr_ints(n: &pb::NodeProto, name: &str) -> Option<Vec<i64>> {
    n.attribute
        .iter()
        .find(|a| a.name == name)
        .map(|a| a.ints.clone())
}

fn attr_int(n: &pb::NodeProto, name: &str) -> Option<i64> {
    n.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

/// The operators the quantizer understands: what `export` writes.
const KNOWN_OPS: [&str; 8] = [
    "Conv",
    "Clip",
    "Relu",
    "Add",
    "MaxPool",
    "GlobalAveragePool",
    "Flatten",
    "Gemm",
];

impl F32Model {
    fn read(path: &Path) -> Result<F32Model> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let proto = pb::ModelProto::decode(bytes.as_slice())
            .with_context(|| format!("{}: not an ONNX model", path.display()))?;
        let graph = proto
            .graph
            .as_ref()
            .with_context(|| format!("{}: the model has no graph", path.display()))?;
        let unknown: std::collections::BTreeSet<&str> = graph
            .node
            .iter()
            .map(|n| n.op_type.as_str())
            .filter(|op| !KNOWN_OPS.contains(op))
            .collect();
        if !unknown.is_empty() {
            bail!(
                "{}: the quantizer reads models written by `weld-trainer export`; this one has \
                 {} (an f32 model with only {} is expected)",
                path.display(),
                unknown.into_iter().collect::<Vec<_>>().join(", "),
                KNOWN_OPS.join(", ")
            );
        }
        let mut consts = HashMap::new();
        for t in &graph.initializer {
            if t.data_type != DataType::Float as i32 {
                bail!(
                    "{}: initializer {} is not f32: is the model already quantized?",
                    path.display(),
                    t.name
                );
            }
            let data: Vec<f32> = if !t.raw_data.is_empty() {
                t.raw_data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            } else {
                t.float_data.clone()
            };
            let dims: Vec<usize> = t.dims.iter().map(|&d| d.max(0) as usize).collect();
            if dims.iter().product::<usize>() != data.len() {
                bail!(
                    "{}: initializer {} holds {} values for dims {:?}",
                    path.display(),
                    t.name,
                    data.len(),
                    dims
                );
            }
            consts.insert(t.name.clone(), (dims, data));
        }
        Ok(F32Model { proto, consts })
    }

    fn nodes(&self) -> &[pb::NodeProto] {
        self.proto.graph.as_ref().map_or(&[], |g| &g.node)
    }
}

/// Whether a Conv node runs in int8 under `select`.
fn conv_selected(n: &pb::NodeProto, weight_dims: &[usize], select: ConvSelect) -> bool {
    let group = attr_int(n, "group").unwrap_or(1);
    let kernel = attr_ints(n, "kernel_shape").unwrap_or_default();
    let depthwise = group > 1 && group as usize == weight_dims.first().copied().unwrap_or(0);
    match select {
        ConvSelect::Pointwise => group == 1 && kernel == [1, 1],
        ConvSelect::Dense => !depthwise,
        ConvSelect::All => true,
    }
}

/// Runs the f32 model over `inputs` with every node's output as a model output; returns
/// each tensor's range.
fn calibrate(
    model: &F32Model,
    inputs: &[Array4<f32>],
    method: RangeMethod,
) -> Result<HashMap<String, Range>> {
    let shape = inputs
        .first()
        .map(|x| x.shape().to_vec())
        .context("no calibration frames")?;
    let mut names: Vec<String> = model
        .nodes()
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .collect();
    names.dedup();
    let onnx = tract_onnx::onnx().with_ignore_value_info(true);
    let mut parsed = onnx
        .model_for_proto_model(&model.proto)
        .context("tract cannot read the f32 model")?;
    parsed.select_outputs_by_name(&names)?;
    let plan = parsed
        .with_input_fact(0, InferenceFact::dt_shape(DatumType::F32, shape.as_slice()))?
        .into_optimized()?
        .into_runnable()?;
    let per_frame: Vec<Vec<Range>> = inputs
        .par_iter()
        .map(|x| -> Result<Vec<Range>> {
            let outs = plan.run(tvec!(Tensor::from(x.clone()).into()))?;
            outs.iter()
                .map(|t| {
                    let v = t.to_plain_array_view::<f32>()?;
                    let (min, max) = v
                        .iter()
                        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
                            (a.min(x), b.max(x))
                        });
                    Ok(match method {
                        RangeMethod::MinMax => Range { min, max },
                        RangeMethod::Percentile(p) => {
                            let mut abs: Vec<f32> = v.iter().map(|x| x.abs()).collect();
                            let k = (((p / 100.0) * abs.len() as f64) as usize)
                                .min(abs.len().saturating_sub(1));
                            let (_, q, _) = abs.select_nth_unstable_by(k, f32::total_cmp);
                            let q = *q;
                            Range {
                                min: min.max(-q),
                                max: max.min(q),
                            }
                        }
                    })
                })
                .collect()
        })
        .collect::<Result<_>>()?;
    let mut out = HashMap::new();
    for (i, name) in names.iter().enumerate() {
        let rs = per_frame.iter().map(|f| f[i]);
        let r = match method {
            RangeMethod::MinMax => rs.fold(
                Range {
                    min: f32::INFINITY,
                    max: f32::NEG_INFINITY,
                },
                |a, r| Range {
                    min: a.min.min(r.min),
                    max: a.max.max(r.max),
                },
            ),
            RangeMethod::Percentile(_) => {
                let n = per_frame.len() as f32;
                let (min, max) = rs.fold((0.0, 0.0), |(a, b), r| (a + r.min / n, b + r.max / n));
                Range { min, max }
            }
        };
        out.insert(name.clone(), r);
    }
    Ok(out)
}

/// Symmetric int8 weights of a conv `[cout, cin/g, k, k]`: values and one scale per output
/// channel (or one for all).
fn quantize_weights(w: &[f32], cout: usize, per_channel: bool) -> (Vec<i8>, Vec<f32>) {
    let per = w.len() / cout;
    let absmax = |s: &[f32]| s.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scales: Vec<f32> = if per_channel {
        (0..cout)
            .map(|o| (absmax(&w[o * per..(o + 1) * per]) / 127.0).max(1e-12))
            .collect()
    } else {
        vec![(absmax(w) / 127.0).max(1e-12); cout]
    };
    let q = w
        .iter()
        .enumerate()
        .map(|(i, v)| (v / scales[i / per]).round().clamp(-127.0, 127.0) as i8)
        .collect();
    let scales = if per_channel { scales } else { vec![scales[0]] };
    (q, scales)
}

/// Rewrites the f32 model into the int8 form of `scheme` with the calibrated `ranges`.
fn rewrite(
    model: &F32Model,
    ranges: &HashMap<String, Range>,
    scheme: Scheme,
    shape: (usize, usize, usize),
    classes: usize,
) -> Result<pb::ModelProto> {
    let nodes = model.nodes();
    let mut consumers: HashMap<&str, usize> = HashMap::new();
    for n in nodes {
        for i in &n.input {
            *consumers.entry(i.as_str()).or_default() += 1;
        }
    }
    let range_of = |t: &str| -> Result<Range> {
        let r = ranges
            .get(t)
            .copied()
            .with_context(|| format!("no calibrated range for {t}"))?;
        if !(r.min.is_finite() && r.max.is_finite()) {
            bail!("the calibrated range of {t} is not finite ({r:?})");
        }
        Ok(r)
    };

    let mut g = Graph::new();
    // Tensors present as f32 (their original names) and as int8 (name, params).
    let mut f32s: HashSet<String> = HashSet::from([INPUT.to_string()]);
    let mut i8s: HashMap<String, (String, QParams)> = HashMap::new();
    let mut skip: HashSet<usize> = HashSet::new();

    fn qparam_consts(g: &mut Graph, t: &str, p: QParams) -> (String, String) {
        (
            g.constant(&format!("{t}.scale"), &[], &[p.scale]),
            g.constant(&format!("{t}.zero_point"), &[], &[p.zero_point]),
        )
    }
    // The int8 version of f32 tensor `t`, quantized with `p`.
    let ensure_i8 = |g: &mut Graph,
                     f32s: &HashSet<String>,
                     i8s: &mut HashMap<String, (String, QParams)>,
                     t: &str,
                     p: QParams|
     -> Result<(String, QParams)> {
        if let Some(q) = i8s.get(t) {
            return Ok(q.clone());
        }
        if !f32s.contains(t) {
            bail!("{t} is used before it is computed");
        }
        let (s, z) = qparam_consts(g, &format!("{t}.q"), p);
        let name = g.node("QuantizeLinear", &format!("{t}.q"), &[t, &s, &z], &[]);
        i8s.insert(t.to_string(), (name.clone(), p));
        Ok((name, p))
    };
    let ensure_f32 = |g: &mut Graph,
                      f32s: &mut HashSet<String>,
                      i8s: &HashMap<String, (String, QParams)>,
                      t: &str|
     -> Result<()> {
        if f32s.contains(t) {
            return Ok(());
        }
        let Some((q, _)) = i8s.get(t) else {
            bail!("{t} is used before it is computed");
        };
        let s = format!("{q}.scale");
        let z = format!("{q}.zero_point");
        // Node name = output name = the tensor's f32 name, so f32 consumers read it as before.
        g.node("DequantizeLinear", t, &[q, &s, &z], &[]);
        f32s.insert(t.to_string());
        Ok(())
    };

    for (idx, n) in nodes.iter().enumerate() {
        if skip.contains(&idx) {
            continue;
        }
        let out = n.output.first().cloned().unwrap_or_default();
        let weight = n.input.get(1).and_then(|w| model.consts.get(w));
        let quantized_conv = n.op_type == "Conv"
            && weight.is_some_and(|(dims, _)| conv_selected(n, dims, scheme.convs));
        if quantized_conv {
            let (wdims, w) = weight.context("conv weight")?;
            let bias = n
                .input
                .get(2)
                .and_then(|b| model.consts.get(b))
                .map(|(_, b)| b.clone())
                .unwrap_or_else(|| vec![0.0; wdims[0]]);
            // ReLU or ReLU6 right after, and nothing else reading the conv: folded into the
            // output range (its zero point -128 is the lower clip).
            let next = nodes.get(idx + 1).filter(|m| {
                scheme.unsigned_relu
                    && (m.op_type == "Clip" || m.op_type == "Relu")
                    && m.input.first() == Some(&out)
                    && consumers.get(out.as_str()) == Some(&1)
            });
            let (y, yp) = match next {
                Some(clip) => {
                    skip.insert(idx + 1);
                    let t = clip.output[0].clone();
                    let p = QParams::of(range_of(&t)?, true);
                    (t, p)
                }
                None => (
                    out.clone(),
                    QParams::of(range_of(&out)?, scheme.unsigned_relu),
                ),
            };
            let x = &n.input[0];
            let xp = match i8s.get(x) {
                Some((_, p)) => *p,
                None => QParams::of(range_of(x)?, scheme.unsigned_relu),
            };
            let (xq, xp) = ensure_i8(&mut g, &f32s, &mut i8s, x, xp)?;
            let (wq, ws) = quantize_weights(w, wdims[0], scheme.per_channel);
            let wn = g.constant(&format!("{out}.weight.q"), wdims, &wq);
            let scale_dims: &[usize] = if scheme.per_channel { &[wdims[0]] } else { &[] };
            let wsn = g.constant(&format!("{out}.weight.scale"), scale_dims, &ws);
            let zeros = vec![0i8; ws.len()];
            let wzn = g.constant(&format!("{out}.weight.zero_point"), scale_dims, &zeros);
            let bq: Vec<i32> = bias
                .iter()
                .enumerate()
                .map(|(o, b)| {
                    let s = xp.scale * ws[if scheme.per_channel { o } else { 0 }];
                    (f64::from(*b) / f64::from(s)).round() as i32
                })
                .collect();
            let bn = g.constant(&format!("{out}.bias.q"), &[wdims[0]], &bq);
            let xs = format!("{xq}.scale");
            let xz = format!("{xq}.zero_point");
            let (ys, yz) = qparam_consts(&mut g, &format!("{y}.q"), yp);
            let attrs: Vec<(&str, Attr)> = ["kernel_shape", "strides", "pads", "dilations"]
                .into_iter()
                .filter_map(|a| attr_ints(n, a).map(|v| (a, Attr::Ints(v))))
                .chain(std::iter::once((
                    "group",
                    Attr::Int(attr_int(n, "group").unwrap_or(1)),
                )))
                .collect();
            let name = g.node(
                "QLinearConv",
                &format!("{y}.q"),
                &[&xq, &xs, &xz, &wn, &wsn, &wzn, &ys, &yz, &bn],
                &attrs,
            );
            i8s.insert(y, (name, yp));
            continue;
        }
        if n.op_type == "Clip" && !f32s.contains(&n.input[0]) {
            // Symmetric activations: ReLU6 as an int8 Clip, in the input's own scale.
            if let Some((xq, p)) = i8s.get(&n.input[0]).cloned() {
                let q = |v: f32| (v / p.scale).round().clamp(-128.0, 127.0) as i8;
                let lo = g.constant(&format!("{out}.min.q"), &[], &[q(0.0)]);
                let hi = g.constant(&format!("{out}.max.q"), &[], &[q(6.0)]);
                let name = g.node("Clip", &format!("{out}.q"), &[&xq, &lo, &hi], &[]);
                qparam_consts(&mut g, &name, p);
                i8s.insert(out, (name, p));
                continue;
            }
        }
        // An f32 node: its inputs in f32, its constants copied, the node as it was.
        for i in &n.input {
            if let Some((dims, v)) = model.consts.get(i) {
                if !f32s.contains(i) {
                    g.constant(i, dims, v);
                    f32s.insert(i.clone());
                }
            } else if !i.is_empty() {
                ensure_f32(&mut g, &mut f32s, &i8s, i)?;
            }
        }
        g.push(n.clone());
        f32s.insert(out);
    }
    if !f32s.contains(OUTPUT) {
        bail!("the model's last node does not write {OUTPUT} in f32");
    }
    Ok(g.model(
        shape,
        classes,
        "int8 (QLinearConv) by weld-trainer quantize",
    ))
}

/// What `quantize` measured.
#[derive(Debug, Clone)]
pub struct QuantizeReport {
    pub calibration_frames: usize,
    pub judged_frames: usize,
    pub accuracy_f32: f64,
    pub accuracy_int8: f64,
    /// Share of judged frames where both models pick the same class.
    pub agreement: f64,
    pub ms_f32: f64,
    pub ms_int8: f64,
    pub bytes_f32: u64,
    pub bytes_int8: u64,
    /// The weight scales written (per output channel, or one per tensor).
    pub per_channel: bool,
}

/// Frames preprocessed for the model's input.
pub(crate) fn tensors(
    ds: &Dataset,
    samples: &[&Sample],
    card: &ModelCard,
) -> Result<Vec<Array4<f32>>> {
    samples
        .par_iter()
        .map(|s| {
            let f = ds.load(s).with_context(|| format!("{}", s.rgb.display()))?;
            weld_core::preprocess::preprocess(&f, &card.input)
                .with_context(|| format!("{}: preprocessing", s.rgb.display()))
        })
        .collect()
}

/// Median milliseconds of one inference over `runs` runs (after a warm-up), one thread.
pub fn median_ms(b: &dyn weld_edge::backend::Backend, x: &Array4<f32>, runs: usize) -> Result<f64> {
    b.infer(x.view())?;
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            b.infer(x.view()).map(|_| s.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_, _>>()?;
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

pub(crate) fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// `weld-trainer quantize`: writes `out` and its card (with the figures measured here).
pub fn quantize(model: &Path, out: &Path, opts: &QuantizeOptions) -> Result<QuantizeReport> {
    let card = ModelCard::read_beside(model)?.with_context(|| {
        format!(
            "{} has no model card ({}): quantize models written by `weld-trainer export`",
            model.display(),
            crate::card::card_path(model).display()
        )
    })?;
    if card.quantization != Quantization::F32 {
        bail!(
            "{} is {:?} already; quantize the f32 export",
            model.display(),
            card.quantization
        );
    }
    let f32m = F32Model::read(model)?;
    let ds = card.open_dataset(&opts.dataset)?;
    let version = versions::version(&ds)?;
    let (mut calib, judged): (Vec<&Sample>, Vec<&Sample>) = match &opts.split {
        Some(p) => {
            let split = Split::load(p)?;
            (
                split.samples(&ds, &version, Part::Train)?,
                split.held_out(&ds, &version)?,
            )
        }
        None => {
            let all: Vec<&Sample> = ds.samples.iter().filter(|s| s.label.is_some()).collect();
            (all.clone(), all)
        }
    };
    if calib.is_empty() || judged.is_empty() {
        bail!(
            "{}: no labelled frames to calibrate on or to judge",
            opts.dataset.display()
        );
    }
    calib.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed));
    calib.truncate(opts.calibration_frames.max(1));
    let [w, h] = card.input.size;
    let c = card.input.channels.len();
    let shape4 = [1, c, h as usize, w as usize];

    let calib_x = tensors(&ds, &calib, &card)?;
    let mut ranges = calibrate(&f32m, &calib_x, opts.range)?;
    // The graph input is not a node output; its range comes from the frames themselves.
    let (lo, hi) = calib_x
        .iter()
        .flat_map(|x| x.iter())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    ranges.insert(INPUT.to_string(), Range { min: lo, max: hi });
    drop(calib_x);
    let b32 = weld_edge::backend::load("tract", model, shape4, 1)?;
    let judged_x = tensors(&ds, &judged, &card)?;
    let truth: Vec<usize> = judged
        .iter()
        .map(|s| s.label.unwrap_or(usize::MAX))
        .collect();
    let picks32: Vec<usize> = judged_x
        .par_iter()
        .map(|x| Ok(argmax(b32.infer(x.view())?.as_slice().unwrap_or(&[]))))
        .collect::<Result<_>>()?;
    let n = truth.len() as f64;
    let accuracy =
        |picks: &[usize]| picks.iter().zip(&truth).filter(|(p, t)| p == t).count() as f64 / n;
    let accuracy_f32 = accuracy(&picks32);
    // One int8 form written beside `out` (not yet in place) and judged on the held-out frames.
    let judge = |scheme: Scheme| -> Result<Judged> {
        let q = rewrite(
            &f32m,
            &ranges,
            scheme,
            (shape4[1], shape4[2], shape4[3]),
            card.classes.len(),
        )?;
        let bytes = q.encode_to_vec();
        let tmp = crate::onnx::write_beside_unchecked(out, &bytes)?;
        let b8 = weld_edge::backend::load("tract", tmp.path(), shape4, 1)
            .context("the int8 model does not load in tract")?;
        let picks: Vec<usize> = judged_x
            .par_iter()
            .map(|x| Ok(argmax(b8.infer(x.view())?.as_slice().unwrap_or(&[]))))
            .collect::<Result<_>>()?;
        let agreement = picks.iter().zip(&picks32).filter(|(a, b)| a == b).count() as f64 / n;
        Ok(Judged {
            scheme,
            accuracy: accuracy(&picks),
            agreement,
            backend: b8,
            tmp,
            bytes: bytes.len() as u64,
        })
    };
    // Per-tensor weight scales are the form tract runs fastest (per channel leaves separate
    // requantization passes, docs/PERFORMANCE.md); kept when it costs at most
    // `MAX_ACCURACY_DROP` on the held-out frames, else per channel.
    let chosen = match opts.weights {
        WeightScales::PerChannel | WeightScales::PerTensor => judge(Scheme {
            per_channel: opts.weights == WeightScales::PerChannel,
            ..opts.scheme
        })?,
        WeightScales::Auto => {
            let fast = judge(Scheme {
                per_channel: false,
                ..opts.scheme
            })?;
            if fast.accuracy >= accuracy_f32 - MAX_ACCURACY_DROP {
                fast
            } else {
                drop(fast);
                judge(Scheme {
                    per_channel: true,
                    ..opts.scheme
                })?
            }
        }
    };
    let accuracy_int8 = chosen.accuracy;
    let agreement = chosen.agreement;
    let probe = &judged_x[0];
    let ms_f32 = median_ms(b32.as_ref(), probe, 20)?;
    let ms_int8 = median_ms(chosen.backend.as_ref(), probe, 20)?;
    let scheme = chosen.scheme;
    let bytes_int8 = chosen.bytes;
    chosen
        .tmp
        .persist(out)
        .with_context(|| format!("writing {}", out.display()))?;
    let mut qcard = card.clone();
    qcard.quantization = Quantization::Int8;
    let held = if opts.split.is_some() {
        "held_out"
    } else {
        "all"
    };
    let figures: BTreeMap<String, f64> = [
        (format!("{held}_accuracy_f32"), accuracy_f32),
        (format!("{held}_accuracy_int8"), accuracy_int8),
        (format!("{held}_agreement_f32_int8"), agreement),
        ("tract_ms_f32_1thread".to_string(), ms_f32),
        ("tract_ms_int8_1thread".to_string(), ms_int8),
    ]
    .into();
    qcard.metrics.extend(figures);
    if let Some(o) = qcard.lineage.training_config.as_object_mut() {
        o.insert(
            "quantization".into(),
            serde_json::json!({
                "from_onnx_sha256": weld_core::bundle::sha256_hex(&std::fs::read(model)?),
                "calibration_frames": calib.len(),
                "range": format!("{:?}", opts.range),
                "convs": format!("{:?}", opts.scheme.convs),
                "per_channel": scheme.per_channel,
                "unsigned_relu": scheme.unsigned_relu,
                "seed": opts.seed,
            }),
        );
    }
    qcard.write_beside(out)?;
    Ok(QuantizeReport {
        calibration_frames: calib.len(),
        judged_frames: judged.len(),
        accuracy_f32,
        accuracy_int8,
        agreement,
        ms_f32,
        ms_int8,
        bytes_f32: std::fs::metadata(model)?.len(),
        bytes_int8,
        per_channel: scheme.per_channel,
    })
}

/// One int8 form as judged: written to a temporary file beside the destination.
struct Judged {
    scheme: Scheme,
    accuracy: f64,
    agreement: f64,
    backend: Box<dyn weld_edge::backend::Backend>,
    tmp: tempfile::NamedTempFile,
    bytes: u64,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test
    use super::*;
    use rand::Rng;
    use rand_chacha::ChaCha8Rng;

    /// An inverted residual block and a head, as `export` writes them: input [1,4,16,16] ->
    /// 1x1 (4->16) -> ReLU6 -> 3x3 depthwise -> ReLU6 -> 1x1 (16->4) -> + input -> pool ->
    /// Gemm (3 classes).
    fn block_model(dir: &Path) -> PathBuf {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut w =
            |n: usize, s: f32| -> Vec<f32> { (0..n).map(|_| rng.random_range(-s..s)).collect() };
        let mut g = Graph::new();
        let e_w = g.constant("e.w", &[16, 4, 1, 1], &w(64, 0.5));
        let e_b = g.constant("e.b", &[16], &w(16, 0.2));
        let c = g.conv("e", INPUT, &e_w, &e_b, 1, 1, 0, 1);
        let c = g.relu6("e.relu6", &c);
        let d_w = g.constant("d.w", &[16, 1, 3, 3], &w(144, 0.5));
        let d_b = g.constant("d.b", &[16], &w(16, 0.2));
        let d = g.conv("d", &c, &d_w, &d_b, 3, 1, 1, 16);
        let d = g.relu6("d.relu6", &d);
        let p_w = g.constant("p.w", &[4, 16, 1, 1], &w(64, 0.3));
        let p_b = g.constant("p.b", &[4], &w(4, 0.1));
        let p = g.conv("p", &d, &p_w, &p_b, 1, 1, 0, 1);
        let a = g.node("Add", "add", &[&p, INPUT], &[]);
        let pool = g.node("GlobalAveragePool", "pool", &[&a], &[]);
        let f = g.node("Flatten", "flatten", &[&pool], &[("axis", Attr::Int(1))]);
        let fc_w = g.constant("fc.w", &[3, 4], &w(12, 8.0));
        let fc_b = g.constant("fc.b", &[3], &w(3, 0.1));
        g.node(
            "Gemm",
            OUTPUT,
            &[&f, &fc_w, &fc_b],
            &[("transB", Attr::Int(1))],
        );
        let path = dir.join("block.onnx");
        std::fs::write(&path, g.model((4, 16, 16), 3, "test").encode_to_vec()).unwrap();
        path
    }

    fn inputs(n: usize, seed: u64) -> Vec<Array4<f32>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| Array4::from_shape_simple_fn([1, 4, 16, 16], || rng.random_range(-1.0..1.0)))
            .collect()
    }

    fn quantized(dir: &Path, scheme: Scheme) -> (PathBuf, PathBuf) {
        let f32_path = block_model(dir);
        let m = F32Model::read(&f32_path).unwrap();
        let mut ranges = calibrate(&m, &inputs(16, 1), RangeMethod::MinMax).unwrap();
        ranges.insert(
            INPUT.into(),
            Range {
                min: -1.0,
                max: 1.0,
            },
        );
        let q = rewrite(&m, &ranges, scheme, (4, 16, 16), 3).unwrap();
        let path = dir.join("int8.onnx");
        std::fs::write(&path, q.encode_to_vec()).unwrap();
        (f32_path, path)
    }

    fn ops(path: &Path) -> Vec<String> {
        let m = pb::ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap();
        m.graph
            .unwrap()
            .node
            .into_iter()
            .map(|n| n.op_type)
            .collect()
    }

    /// Largest |a - b| of two models' logits over fresh inputs, in `backend_b` for the second.
    fn max_diff(a: &Path, b: &Path, backend_b: &str) -> (f32, f32) {
        let shape = [1, 4, 16, 16];
        let ma = weld_edge::backend::load("tract", a, shape, 1).unwrap();
        let mb = weld_edge::backend::load(backend_b, b, shape, 1).unwrap();
        let (mut worst, mut spread) = (0.0f32, 0.0f32);
        for x in inputs(8, 99) {
            let la = ma.infer(x.view()).unwrap();
            let lb = mb.infer(x.view()).unwrap();
            for (p, q) in la.iter().zip(lb.iter()) {
                worst = worst.max((p - q).abs());
                spread = spread.max(p.abs());
            }
        }
        eprintln!("{backend_b}: max |diff| {worst} (logits up to {spread})");
        (worst, spread)
    }

    #[test]
    fn pointwise_convs_become_qlinearconv_and_stay_close_to_f32() {
        let dir = tempfile::tempdir().unwrap();
        let (f32_path, q) = quantized(dir.path(), Scheme::default());
        let ops = ops(&q);
        assert_eq!(
            ops.iter().filter(|o| *o == "QLinearConv").count(),
            2,
            "{ops:?}"
        );
        // The depthwise conv stays f32; the ReLU6 after each int8 conv is folded away.
        assert_eq!(ops.iter().filter(|o| *o == "Conv").count(), 1, "{ops:?}");
        assert_eq!(ops.iter().filter(|o| *o == "Clip").count(), 1, "{ops:?}");
        let (d, spread) = max_diff(&f32_path, &q, "tract");
        assert!(spread > 0.5, "the logits are not all near zero: {spread}");
        assert!(
            d < 0.02 * spread,
            "int8 differs from f32 by {d} (logits up to {spread})"
        );
    }

    #[test]
    fn symmetric_activations_use_an_int8_clip() {
        let dir = tempfile::tempdir().unwrap();
        let scheme = Scheme {
            unsigned_relu: false,
            ..Scheme::default()
        };
        let (f32_path, q) = quantized(dir.path(), scheme);
        let ops = ops(&q);
        assert_eq!(
            ops.iter().filter(|o| *o == "QLinearConv").count(),
            2,
            "{ops:?}"
        );
        assert_eq!(ops.iter().filter(|o| *o == "Clip").count(), 2, "{ops:?}");
        let (d, spread) = max_diff(&f32_path, &q, "tract");
        assert!(
            d < 0.03 * spread,
            "int8 differs from f32 by {d} (logits up to {spread})"
        );
    }

    #[test]
    fn every_conv_in_int8_per_tensor_still_runs() {
        let dir = tempfile::tempdir().unwrap();
        let scheme = Scheme {
            convs: ConvSelect::All,
            per_channel: false,
            unsigned_relu: true,
        };
        let (f32_path, q) = quantized(dir.path(), scheme);
        assert_eq!(ops(&q).iter().filter(|o| *o == "QLinearConv").count(), 3);
        let (d, spread) = max_diff(&f32_path, &q, "tract");
        assert!(
            d < 0.03 * spread,
            "int8 differs from f32 by {d} (logits up to {spread})"
        );
    }

    #[cfg(feature = "ort")]
    #[test]
    fn tract_and_onnx_runtime_agree_on_the_int8_model() {
        let dir = tempfile::tempdir().unwrap();
        let (_, q) = quantized(dir.path(), Scheme::default());
        // Both run the same integer graph; they may round a requantization differently by
        // one step, so the tolerance is a few output steps, not f32's 1e-4.
        let (d, spread) = max_diff(&q, &q, "ort");
        assert!(
            d < 0.01 * spread,
            "tract and ONNX Runtime differ by {d} (logits up to {spread})"
        );
    }

    #[test]
    fn models_of_other_operators_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = Graph::new();
        g.node("Softmax", OUTPUT, &[INPUT], &[]);
        let path = dir.path().join("other.onnx");
        std::fs::write(&path, g.model((3, 4, 4), 3, "t").encode_to_vec()).unwrap();
        let err = F32Model::read(&path).err().unwrap().to_string();
        assert!(
            err.contains("Softmax") && err.contains("weld-trainer export"),
            "{err}"
        );
    }
}
