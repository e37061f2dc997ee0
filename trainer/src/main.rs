//! `weld-trainer`: see `weld_trainer::cli`.

fn main() -> std::process::ExitCode {
    weld_trainer::cli::main()
}
