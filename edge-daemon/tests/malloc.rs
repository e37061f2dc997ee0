//! `weld_edge::malloc`: the daemon's glibc settings, checked through glibc's own accounting.
//! One test in its own process, because it changes malloc for the whole process and reads
//! process-wide counters that other tests' threads would move.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn large_blocks_are_mapped_only_inside_the_scope() {
    use weld_edge::malloc;

    /// Bytes glibc holds in mmapped chunks (`mallinfo2().hblkhd`).
    #[allow(unsafe_code)] // mallinfo2(3) is a C function; libc has no safe wrapper for it.
    fn mapped() -> usize {
        // SAFETY: mallinfo2 only reads malloc's statistics and returns them by value.
        unsafe { libc::mallinfo2().hblkhd }
    }
    /// What sled's metrics, 41 zeroed blocks of 512 KiB alive together, add to the mapped bytes.
    /// glibc maps a block at or over the threshold only when its free memory cannot hold it, so
    /// one block proves little; 20.5 MB of them outgrow any free memory this process has.
    fn mapped_growth_of_sleds_histograms() -> usize {
        let before = mapped();
        let blocks: Vec<Vec<u64>> = (0..41).map(|_| vec![0u64; 1 << 16]).collect();
        let grown = mapped().saturating_sub(before);
        drop(std::hint::black_box(blocks));
        grown
    }

    // glibc's own tunable wins over `tune`, and then the scope rightly leaves it alone.
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some() {
        eprintln!("MALLOC_MMAP_THRESHOLD_ is set: the daemon's threshold is not in force");
        return;
    }
    malloc::tune();
    let outside = mapped_growth_of_sleds_histograms();
    let inside = malloc::with_large_blocks_mapped(mapped_growth_of_sleds_histograms);
    let after = mapped_growth_of_sleds_histograms();
    assert_eq!(
        outside, 0,
        "with the 4 MiB threshold 512 KiB blocks come from an arena"
    );
    // All but what free memory held: at most the 1 MiB trim threshold and a few stray chunks.
    assert!(
        inside >= 16 << 20,
        "inside the scope most of 20.5 MB of 512 KiB blocks are mapped, but only {inside} bytes were"
    );
    assert_eq!(after, 0, "the 4 MiB threshold is back after the scope");
}
