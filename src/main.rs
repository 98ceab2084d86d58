//! The `patient-sync` binary: parse the command line, load configuration, start logging and
//! dispatch. Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = patient_sync::cli::Cli::parse();
    match patient_sync::cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(patient_sync::cli::EXIT_FAILURE)
        }
    }
}
