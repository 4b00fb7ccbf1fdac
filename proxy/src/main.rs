//! The `chorus` command: run the proxy, run a throwaway demo cluster, or set a backend's state.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use chorus::cluster::{BackendState, Cluster};
use chorus::config::Config;
use chorus::server::{Ended, Server};

#[derive(Parser)]
#[command(name = "chorus", version, about = "A replicating PostgreSQL proxy")]
struct Cli {
    /// The configuration file (TOML); see docs/configuration.md.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default when no command is given).
    Run,
    /// Start throwaway local PostgreSQL servers and Chorus in front of them.
    Demo {
        /// How many backends to start.
        #[arg(long, default_value_t = 2)]
        backends: usize,
        /// Where clients connect.
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: String,
        /// Where the servers and Chorus's state live (default: a fresh temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Start the compose cluster's topology with local processes: a PostgreSQL server for each
    /// backend of the config (--config, normally deploy/chorus.toml), a spare server of a newer
    /// major left out of the cluster, and Chorus in front (see scripts/cluster.sh).
    Cluster {
        /// Where the servers and Chorus's state live; `cluster.env` there says where to connect.
        #[arg(long)]
        dir: PathBuf,
        /// The spare server, NAME:MAJOR.
        #[arg(long, default_value = "pg18:18")]
        spare: String,
    },
    /// Compare per-table checksums of every in-sync backend at one quiesced point (G1).
    /// Exits non-zero when any table differs.
    Verify {
        /// Databases to check (default: every database that accepts connections).
        #[arg(long)]
        database: Vec<String>,
    },
    /// Check the configuration file and exit.
    CheckConfig,
    /// Set a backend's recorded state while Chorus is stopped (see docs/operations.md).
    SetState {
        backend: String,
        /// joining, in_sync, down, diverged, detached or removed.
        state: String,
        #[arg(long, default_value = "set by operator")]
        reason: String,
    },
}

fn main() -> ExitCode {
    // What Chorus writes (states, the diff log with rows in it, roles.sql with password
    // hashes, dumps made by its child processes) is for its own user alone.
    // SAFETY: umask only sets this process's file creation mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
    let cli = Cli::parse();
    chorus::demo::init_logging();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chorus: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: Option<PathBuf>) -> Result<Config, String> {
    let path = path.ok_or("no configuration file given (use --config FILE)")?;
    Config::load(&path).map_err(|e| e.to_string())
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let cfg = load(cli.config)?;
            // One thread accepts and runs health checks; sessions get their own threads.
            let ended = runtime(1)?.block_on(async {
                let server = Server::start(cfg).await.map_err(|e| e.to_string())?;
                Ok::<_, String>(server.run(chorus::demo::shutdown_signal()).await)
            })?;
            if matches!(ended, Ended::Deposed | Ended::HandedOver) {
                // A deposed leader starts again from nothing as a standby (same process id,
                // same arguments): no state of its leadership survives into the next.
                return Err(restart_as_standby());
            }
            Ok(())
        }
        Command::Demo { backends, listen, dir } => runtime(2)?.block_on(chorus::demo::run(backends, listen, dir)),
        Command::Cluster { dir, spare } => {
            let path = cli.config.ok_or("no configuration file given (use --config deploy/chorus.toml)")?;
            let spare = chorus::local::Spare::parse(&spare)?;
            runtime(2)?.block_on(chorus::local::run(&path, dir, Some(spare)))
        }
        Command::Verify { database } => {
            let cfg = load(cli.config)?;
            let report = runtime(2)?.block_on(chorus::verify::run(&cfg, &database)).map_err(|e| e.to_string())?;
            print!("{}", report.render());
            let bad = report.unequal();
            if bad.is_empty() {
                let n: usize = report.databases.values().map(|t| t.len()).sum();
                println!("verify: all {n} tables equal on every in-sync backend (writes paused {:?})", report.pause);
                Ok(())
            } else {
                Err(format!("{} table(s) differ between backends", bad.len()))
            }
        }
        Command::CheckConfig => {
            load(cli.config)?;
            println!("configuration is valid");
            Ok(())
        }
        Command::SetState { backend, state, reason } => {
            let cfg = load(cli.config)?;
            let to = BackendState::parse(&state).ok_or_else(|| format!("unknown state {state:?}"))?;
            let cluster = Cluster::open(&cfg).map_err(|e| e.to_string())?;
            cluster.set_state(&backend, to, &reason).map_err(|e| e.to_string())?;
            println!("{backend} is now {to}");
            Ok(())
        }
    }
}

/// Replaces this process with a fresh run of the same command; returns only on failure.
fn restart_as_standby() -> String {
    use std::os::unix::process::CommandExt;
    tracing::info!("starting again as a standby");
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return format!("cannot find this program to start again as a standby: {e}"),
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1)).env_remove(chorus::ha::LEASE_ENV);
    if let Some(lease) = chorus::ha::unrevoked_lease() {
        // etcd did not take it back: the next run does, as soon as etcd answers.
        cmd.env(chorus::ha::LEASE_ENV, lease.to_string());
    }
    let err = cmd.exec();
    format!("cannot start again as a standby: {err}")
}
