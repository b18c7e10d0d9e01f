//! The `lazarus` binary: parse arguments, validate them into settings, call
//! one library function per verb. No logic lives here.

mod cli;

use std::process::ExitCode;

use clap::Parser;

/// Freed pages are kept for the next allocation instead of going back to
/// the kernel (see the dependency's comment in Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// What std's `print!` family panics with when stdout is a closed pipe.
const CLOSED_STDOUT: &str = "failed printing to stdout";

fn main() -> ExitCode {
    let args = cli::Cli::parse(); // clap exits with code 2 on usage errors
    // A reader that stops early (`| head -1`) is not an error: every verb
    // ends quietly when stdout's pipe closes. `print!` panics on EPIPE (Rust
    // ignores SIGPIPE); that panic, and only it, ends the process with 0.
    // (Verbs that `write!` to stdout treat BrokenPipe the same way.)
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !is_closed_stdout(info.payload()) {
            default_hook(info);
        }
    }));
    match std::panic::catch_unwind(|| cli::run(args)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(err)) => {
            eprintln!("error: {}", message(&err));
            ExitCode::from(1)
        }
        Err(payload) if is_closed_stdout(payload.as_ref()) => ExitCode::SUCCESS,
        Err(payload) => std::panic::resume_unwind(payload),
    }
}

/// The error and its causes, each said once: a cause whose text a message
/// above already holds (`{path}: {source}`) is not repeated.
fn message(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

fn is_closed_stdout(payload: &(dyn std::any::Any + Send)) -> bool {
    let text = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied());
    text.is_some_and(|t| t.starts_with(CLOSED_STDOUT) && t.contains("Broken pipe"))
}
