//! `tally`: the command-line client. Parsing and error printing only; the commands live in
//! `tally_cli::cli` so they can be tested.
#![deny(unsafe_code)]

use std::process::ExitCode;

/// Rust ignores SIGPIPE, so `tally status | head` would panic on the closed pipe. Restore the
/// default so `tally` ends quietly like other Unix tools.
#[allow(unsafe_code)]
fn restore_sigpipe() {
    // SAFETY: called first thing in main, before any thread exists; setting a signal's
    // disposition to SIG_DFL has no memory-safety preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    restore_sigpipe();
    let cli = tally_cli::cli::Cli::parse_env_aware();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour only on a terminal: logs redirected to a file stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let json = cli.output == tally_cli::output::Output::Json;
    match tally_cli::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {e}");
            if json {
                // `-o json`: stdout still carries one document, the error object.
                tally_cli::output::print(&tally_cli::output::error(&e));
            }
            ExitCode::FAILURE
        }
    }
}
