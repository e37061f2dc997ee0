//! `weld-edge`: see `weld_edge::cli`.

/// jemalloc instead of glibc's malloc. The pipeline moves megabyte frames and PNGs between
/// threads; glibc's per-thread arenas and its rising mmap threshold kept the freed ones
/// resident (`weld-edge bench`, hybrid at 60 fps: 507 MB peak against well under 100 MB of
/// live data). `.cargo/config.toml` sets jemalloc to hand freed pages back within a second.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    weld_edge::cli::main()
}
