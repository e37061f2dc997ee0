//! glibc malloc, held to the memory the daemon really uses (docs/PERFORMANCE.md, "Memory").
//!
//! The pipeline moves megabyte frames, height maps and PNGs between threads, and every
//! inference allocates and frees tract's activations (up to 4.8 MB each for a MobileNetV2 at
//! 224x224). With glibc's defaults (an arena per thread, up to 8 per core, and an mmap threshold
//! that rises to the largest block ever freed) the hybrid run at 60 fps peaked at 145 MB; with
//! jemalloc at 126-131 MB. [`tune`] sets three things, at jemalloc's speed:
//! - two arenas for the whole process, whatever the number of threads and cores;
//! - a fixed 4 MiB mmap threshold: frames and most activations come from the arenas, larger
//!   blocks are mapped and unmapped; fixing it stops glibc from raising it. (At 1 MiB the peak
//!   is ~6 MB lower, but the activations between 1 and 4 MiB are then mapped, zeroed and
//!   unmapped on every inference, and the model runs 20-30 % slower.)
//! - freed memory at the top of an arena beyond 1 MiB goes back to the system at once.
//!
//! [`with_large_blocks_mapped`] lowers the threshold for one start-up step that allocates
//! large blocks it never touches again (sled's metrics; see there).
//!
//! A `MALLOC_ARENA_MAX`, `MALLOC_MMAP_THRESHOLD_` or `MALLOC_TRIM_THRESHOLD_` in the
//! environment (glibc's own tunables) wins over the settings here, for tuning on a board.
//! mallopt(3) has no crate that wraps it safely, hence the few lines of `unsafe` here.

use std::sync::atomic::{AtomicBool, Ordering};

/// The mmap threshold [`tune`] sets: 4 MiB.
pub const MMAP_THRESHOLD_BYTES: i32 = 4 << 20;

/// The threshold [`with_large_blocks_mapped`] holds while its step runs: 256 KiB, below sled's
/// 512 KiB histograms and above anything the step allocates often.
pub const STARTUP_MMAP_THRESHOLD_BYTES: i32 = 256 << 10;

/// Whether [`tune`] set the mmap threshold (and so knows what to restore it to).
static THRESHOLD_SET: AtomicBool = AtomicBool::new(false);

/// Sets the daemon's malloc parameters (module docs). Called once, first thing in `main`, before
/// any thread exists; does nothing off glibc.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MIB: libc::c_int = 1 << 20;
        for (env, param, value) in [
            ("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, 2),
            (
                "MALLOC_MMAP_THRESHOLD_",
                libc::M_MMAP_THRESHOLD,
                MMAP_THRESHOLD_BYTES,
            ),
            ("MALLOC_TRIM_THRESHOLD_", libc::M_TRIM_THRESHOLD, MIB),
        ] {
            if std::env::var_os(env).is_none()
                && set(param, value)
                && env.starts_with("MALLOC_MMAP")
            {
                THRESHOLD_SET.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// Runs `f` with the mmap threshold at [`STARTUP_MMAP_THRESHOLD_BYTES`], then puts it back to
/// [`MMAP_THRESHOLD_BYTES`].
///
/// For a step that allocates large blocks, writes zeros into them and never touches them again:
/// sled's `Metrics`, made the first time a database opens, are 41 histograms of 512 KiB (21.5 MB)
/// that sled fills with zeros even with its metrics off (sled 0.34 `histogram.rs`). Taken from an
/// arena they are dirty, resident pages for the life of the process. Mapped, they are fresh
/// zero pages from the kernel, and in the release build most of them never become resident: the
/// hybrid bench peaks 5-10 MB lower (docs/PERFORMANCE.md; measured, not traced to the
/// instruction). glibc maps a block over the threshold only when the arena's free memory cannot
/// hold it, so the few that fit in what is free at that moment still come from the arena.
///
/// Only when [`tune`] set the threshold: with `MALLOC_MMAP_THRESHOLD_` in the environment, or in
/// a process that never called [`tune`] (other binaries, most tests), `f` just runs. Other threads
/// that allocate meanwhile get blocks of 256 KiB and more mapped, which is slower, never wrong.
pub fn with_large_blocks_mapped<T>(f: impl FnOnce() -> T) -> T {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if THRESHOLD_SET.load(Ordering::SeqCst)
        && set(libc::M_MMAP_THRESHOLD, STARTUP_MMAP_THRESHOLD_BYTES)
    {
        /// Puts the threshold back however `f` ends, a panic included.
        struct Restore;
        impl Drop for Restore {
            fn drop(&mut self) {
                set(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
            }
        }
        let _restore = Restore;
        return f();
    }
    f()
}

/// One mallopt(3) call; true when glibc took the value.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)] // mallopt(3) is a C function; libc has no safe wrapper for it.
fn set(param: libc::c_int, value: libc::c_int) -> bool {
    // SAFETY: mallopt only changes allocator parameters, under glibc's own arena lock, with
    // parameters and values glibc documents (mallopt(3)). It returns 0 for a value it refuses,
    // which leaves the previous setting.
    unsafe { libc::mallopt(param, value) == 1 }
}
