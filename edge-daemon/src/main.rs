//! `weld-edge`: see `weld_edge::cli`.

fn main() -> std::process::ExitCode {
    weld_edge::malloc::tune();
    weld_edge::cli::main()
}
