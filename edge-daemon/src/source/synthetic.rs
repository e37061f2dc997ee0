//! `kind = "synthetic"`: generated RGB-D welds with known classes, for the demo and for tests.
//!
//! Rendering one 640x480 scene with [`weld_core::synth::generate`] takes about 50 ms of one
//! core (measured on the 2-core build machine, optimised build), so a camera that rendered each
//! frame could not feed the pipeline at 60 fps. By default the camera therefore keeps a pool of
//! rendered scenes per class, made on a background thread when it opens, and cycles through
//! them: the pixels repeat every `pool` frames of a class, while every delivered frame gets a
//! fresh `seq` and the current time. `pool = 0` renders a new scene for every frame instead
//! (every frame different, about 20 fps at 640x480 at most).
//!
//! Which class each frame shows is drawn from `mix` with a seeded hash, so a seed gives the same
//! sequence of classes (and, with the pool, of pixels) on every run and machine.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use weld_core::synth::{
    DEFAULT_CLASSES, GroundTruth, SynthClass, SynthConfig, Synthesized, frame_seed, generate,
};

use super::{Next, Pacer, Source, SourceError, fps_problem, range_problem};

/// Image sizes `weld_core::synth` accepts, px (its `MIN_WIDTH`, `MIN_HEIGHT`, `MAX_SIDE`).
const WIDTH_RANGE_PX: (u32, u32) = (64, 8192);
const HEIGHT_RANGE_PX: (u32, u32) = (48, 8192);
/// Most scenes kept per class: 256 scenes of 640x480 are 390 MB, more than the board should
/// spend on a demo camera.
const MAX_POOL: usize = 256;
/// Most scenes rendered per second after the pool is full: 100 scenes of 50 ms is five cores.
const MAX_REFRESH_PER_S: f64 = 100.0;

/// `[source]` with `kind = "synthetic"`.
///
/// ```toml
/// [source]
/// kind = "synthetic"
/// fps = 60
/// mix = { good = 0.6, porosity = 0.1, undercut = 0.1, spatter = 0.1, burn_through = 0.1 }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticConfig {
    /// Image width in pixels, 64..=8192 (default 640).
    pub width: u32,
    /// Image height in pixels, 48..=8192 (default 480); with the generator's 65 degree
    /// horizontal field of view the vertical one must be 10..=120 degrees.
    pub height: u32,
    /// Frames per second, 0.1..=1000, or 0 for as fast as the pipeline takes them (default 30).
    pub fps: f64,
    /// Relative weight of each class by name (`good`, `porosity`, `undercut`, `spatter`,
    /// `burn_through`); classes left out get 0. Weights need not add up to 1, must be >= 0, and
    /// at least one must be > 0. Default: all five classes equally often.
    pub mix: BTreeMap<String, f64>,
    /// Seed of the scenes and of the class sequence: the same seed gives the same frames.
    pub seed: u64,
    /// Rendered scenes kept per class with a weight > 0, 0..=256 (default 2). Rendering takes
    /// about 50 ms per 640x480 scene, so the camera renders this many per class in the
    /// background at start and cycles through them; each costs 5 bytes per pixel (1.5 MB at
    /// 640x480). 0 renders every frame anew (unique frames, about 20 fps at 640x480).
    pub pool: usize,
    /// New scenes rendered per second once the pool is full, each replacing the oldest scene
    /// of its class, 0..=100 (default 4: about 0.2 s of one core per second at 640x480, and
    /// the whole default pool renewed every 2.5 s, so a long run sees hundreds of different
    /// welds). 0 keeps the first pool forever.
    pub refresh_per_s: f64,
}

impl Default for SyntheticConfig {
    fn default() -> SyntheticConfig {
        SyntheticConfig {
            width: 640,
            height: 480,
            fps: 30.0,
            mix: DEFAULT_CLASSES
                .iter()
                .map(|c| (c.to_string(), 1.0 / DEFAULT_CLASSES.len() as f64))
                .collect(),
            seed: 1,
            pool: 2,
            refresh_per_s: 4.0,
        }
    }
}

impl SyntheticConfig {
    /// Every invalid value, each naming its key and the allowed values.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let size = [
            range_problem(
                "source.width",
                self.width,
                WIDTH_RANGE_PX.0,
                WIDTH_RANGE_PX.1,
                "px",
            ),
            range_problem(
                "source.height",
                self.height,
                HEIGHT_RANGE_PX.0,
                HEIGHT_RANGE_PX.1,
                "px",
            ),
        ];
        if size.iter().all(Option::is_none) {
            // The sizes are in range; what is left is the aspect ratio.
            if let Err(e) = self.synth_config().validate() {
                out.push(format!("source.width/source.height: {e}"));
            }
        }
        out.extend(size.into_iter().flatten());
        out.extend(fps_problem("source.fps", self.fps));
        let mut total = 0.0;
        for (name, &w) in &self.mix {
            if SynthClass::from_name(name).is_none() {
                out.push(format!(
                    "source.mix.{name} is not a class; allowed: {}",
                    DEFAULT_CLASSES.join(", ")
                ));
            } else if !(w.is_finite() && w >= 0.0) {
                out.push(format!("source.mix.{name} is {w}; allowed: a weight >= 0"));
            } else {
                total += w;
            }
        }
        if total <= 0.0 {
            out.push(format!(
                "source.mix gives no class a weight > 0; give at least one of {} a weight > 0",
                DEFAULT_CLASSES.join(", ")
            ));
        }
        if !(self.refresh_per_s.is_finite()
            && (0.0..=MAX_REFRESH_PER_S).contains(&self.refresh_per_s))
        {
            out.push(format!(
                "source.refresh_per_s is {}; allowed: 0..={MAX_REFRESH_PER_S} scenes per second",
                self.refresh_per_s
            ));
        }
        if self.pool > MAX_POOL {
            out.push(format!(
                "source.pool is {}; allowed: 0..={MAX_POOL} scenes per class",
                self.pool
            ));
        }
        out
    }

    fn synth_config(&self) -> SynthConfig {
        SynthConfig::new(self.width, self.height)
    }

    /// The classes with a weight > 0 and their cumulative weights (for drawing).
    fn cumulative(&self) -> Vec<(SynthClass, f64)> {
        let mut acc = 0.0;
        SynthClass::ALL
            .into_iter()
            .filter_map(|c| {
                let w = self.mix.get(c.name()).copied().unwrap_or(0.0);
                (w.is_finite() && w > 0.0).then(|| {
                    acc += w;
                    (c, acc)
                })
            })
            .collect()
    }
}

/// Scenes rendered so far, per class (index = `SynthClass as usize`).
#[derive(Default)]
struct PoolState {
    scenes: [Vec<Arc<Synthesized>>; 5],
    failed: Option<String>,
}

/// The pool shared with the rendering thread.
struct Pool {
    state: Mutex<PoolState>,
    added: Condvar,
    stop: AtomicBool,
}

/// The pool's lock is poisoned only if the rendering thread panicked while holding it.
fn poisoned<T>(_: T) -> SourceError {
    SourceError::Fatal("the synthetic scene pool failed".into())
}

/// How long `next_frame` waits for the first scene of a class before it looks whether the
/// rendering thread is still alive, ms.
const POOL_WAIT: Duration = Duration::from_millis(200);

/// The synthetic camera (see the module docs).
pub struct SyntheticSource {
    synth: SynthConfig,
    seed: u64,
    classes: Vec<(SynthClass, f64)>,
    pacer: Pacer,
    seq: u64,
    /// Class draws so far (the index of the next draw's hash).
    draws: u64,
    /// Frames delivered per class (picks the scene within the class).
    per_class: [u64; 5],
    pool: Option<Arc<Pool>>,
    worker: Option<JoinHandle<()>>,
    last: Option<Arc<Synthesized>>,
}

impl std::fmt::Debug for SyntheticSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyntheticSource")
            .field("synth", &self.synth)
            .field("seed", &self.seed)
            .field("seq", &self.seq)
            .field("pooled", &self.pool.is_some())
            .finish_non_exhaustive()
    }
}

/// The hash stream of the class draws: an index no class uses in [`frame_seed`], so the draws
/// are independent of the scene seeds.
const CLASS_DRAW_STREAM: usize = SynthClass::ALL.len();

impl SyntheticSource {
    /// Checks the config and, with a pool, starts rendering it in the background.
    pub fn open(cfg: &SyntheticConfig) -> Result<SyntheticSource, SourceError> {
        let problems = cfg.problems();
        if !problems.is_empty() {
            return Err(SourceError::Fatal(format!(
                "invalid [source] config: {}",
                problems.join("; ")
            )));
        }
        let classes = cfg.cumulative();
        let synth = cfg.synth_config();
        let (pool, worker) = if cfg.pool > 0 {
            let pool = Arc::new(Pool {
                state: Mutex::new(PoolState::default()),
                added: Condvar::new(),
                stop: AtomicBool::new(false),
            });
            let (shared, synth, seed, per_class, refresh) = (
                pool.clone(),
                synth.clone(),
                cfg.seed,
                cfg.pool,
                cfg.refresh_per_s,
            );
            let active: Vec<SynthClass> = classes.iter().map(|&(c, _)| c).collect();
            let worker = std::thread::Builder::new()
                .name("synthetic-pool".into())
                .spawn(move || render_pool(&shared, &synth, seed, &active, per_class, refresh))
                .map_err(|e| SourceError::Fatal(format!("cannot start the scene thread: {e}")))?;
            (Some(pool), Some(worker))
        } else {
            (None, None)
        };
        Ok(SyntheticSource {
            synth,
            seed: cfg.seed,
            classes,
            pacer: Pacer::new(cfg.fps),
            seq: 0,
            draws: 0,
            per_class: [0; 5],
            pool,
            worker,
            last: None,
        })
    }

    /// The class of the last frame delivered (`None` before the first).
    pub fn last_class(&self) -> Option<SynthClass> {
        self.last.as_ref().map(|s| s.truth.class)
    }

    /// What the last frame delivered shows: class, defects with boxes, bead, camera pose.
    pub fn last_truth(&self) -> Option<&GroundTruth> {
        self.last.as_ref().map(|s| &s.truth)
    }

    /// Draws the next class from the mix.
    fn draw_class(&mut self) -> SynthClass {
        let h = frame_seed(self.seed, CLASS_DRAW_STREAM, self.draws as usize);
        self.draws += 1;
        // The top 53 bits as a uniform number in [0, 1), the precision of an f64.
        let u = (h >> 11) as f64 / (1u64 << 53) as f64;
        let total = self.classes.last().map_or(0.0, |&(_, acc)| acc);
        let x = u * total;
        self.classes
            .iter()
            .find(|&&(_, acc)| x < acc)
            .or(self.classes.last())
            .map_or(SynthClass::Good, |&(c, _)| c)
    }

    /// Scene `k` of `class`: from the pool (any scene of the class already rendered), or
    /// rendered now.
    fn scene(&self, class: SynthClass, k: u64) -> Result<Arc<Synthesized>, SourceError> {
        let Some(pool) = &self.pool else {
            let seed = frame_seed(self.seed, class as usize, k as usize);
            return generate(class, seed, &self.synth)
                .map(Arc::new)
                .map_err(|e| SourceError::Fatal(format!("synthetic scene: {e}")));
        };
        let mut state = pool.state.lock().map_err(poisoned)?;
        loop {
            let scenes = &state.scenes[class as usize];
            if !scenes.is_empty() {
                // Before the pool is full this repeats the scenes made so far, so the camera
                // runs at full rate from its first scene on.
                return Ok(scenes[(k % scenes.len() as u64) as usize].clone());
            }
            if let Some(why) = &state.failed {
                return Err(SourceError::Fatal(format!("synthetic scene: {why}")));
            }
            if self.worker.as_ref().is_none_or(JoinHandle::is_finished) {
                return Err(SourceError::Fatal(format!(
                    "the synthetic scene thread ended without a {} scene",
                    class.name()
                )));
            }
            state = pool
                .added
                .wait_timeout(state, POOL_WAIT)
                .map_err(poisoned)?
                .0;
        }
    }
}

/// Renders `per_class` scenes of every class, one of each class in turn so that every class
/// has a first scene early; then, at `refresh_per_s`, renders further scenes that replace the
/// oldest of their class. Stops when asked to.
fn render_pool(
    pool: &Pool,
    synth: &SynthConfig,
    seed: u64,
    classes: &[SynthClass],
    per_class: usize,
    refresh_per_s: f64,
) {
    let period = (refresh_per_s > 0.0).then(|| Duration::from_secs_f64(1.0 / refresh_per_s));
    for j in 0.. {
        if j >= per_class && period.is_none() {
            return;
        }
        for &class in classes {
            if pool.stop.load(Ordering::Relaxed) {
                return;
            }
            if let (true, Some(period)) = (j >= per_class, period) {
                super::sleep_unless(&pool.stop, period);
                if pool.stop.load(Ordering::Relaxed) {
                    return;
                }
            }
            let result = generate(class, frame_seed(seed, class as usize, j), synth);
            let Ok(mut state) = pool.state.lock() else {
                return;
            };
            match result {
                Ok(s) => {
                    let scenes = &mut state.scenes[class as usize];
                    if scenes.len() < per_class {
                        scenes.push(Arc::new(s));
                    } else {
                        scenes[j % per_class] = Arc::new(s);
                    }
                }
                Err(e) => {
                    state.failed = Some(e.to_string());
                    pool.added.notify_all();
                    return;
                }
            }
            pool.added.notify_all();
        }
    }
}

impl Drop for SyntheticSource {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            pool.stop.store(true, Ordering::Relaxed);
        }
        if let Some(w) = self.worker.take() {
            // At most one scene's rendering away; a panic in it has been reported already.
            let _ = w.join();
        }
    }
}

impl Source for SyntheticSource {
    fn name(&self) -> &'static str {
        "synthetic"
    }

    fn next_frame(&mut self) -> Result<Next, SourceError> {
        let class = self.draw_class();
        let k = self.per_class[class as usize];
        self.per_class[class as usize] += 1;
        let scene = self.scene(class, k)?;
        self.pacer.wait();
        self.seq += 1;
        // The generator's time is fixed by its seed; a camera's frame carries when it was taken.
        let frame = scene.frame.clone().with_time(chrono::Utc::now(), self.seq);
        self.last = Some(scene);
        Ok(Next::Frame(Box::new(frame)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems_of(toml_mix: &str) -> Vec<String> {
        let cfg = SyntheticConfig {
            mix: toml::from_str(toml_mix).unwrap(),
            ..SyntheticConfig::default()
        };
        cfg.problems()
    }

    #[test]
    fn default_is_valid_and_even() {
        let cfg = SyntheticConfig::default();
        assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
        assert_eq!((cfg.width, cfg.height, cfg.fps), (640, 480, 30.0));
        assert_eq!(cfg.mix.len(), 5);
        assert!(cfg.mix.values().all(|&w| w == 0.2));
    }

    #[test]
    fn mix_problems_name_the_key() {
        let p = problems_of("good = -1.0\ncrack = 1.0\nporosity = nan");
        assert!(
            p.iter().any(|m| m.starts_with("source.mix.good is -1")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.starts_with("source.mix.crack is not a class")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.starts_with("source.mix.porosity is NaN")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|m| m.contains("no class a weight > 0")),
            "{p:?}"
        );
        assert_eq!(p.len(), 4, "{p:?}");
        assert_eq!(problems_of("spatter = 0.0").len(), 1);
        assert!(problems_of("spatter = 2").is_empty());
    }

    #[test]
    fn class_draws_follow_the_mix() {
        let cfg = SyntheticConfig {
            mix: [("good".to_string(), 3.0), ("undercut".to_string(), 1.0)].into(),
            pool: 0,
            ..SyntheticConfig::default()
        };
        let mut s = SyntheticSource::open(&cfg).unwrap();
        let n = 4000;
        let good = (0..n)
            .filter(|_| s.draw_class() == SynthClass::Good)
            .count();
        // 3000 expected; the binomial sd is 27, so +-150 cannot fail by chance.
        assert!((2850..=3150).contains(&good), "{good} of {n} good");
        let mut again = SyntheticSource::open(&cfg).unwrap();
        let mut first = SyntheticSource::open(&cfg).unwrap();
        let a: Vec<_> = (0..50).map(|_| again.draw_class()).collect();
        let b: Vec<_> = (0..50).map(|_| first.draw_class()).collect();
        assert_eq!(a, b, "same seed, same classes");
    }

    #[test]
    fn the_pool_is_renewed_in_the_background() {
        let cfg = SyntheticConfig {
            width: 160,
            height: 120,
            fps: 0.0,
            mix: [("good".to_string(), 1.0)].into(),
            pool: 1,
            refresh_per_s: 50.0,
            ..SyntheticConfig::default()
        };
        let mut s = SyntheticSource::open(&cfg).unwrap();
        let frame = |s: &mut SyntheticSource| match s.next_frame().unwrap() {
            Next::Frame(f) => f.rgb().clone(),
            Next::End => panic!("a synthetic camera never ends"),
        };
        let first = frame(&mut s);
        assert_eq!(
            frame(&mut s),
            first,
            "one scene in the pool: the same pixels"
        );
        // At 50 scenes/s a new scene replaces the only one within a few tens of ms; allow
        // 2 s on a loaded machine.
        let t = std::time::Instant::now();
        while frame(&mut s) == first {
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "the pool was never renewed"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let off = SyntheticConfig {
            refresh_per_s: 0.0,
            ..cfg
        };
        let mut s = SyntheticSource::open(&off).unwrap();
        let first = frame(&mut s);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(frame(&mut s), first, "refresh 0 keeps the first pool");
    }
}
