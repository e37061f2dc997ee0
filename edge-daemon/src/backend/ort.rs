//! The optional ONNX Runtime backend (cargo feature `ort`), for hosts where its int8 kernels
//! are worth shipping a shared library: about 6x faster than tract on the QDQ MobileNetV2
//! (NOTES-toolchain.md).
//!
//! `ort` is built with `load-dynamic`: the library (`libonnxruntime.so.1.32.0`) is opened at
//! run time from the config's path or `ORT_DYLIB_PATH`. ort panics when that file is missing,
//! so the path is checked here first and a missing file is an ordinary error.
//!
//! ort 2.0.0-rc.15's `Session::run` takes `&mut self`, while [`Backend::infer`] takes `&self`
//! so that worker threads share a backend: this backend holds one session per worker
//! (`threads` at load), each behind its own mutex, and a call takes the first free one.
//! Each session runs on one intra-op thread: parallelism comes from the workers, and
//! several sessions each spawning a thread pool would oversubscribe the board's cores.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, TryLockError};

use ndarray::{Array2, ArrayView4};
use ort::environment::Environment;
use ort::session::Session;
use ort::value::TensorRef;

use super::{Backend, BackendError, BackendOptions, ORT_INSTALL_HINT, OnnxInfo};

/// The environment variable ort itself reads; also ours when the config names no library.
const ORT_DYLIB_ENV: &str = "ORT_DYLIB_PATH";

/// The one ONNX Runtime environment of the process and the library it came from. ort keeps
/// the first library it opens for the life of the process, so a later request for another
/// file is an error rather than silently running the first.
static ENVIRONMENT: Mutex<Option<(PathBuf, Environment)>> = Mutex::new(None);

/// The library path from the options or the environment, checked to exist.
fn library_path(options: &BackendOptions) -> Result<PathBuf, BackendError> {
    let (path, origin) = match &options.ort_library {
        Some(p) => (p.clone(), "the config's ort library path"),
        None => match std::env::var_os(ORT_DYLIB_ENV) {
            Some(p) if !p.is_empty() => (PathBuf::from(p), "ORT_DYLIB_PATH"),
            _ => return Err(BackendError::OrtLibraryUnset),
        },
    };
    if !path.is_file() {
        return Err(BackendError::OrtLibraryMissing { path, origin });
    }
    // ort resolves relative paths against the executable's folder first; we checked the
    // one relative to the working directory, so hand it that one, absolute.
    std::path::absolute(&path).map_err(|e| BackendError::OrtLibrary {
        path,
        detail: e.to_string(),
    })
}

/// The process's ONNX Runtime environment, created on first use from `library`.
fn environment(library: &Path) -> Result<Environment, BackendError> {
    // A panic while another thread initialised leaves either nothing or a complete
    // environment in the slot: both are safe to use.
    let mut slot = ENVIRONMENT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((loaded, env)) = slot.as_ref() {
        if loaded != library {
            return Err(BackendError::OrtLibrary {
                path: library.to_owned(),
                detail: format!(
                    "this process already loaded ONNX Runtime from {}; a second library \
                     needs a restart",
                    loaded.display()
                ),
            });
        }
        return Ok(env.clone());
    }
    let lib_err = |detail: String| BackendError::OrtLibrary {
        path: library.to_owned(),
        detail: format!("{detail}; {ORT_INSTALL_HINT}"),
    };
    let env = ort::init_from(library)
        .map_err(|e| lib_err(e.to_string()))?
        .with_name("weld-edge")
        .build()
        .map_err(|e| lib_err(e.to_string()))?;
    *slot = Some((library.to_owned(), env.clone()));
    Ok(env)
}

/// A model in ONNX Runtime: one session per concurrent caller.
pub struct OrtBackend {
    sessions: Vec<Mutex<Session>>,
    /// Where the next call starts looking for a free session, so that callers spread out.
    next: AtomicUsize,
    shape: [usize; 4],
    path: PathBuf,
    library: PathBuf,
}

impl std::fmt::Debug for OrtBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtBackend")
            .field("path", &self.path)
            .field("shape", &self.shape)
            .field("sessions", &self.sessions.len())
            .field("library", &self.library)
            .finish_non_exhaustive()
    }
}

impl OrtBackend {
    /// Opens the library (first call only) and `options.threads` sessions of `path`.
    pub fn load(path: &Path, options: &BackendOptions) -> Result<OrtBackend, BackendError> {
        // A missing library is a setup problem of the whole host: report it before
        // anything about this model.
        let library = library_path(options)?;
        // Read the graph before ORT does: a file that is not ONNX, or an input that is not
        // one f32 image, gets the same message in every backend.
        let (_, info) = OnnxInfo::read(path)?;
        info.check_shape(options.shape)
            .map_err(|detail| BackendError::Invalid {
                path: path.to_owned(),
                detail,
            })?;
        let env = environment(&library)?;
        let sessions = (0..options.threads)
            .map(|_| open_session(&env, path, &info).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(OrtBackend {
            sessions,
            next: AtomicUsize::new(0),
            shape: options.shape,
            path: path.to_owned(),
            library,
        })
    }

    /// A free session, or, when every one is busy, the next in turn once it is free.
    fn session(&self) -> MutexGuard<'_, Session> {
        let n = self.sessions.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        for i in 0..n {
            match self.sessions[(start + i) % n].try_lock() {
                Ok(guard) => return guard,
                // ONNX Runtime's session is itself thread-safe (the `&mut` is ort's API
                // choice), so a panic in another caller cannot leave it half-updated.
                Err(TryLockError::Poisoned(p)) => return p.into_inner(),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        self.sessions[start]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// One session with one intra-op thread; a refusal names the operator when it can.
fn open_session(env: &Environment, path: &Path, info: &OnnxInfo) -> Result<Session, BackendError> {
    let load_err = |detail: String| {
        // ORT names the operator it lacks in its own words ("Could not find an
        // implementation for X", "dom:X(-1) is not a registered function/op"): find which of
        // the model's operators it means, so the error has the same shape as tract's.
        let ops: Vec<_> = info
            .ops
            .iter()
            .filter(|op| mentions_op(&detail, &op.op_type))
            .cloned()
            .collect();
        if ops.is_empty() {
            BackendError::Load {
                backend: "ort",
                path: path.to_owned(),
                detail,
            }
        } else {
            BackendError::UnsupportedOps {
                backend: "ort",
                path: path.to_owned(),
                ops,
                detail: Some(detail),
            }
        }
    };
    Session::builder(env)
        .map_err(|e| load_err(e.to_string()))?
        .with_intra_threads(1)
        .map_err(|e| load_err(e.to_string()))?
        .with_inter_threads(1)
        .map_err(|e| load_err(e.to_string()))?
        .commit_from_file(path)
        .map_err(|e| load_err(e.to_string()))
}

/// True when ORT's message `detail` names operator `op_type` as a whole word, so that `Conv`
/// is not found inside `FusedConv`.
fn mentions_op(detail: &str, op_type: &str) -> bool {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    detail.match_indices(op_type).any(|(at, _)| {
        let before = detail[..at].chars().next_back();
        let after = detail[at + op_type.len()..].chars().next();
        !before.is_some_and(is_word) && !after.is_some_and(is_word)
    })
}

impl Backend for OrtBackend {
    fn name(&self) -> &'static str {
        "ort"
    }

    fn input_shape(&self) -> [usize; 4] {
        self.shape
    }

    fn infer(&self, input: ArrayView4<'_, f32>) -> Result<Array2<f32>, BackendError> {
        super::check_input(self.shape, &input)?;
        let failed = |e: ort::Error| BackendError::Inference {
            backend: "ort",
            detail: e.to_string(),
        };
        // ORT reads the caller's buffer in place when it is contiguous (the usual case).
        let contiguous = input.as_standard_layout();
        let tensor = TensorRef::from_array_view(&contiguous).map_err(failed)?;
        let mut session = self.session();
        let outputs = session.run(ort::inputs![tensor]).map_err(failed)?;
        let first = outputs.iter().next().map(|(_, v)| v);
        let first = first
            .as_ref()
            .map(|v| v.try_extract_array::<f32>())
            .transpose()
            .map_err(failed)?;
        super::logits("ort", first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_names_match_whole_words_only() {
        let msg = "Could not find an implementation for FusedConv(1) node with name 'n0'";
        assert!(mentions_op(msg, "FusedConv"));
        assert!(!mentions_op(msg, "Conv"));
        let msg = "com.example:NotAnOp(-1) is not a registered function/op";
        assert!(mentions_op(msg, "NotAnOp"));
        assert!(!mentions_op(msg, "Not"));
    }

    #[test]
    fn unset_library_says_how_to_get_one() {
        // Checked through the message alone: the variable may be set in the test
        // environment, and tests must not change process-wide environment variables.
        let text = BackendError::OrtLibraryUnset.to_string();
        assert!(text.contains("ORT_DYLIB_PATH"), "{text}");
        assert!(text.contains("onnxruntime==1.32.0"), "{text}");
        assert!(
            text.contains("onnxruntime/capi/libonnxruntime.so.1.32.0"),
            "{text}"
        );
    }
}
