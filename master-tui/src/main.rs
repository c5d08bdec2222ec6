use std::process::ExitCode;

fn main() -> ExitCode {
    kiln_master::cli::main()
}
