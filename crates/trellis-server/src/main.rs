//! The `trellis` binary: a thin shell over [`trellis_server::cli`].

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    match trellis_server::cli::main().await {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
