//! mig — launch migshim sessions, list them, read their state tables.

mod checkpoint;
mod client;
mod demo;
mod elf;
mod frozen;
mod inspect;
mod objects;
mod restore;
mod run;
mod sessions;
mod show;
mod sockets;
mod table;
mod terminal;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Where a restored session's resources bind on this host (default: where they were).
#[derive(clap::Args, Clone, Debug, Default)]
struct MapArgs {
    /// Files and unix socket paths under OLD are found under NEW (a path prefix; repeatable).
    #[arg(long, value_name = "OLD=NEW")]
    map_path: Vec<String>,
    /// Sockets bound to port OLD bind to NEW, connections to OLD go to NEW (repeatable).
    #[arg(long, value_name = "OLD=NEW")]
    map_port: Vec<String>,
    /// The same for IP addresses (repeatable).
    #[arg(long, value_name = "OLD=NEW")]
    map_addr: Vec<String>,
}

impl MapArgs {
    fn rebind(&self) -> anyhow::Result<migrt::rebind::Rebind> {
        let mut r = migrt::rebind::Rebind::default();
        let bad = |flag: &'static str| move |e: String| anyhow::anyhow!("{flag}: {e}");
        for p in &self.map_path {
            r.add_path(p).map_err(bad("--map-path"))?;
        }
        for p in &self.map_port {
            r.add_port(p).map_err(bad("--map-port"))?;
        }
        for a in &self.map_addr {
            r.add_addr(a).map_err(bad("--map-addr"))?;
        }
        Ok(r)
    }
}

#[derive(Parser)]
#[command(
    name = "mig",
    version,
    about = "Transparent checkpoint, restore and migration of unmodified Linux programs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start CMD as a new session with the shim preloaded.
    Run {
        /// Session name (unique among live sessions); a number is chosen without it.
        #[arg(long)]
        name: Option<String>,
        /// Print the session's name and return once it runs (output goes to a log file).
        #[arg(long)]
        detach: bool,
        /// Run a statically linked program anyway (the shim cannot reach it).
        #[arg(long)]
        allow_static: bool,
        /// With --detach: where the session's output goes (default: <runtime>/logs/NAME.log).
        #[arg(long, requires = "detach")]
        log: Option<PathBuf>,
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        command: Vec<String>,
    },
    /// List live sessions and their processes.
    Ps {
        #[arg(long)]
        json: bool,
    },
    /// Freeze a session, write its image to DIR, and let it run on (or end it).
    Checkpoint {
        session: String,
        /// The image directory (created; must not hold anything yet).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// End the session once the image is complete and synced.
        #[arg(long)]
        stop: bool,
        /// Checkpoint even if some fds cannot be rebuilt (io_uring, devices, connections
        /// to the outside, ...): the restore puts a stand-in that reads as closed at each
        /// one and reports it.
        #[arg(long)]
        ignore_unsupported: bool,
    },
    /// Bring a checkpointed session back and let it run on.
    Restore {
        /// The image directory `mig checkpoint` wrote.
        dir: PathBuf,
        /// Session name (default: the checkpointed session's).
        #[arg(long)]
        name: Option<String>,
        /// Print the session's name and return once it runs again.
        #[arg(long)]
        detach: bool,
        /// With --detach: where its output goes.
        #[arg(long, requires = "detach")]
        log: Option<PathBuf>,
        /// Restore even if a mapped file (the program, a library) changed since the
        /// checkpoint.
        #[arg(long)]
        allow_changed_files: bool,
        /// The restored process's stdin (default: mig restore's own; /dev/null with --detach).
        #[arg(long, value_name = "FILE")]
        stdin: Option<PathBuf>,
        /// Its stdout (appended to; default: mig restore's own, or the log with --detach).
        #[arg(long, value_name = "FILE")]
        stdout: Option<PathBuf>,
        /// Its stderr (appended to; default: as stdout).
        #[arg(long, value_name = "FILE")]
        stderr: Option<PathBuf>,
        #[command(flatten)]
        map: MapArgs,
    },
    /// Show what a checkpoint image holds (after verifying it).
    Image { dir: PathBuf },
    /// A guided demo on this host: a counter run as a session, inspected, ended.
    Demo,
    /// The demo's subject: counts forever (used by `mig demo`).
    #[command(hide = true)]
    Counter {
        #[arg(long, default_value_t = 5.0)]
        hz: f64,
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Show the state table of every process of a session.
    Table {
        session: String,
        #[arg(long)]
        json: bool,
        /// Also show the most recent journal records.
        #[arg(long)]
        journal: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    match dispatch(cli.cmd) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("mig: {e:#}");
            std::process::exit(1);
        }
    }
}

fn dispatch(cmd: Cmd) -> Result<i32> {
    match cmd {
        Cmd::Run {
            name,
            detach,
            allow_static,
            log,
            command,
        } => run::run(run::RunArgs {
            name,
            detach,
            allow_static,
            log,
            command,
        }),
        Cmd::Ps { json } => {
            let rt = sessions::runtime_dir()?;
            let live = sessions::list(&rt);
            if json {
                println!("{}", serde_json::to_string_pretty(&show::ps_json(&live))?);
            } else {
                print!("{}", show::ps_text(&live));
            }
            Ok(0)
        }
        Cmd::Checkpoint {
            session,
            out,
            stop,
            ignore_unsupported,
        } => checkpoint::checkpoint(&session, &out, stop, ignore_unsupported),
        Cmd::Restore {
            dir,
            name,
            detach,
            log,
            allow_changed_files,
            stdin,
            stdout,
            stderr,
            map,
        } => restore::restore(restore::RestoreArgs {
            dir,
            name,
            detach,
            log,
            allow_changed_files,
            rebind: map.rebind()?,
            stdio: [stdin, stdout, stderr],
        }),
        Cmd::Image { dir } => inspect::inspect(&dir),
        Cmd::Demo => demo::demo(),
        Cmd::Counter { hz, dir } => demo::counter(hz, &dir),
        Cmd::Table {
            session,
            json,
            journal,
        } => {
            let rt = sessions::runtime_dir()?;
            let live = sessions::find(&rt, &session)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&table::json(&live, journal)?)?
                );
            } else {
                print!("{}", table::text(&live, journal)?);
            }
            Ok(0)
        }
    }
}
