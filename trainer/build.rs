//! Link settings for the `torch` and `cuda` features (README "Training").

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // torch-sys tells its dependents where libtorch is; nothing else sets the run-time library
    // path, so the binary carries it.
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
    // With `--as-needed` (rustc's default) libtorch_cuda.so is dropped, since no symbol of it
    // is referenced directly, and CUDA then looks absent at run time.
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
