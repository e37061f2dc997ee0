//! Training data: frames decoded and preprocessed (the one weld-core function) on worker
//! threads, augmented, batched, and handed over in a fixed order with a bounded prefetch.
//!
//! Everything random is seeded from (seed, epoch, frame), so a run is reproducible whatever
//! the threads' timing, and `--resume` continues with the batches a straight run would see.
//! Augmentation works on the preprocessed tensor, so preprocessed frames can be cached in
//! memory and decoded once.

use std::collections::BTreeMap;
use std::f32::consts::PI;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};
use weld_core::dataset::{Dataset, Sample};
use weld_core::manifest::{Channel, InputSpec};
use weld_core::preprocess::preprocess;

/// Augmentations, each applied with its own random draw per frame and epoch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Augment {
    /// Mirror left-right with probability 1/2.
    pub flip_horizontal: bool,
    /// Mirror top-bottom with probability 1/2.
    pub flip_vertical: bool,
    /// Rotate by a uniform angle in ±this many degrees.
    pub rotate_deg: f32,
    /// Add a uniform brightness offset in ±this (on the 0..1 colour scale).
    pub brightness: f32,
    /// Scale contrast by a uniform factor in 1 ± this.
    pub contrast: f32,
    /// Gaussian noise of this standard deviation on colour (0..1 scale).
    pub noise: f32,
    /// Gaussian noise of this standard deviation on height (its -1..1 scale).
    pub depth_noise: f32,
    /// Share of height pixels dropped to "no depth", in a few rectangular holes.
    pub depth_dropout: f32,
}

impl Default for Augment {
    fn default() -> Augment {
        Augment {
            flip_horizontal: true,
            flip_vertical: true,
            rotate_deg: 5.0,
            brightness: 0.1,
            contrast: 0.1,
            noise: 0.01,
            depth_noise: 0.01,
            depth_dropout: 0.02,
        }
    }
}

impl Augment {
    /// No augmentation at all (validation, evaluation).
    pub fn none() -> Augment {
        Augment {
            flip_horizontal: false,
            flip_vertical: false,
            rotate_deg: 0.0,
            brightness: 0.0,
            contrast: 0.0,
            noise: 0.0,
            depth_noise: 0.0,
            depth_dropout: 0.0,
        }
    }

    /// Applies the augmentations to one `[C, H, W]` preprocessed frame in place.
    pub fn apply(&self, x: &mut [f32], spec: &InputSpec, rng: &mut ChaCha8Rng) {
        let [w, h] = spec.size;
        let (w, h) = (w as usize, h as usize);
        let plane = w * h;
        // The tensor value of "no depth" and of a black pixel, the fill of rotated-in corners.
        let fill: Vec<f32> = spec
            .channels
            .iter()
            .enumerate()
            .map(|(c, ch)| match ch {
                Channel::Height => {
                    let norm = spec.depth.unwrap_or_default();
                    let missing =
                        norm.missing_mm.clamp(-norm.range_mm, norm.range_mm) / norm.range_mm;
                    (missing - spec.mean[c]) / spec.std[c]
                }
                // No depth is no relief; black for colour.
                _ => (0.0 - spec.mean[c]) / spec.std[c],
            })
            .collect();
        if self.flip_horizontal && rng.random::<bool>() {
            for row in x.chunks_exact_mut(w) {
                row.reverse();
            }
        }
        if self.flip_vertical && rng.random::<bool>() {
            for p in x.chunks_exact_mut(plane) {
                for y in 0..h / 2 {
                    let (top, bottom) = p.split_at_mut((h - 1 - y) * w);
                    top[y * w..(y + 1) * w].swap_with_slice(&mut bottom[..w]);
                }
            }
        }
        if self.rotate_deg > 0.0 {
            let a = rng.random_range(-self.rotate_deg..=self.rotate_deg) * PI / 180.0;
            rotate(x, w, h, a, &fill);
        }
        let b = if self.brightness > 0.0 {
            rng.random_range(-self.brightness..=self.brightness)
        } else {
            0.0
        };
        let k = if self.contrast > 0.0 {
            rng.random_range(1.0 - self.contrast..=1.0 + self.contrast)
        } else {
            1.0
        };
        let noise = Normal::new(0.0f32, self.noise.max(0.0)).ok();
        let depth_noise = Normal::new(0.0f32, self.depth_noise.max(0.0)).ok();
        // Drawn at the first depth channel and shared: a hole in the depth is a hole in the
        // height and in the relief alike.
        let mut holes: Option<Vec<[usize; 4]>> = None;
        for (c, (ch, p)) in spec
            .channels
            .iter()
            .zip(x.chunks_exact_mut(plane))
            .enumerate()
        {
            let (mean, std) = (spec.mean[c], spec.std[c]);
            if ch.from_depth() {
                if let Some(n) = depth_noise.filter(|_| self.depth_noise > 0.0) {
                    for v in p.iter_mut().filter(|v| **v != fill[c]) {
                        *v += n.sample(rng) / std;
                    }
                }
                if self.depth_dropout > 0.0 {
                    let holes =
                        holes.get_or_insert_with(|| depth_holes(w, h, self.depth_dropout, rng));
                    for &[x0, y0, hw, hh] in holes.iter() {
                        for y in y0..y0 + hh {
                            p[y * w + x0..y * w + x0 + hw].fill(fill[c]);
                        }
                    }
                }
                continue;
            }
            if b == 0.0 && k == 1.0 && self.noise <= 0.0 {
                continue;
            }
            for v in p.iter_mut() {
                let mut u = *v * std + mean; // back to the 0..1 colour scale
                u = (u - 0.5) * k + 0.5 + b;
                if let Some(n) = noise.filter(|_| self.noise > 0.0) {
                    u += n.sample(rng);
                }
                *v = (u.clamp(0.0, 1.0) - mean) / std;
            }
        }
    }
}

/// Rotates every plane of `x` by `a` radians about the centre, bilinear; outside is `fill`.
fn rotate(x: &mut [f32], w: usize, h: usize, a: f32, fill: &[f32]) {
    let (s, c) = a.sin_cos();
    let (cx, cy) = ((w as f32 - 1.0) / 2.0, (h as f32 - 1.0) / 2.0);
    let plane = w * h;
    let mut out = vec![0.0f32; plane];
    for (ci, p) in x.chunks_exact_mut(plane).enumerate() {
        for y in 0..h {
            for xx in 0..w {
                let (dx, dy) = (xx as f32 - cx, y as f32 - cy);
                let sx = c * dx + s * dy + cx;
                let sy = -s * dx + c * dy + cy;
                out[y * w + xx] =
                    if sx < 0.0 || sy < 0.0 || sx > (w - 1) as f32 || sy > (h - 1) as f32 {
                        fill[ci]
                    } else {
                        let (x0, y0) = (sx.floor() as usize, sy.floor() as usize);
                        let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
                        let (fx, fy) = (sx - x0 as f32, sy - y0 as f32);
                        let top = p[y0 * w + x0] * (1.0 - fx) + p[y0 * w + x1] * fx;
                        let bottom = p[y1 * w + x0] * (1.0 - fx) + p[y1 * w + x1] * fx;
                        top * (1.0 - fy) + bottom * fy
                    };
            }
        }
        p.copy_from_slice(&out);
    }
}

/// About `share` of a `w x h` plane in up to four rectangles `[x0, y0, width, height]`: depth
/// holes (glare, occlusion), as a depth camera loses them.
fn depth_holes(w: usize, h: usize, share: f32, rng: &mut ChaCha8Rng) -> Vec<[usize; 4]> {
    let holes = rng.random_range(1..=4usize);
    let area = (share * (w * h) as f32 / holes as f32).max(1.0);
    (0..holes)
        .map(|_| {
            let aspect = rng.random_range(0.3f32..3.0);
            let hw = ((area * aspect).sqrt() as usize).clamp(1, w);
            let hh = ((area / aspect).sqrt() as usize).clamp(1, h);
            let x0 = rng.random_range(0..=w - hw);
            let y0 = rng.random_range(0..=h - hh);
            [x0, y0, hw, hh]
        })
        .collect()
}

/// A batch: `x` is `[n, C, H, W]` row-major, `y` the labels.
#[derive(Debug, Clone)]
pub struct Batch {
    pub x: Vec<f32>,
    pub y: Vec<i64>,
    pub n: usize,
}

/// Frames of a dataset with their labels, the input spec, and the in-memory cache.
#[derive(Debug)]
pub struct Source {
    ds: Dataset,
    items: Vec<(Sample, i64)>,
    spec: InputSpec,
    cache: Option<Vec<OnceLock<Arc<Vec<f32>>>>>,
}

impl Source {
    /// `cache_bytes`: the preprocessed frames are kept in memory when all of them fit.
    pub fn new(ds: Dataset, samples: Vec<&Sample>, spec: InputSpec, cache_bytes: u64) -> Source {
        let items: Vec<(Sample, i64)> = samples
            .into_iter()
            .filter_map(|s| s.label.map(|l| (s.clone(), l as i64)))
            .collect();
        let [w, h] = spec.size;
        let need = items.len() as u64 * spec.channels.len() as u64 * u64::from(w * h) * 4;
        let cache = (need <= cache_bytes).then(|| items.iter().map(|_| OnceLock::new()).collect());
        Source {
            ds,
            items,
            spec,
            cache,
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn labels(&self) -> impl Iterator<Item = i64> + '_ {
        self.items.iter().map(|(_, l)| *l)
    }

    pub fn spec(&self) -> &InputSpec {
        &self.spec
    }

    /// Frame `i`, preprocessed, as `[C, H, W]` values.
    fn input(&self, i: usize) -> Result<Arc<Vec<f32>>> {
        let load = || -> Result<Arc<Vec<f32>>> {
            let s = &self.items[i].0;
            let frame = self
                .ds
                .load(s)
                .with_context(|| format!("loading {}", s.rgb.display()))?;
            let t = preprocess(&frame, &self.spec)
                .with_context(|| format!("preprocessing {}", s.rgb.display()))?;
            Ok(Arc::new(t.into_raw_vec_and_offset().0))
        };
        match &self.cache {
            Some(c) => {
                if let Some(v) = c[i].get() {
                    return Ok(v.clone());
                }
                let v = load()?;
                Ok(c[i].get_or_init(|| v).clone())
            }
            None => load(),
        }
    }

    /// One epoch's batches, made by `workers` threads with up to `prefetch` batches ready.
    /// `shuffle` orders frames by (seed, epoch); `augment` is applied per (seed, epoch, frame).
    pub fn epoch(self: &Arc<Self>, opts: EpochOptions) -> Batches {
        let mut order: Vec<usize> = (0..self.items.len()).collect();
        if opts.shuffle {
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(
                opts.seed,
                opts.epoch,
                u64::MAX,
            )));
        }
        let batches: Vec<Vec<usize>> = order
            .chunks(opts.batch_size.max(1))
            .filter(|b| !opts.drop_last || b.len() == opts.batch_size)
            .map(<[usize]>::to_vec)
            .collect();
        let batches = Arc::new(batches);
        let next = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = sync_channel(opts.prefetch.max(1));
        let workers = (0..opts.workers.max(1))
            .map(|_| {
                let (src, batches, next, stop, tx) = (
                    Arc::clone(self),
                    Arc::clone(&batches),
                    Arc::clone(&next),
                    Arc::clone(&stop),
                    tx.clone(),
                );
                std::thread::spawn(move || worker(&src, &batches, &next, &stop, &tx, &opts))
            })
            .collect();
        Batches {
            rx: Some(rx),
            workers,
            stop,
            pending: BTreeMap::new(),
            next_out: 0,
            total: batches.len(),
        }
    }
}

/// How one epoch is read.
#[derive(Debug, Clone, Copy)]
pub struct EpochOptions {
    pub epoch: u64,
    pub seed: u64,
    pub batch_size: usize,
    pub shuffle: bool,
    /// Leave out a last, smaller batch (batch norm dislikes a batch of one).
    pub drop_last: bool,
    pub augment: Option<Augment>,
    pub workers: usize,
    pub prefetch: usize,
}

/// A seed for one (run seed, epoch, frame).
fn mix(seed: u64, epoch: u64, item: u64) -> u64 {
    let mut h = seed ^ 0x9E37_79B9_7F4A_7C15;
    for v in [epoch, item] {
        h = (h ^ v).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h ^= h >> 31;
    }
    h
}

type Made = (usize, Result<Batch>);

fn worker(
    src: &Source,
    batches: &[Vec<usize>],
    next: &AtomicUsize,
    stop: &AtomicBool,
    tx: &SyncSender<Made>,
    opts: &EpochOptions,
) {
    let [w, h] = src.spec.size;
    let per = src.spec.channels.len() * (w * h) as usize;
    loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let b = next.fetch_add(1, Ordering::Relaxed);
        let Some(idx) = batches.get(b) else { return };
        let made = (|| -> Result<Batch> {
            let mut x = Vec::with_capacity(idx.len() * per);
            let mut y = Vec::with_capacity(idx.len());
            for &i in idx {
                let input = src.input(i)?;
                let start = x.len();
                x.extend_from_slice(&input);
                if let Some(a) = &opts.augment {
                    let mut rng = ChaCha8Rng::seed_from_u64(mix(opts.seed, opts.epoch, i as u64));
                    a.apply(&mut x[start..], &src.spec, &mut rng);
                }
                y.push(src.items[i].1);
            }
            Ok(Batch { x, y, n: idx.len() })
        })();
        if tx.send((b, made)).is_err() {
            return;
        }
    }
}

/// The batches of one epoch, in order.
#[derive(Debug)]
pub struct Batches {
    rx: Option<Receiver<Made>>,
    workers: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    pending: BTreeMap<usize, Result<Batch>>,
    next_out: usize,
    total: usize,
}

impl Iterator for Batches {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.next_out >= self.total {
            return None;
        }
        loop {
            if let Some(b) = self.pending.remove(&self.next_out) {
                self.next_out += 1;
                return Some(b);
            }
            match self.rx.as_ref()?.recv() {
                Ok((i, b)) => {
                    self.pending.insert(i, b);
                }
                Err(_) => {
                    self.next_out = self.total;
                    return Some(Err(anyhow::anyhow!("the data loader stopped early")));
                }
            }
        }
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver wakes workers blocked on a full channel.
        self.rx = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test
    use super::*;

    fn spec(size: u32) -> InputSpec {
        InputSpec::rgb_height(size)
    }

    #[test]
    fn flips_mirror_and_rotation_by_zero_changes_nothing() {
        let s = spec(4);
        let x: Vec<f32> = (0..64).map(|v| v as f32 / 64.0).collect();
        let mut y = x.clone();
        rotate(&mut y, 4, 4, 0.0, &[0.0; 4]);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-6);
        }
        // Horizontal flip only: find a seed whose first draw is `true`.
        let a = Augment {
            flip_horizontal: true,
            ..Augment::none()
        };
        let mut flipped = false;
        for seed in 0..8 {
            let mut z = x.clone();
            a.apply(&mut z, &s, &mut ChaCha8Rng::seed_from_u64(seed));
            if z != x {
                assert_eq!(&z[..4], &[3.0 / 64.0, 2.0 / 64.0, 1.0 / 64.0, 0.0]);
                flipped = true;
            }
        }
        assert!(flipped);
    }

    #[test]
    fn colour_augmentation_leaves_height_and_dropout_leaves_colour() {
        let s = spec(16);
        let plane = 256;
        let x = vec![0.1f32; 4 * plane];
        let colour = Augment {
            brightness: 0.2,
            contrast: 0.2,
            noise: 0.05,
            ..Augment::none()
        };
        let mut y = x.clone();
        colour.apply(&mut y, &s, &mut ChaCha8Rng::seed_from_u64(1));
        assert_ne!(&y[..plane], &x[..plane]);
        assert_eq!(&y[3 * plane..], &x[3 * plane..]);
        let depth = Augment {
            depth_dropout: 0.1,
            ..Augment::none()
        };
        let mut z = x.clone();
        depth.apply(&mut z, &s, &mut ChaCha8Rng::seed_from_u64(1));
        assert_eq!(&z[..3 * plane], &x[..3 * plane]);
        let dropped = z[3 * plane..].iter().filter(|v| **v != 0.1).count();
        assert!((5..=60).contains(&dropped), "{dropped} of 256 dropped");
    }
}
