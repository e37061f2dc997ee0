//! `weld-edge`: see `weld_edge::cli`.

fn main() -> std::process::ExitCode {
    tune_malloc();
    weld_edge::cli::main()
}

/// glibc malloc, held to the memory the daemon really uses. The pipeline moves megabyte
/// frames, height maps and PNGs between threads, and every inference allocates and frees
/// tract's activations (up to 4.8 MB each for a MobileNetV2 at 224x224). With glibc's defaults
/// (an arena per thread, up to 8 per core, and an mmap threshold that rises to the largest
/// block ever freed) the hybrid run at 60 fps peaked at 145 MB; with jemalloc at 126-131 MB.
/// With these three settings it peaks at 112-117 MB, at jemalloc's speed (docs/PERFORMANCE.md,
/// "Memory"):
/// - two arenas for the whole process, whatever the number of threads and cores;
/// - a fixed 4 MiB mmap threshold: frames and most activations come from the arenas, larger
///   blocks are mapped and unmapped; fixing it stops glibc from raising it. (At 1 MiB the peak
///   is ~6 MB lower, but the activations between 1 and 4 MiB are then mapped, zeroed and
///   unmapped on every inference, and the model runs 20-30 % slower.)
/// - freed memory at the top of an arena beyond 1 MiB goes back to the system at once.
///
/// A `MALLOC_ARENA_MAX`, `MALLOC_MMAP_THRESHOLD_` or `MALLOC_TRIM_THRESHOLD_` in the
/// environment (glibc's own tunables) wins over the setting here, for tuning on a board.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)] // mallopt(3) is a C function; libc has no safe wrapper for it.
fn tune_malloc() {
    const MIB: libc::c_int = 1 << 20;
    for (env, param, value) in [
        ("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, 2),
        ("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, 4 * MIB),
        ("MALLOC_TRIM_THRESHOLD_", libc::M_TRIM_THRESHOLD, MIB),
    ] {
        if std::env::var_os(env).is_none() {
            // SAFETY: mallopt only changes allocator parameters; it is called before any
            // thread exists, with parameters and values glibc documents (mallopt(3)). It
            // returns 0 for a value it refuses, which leaves glibc's default: nothing to do.
            unsafe {
                libc::mallopt(param, value);
            }
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}
