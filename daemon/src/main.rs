//! The `byol` command. Thin: parses arguments, sets up logging, calls the library crates.

mod bench_cmd;
mod cli;
mod compact_cmd;
mod config;
mod console;
mod daemon_cmd;
mod demo;
mod embed_cmd;
mod eval_cmd;
mod export_cmd;
mod ingest_cmd;
mod inspect_cmd;
mod metrics;
mod plot_cmd;
mod preview_cmd;
mod progress;
mod service;
mod signals;
mod textures;
mod train_cmd;
mod watch;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    restore_sigpipe();
    byol_trainer::memory::keep_freed_memory();
    let cli = cli::Cli::parse();
    // The service logs what it does by default; commands only warnings.
    let default_level = match &cli.command {
        Some(cli::Command::Daemon(_)) => "info",
        _ => "warn",
    };
    let format =
        cli.log_format
            .or_else(|| match std::env::var("BYOL_LOG_FORMAT").ok().as_deref() {
                Some("json") => Some(cli::LogFormat::Json),
                Some("text") => Some(cli::LogFormat::Text),
                _ => None,
            });
    let console = matches!(&cli.command, Some(cli::Command::Daemon(_)));
    init_logging(
        cli.verbose,
        default_level,
        format.unwrap_or(cli::LogFormat::Text),
        console,
    );
    let outcome = run(cli);
    let group = byol_trainer::dist::group();
    match outcome {
        Ok(code) => {
            byol_trainer::dist::finalize();
            code
        }
        Err(e) if group.world() > 1 => {
            // The other ranks would wait for this one forever: end the whole job.
            eprintln!("error: rank {} of {}: {e:#}", group.rank(), group.world());
            byol_trainer::dist::abort(1);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: cli::Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        None => demo::run(),
        Some(cli::Command::Ingest(args)) => ingest_cmd::run(args),
        Some(cli::Command::Inspect(args)) => inspect_cmd::run(args),
        Some(cli::Command::Compact(args)) => compact_cmd::run(args),
        Some(cli::Command::Preview(args)) => preview_cmd::run(args),
        Some(cli::Command::Train(args)) => train_cmd::run(args),
        Some(cli::Command::Daemon(args)) => daemon_cmd::run(args),
        Some(cli::Command::Validate(args)) => daemon_cmd::validate(args),
        Some(cli::Command::Eval(args)) => eval_cmd::run(args),
        Some(cli::Command::Export(args)) => export_cmd::run(args),
        Some(cli::Command::Embed(args)) => embed_cmd::run(args),
        Some(cli::Command::Plot(args)) => plot_cmd::run(args),
        Some(cli::Command::Bench(cmd)) => bench_cmd::run(cmd),
    }
}

/// Ends the process quietly when stdout closes early (`byol inspect DS | head`), as Unix
/// tools do, instead of panicking in `println!` (Rust ignores SIGPIPE by default).
fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: sets one signal disposition at start-up, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Log lines go to stderr (journald under systemd), filtered by `BYOL_LOG` when set;
/// with `console`, each typed event's message is also printed for people
/// ([`console::ConsoleLines`]).
fn init_logging(verbose: u8, default_level: &str, format: cli::LogFormat, console: bool) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{Layer, fmt};
    let level = match verbose {
        0 => default_level,
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("BYOL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colours only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let log = match format {
        cli::LogFormat::Text => fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .boxed(),
        cli::LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(log.with_filter(filter))
        .with(
            console
                .then_some(console::ConsoleLines)
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
        )
        .init();
}
