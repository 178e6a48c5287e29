//! mig — launch migshim sessions, list them, read their state tables.

mod client;
mod elf;
mod run;
mod sessions;
mod show;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use migrt::wire::{Request, Response};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "mig", version, about = "Transparent checkpoint, restore and migration of unmodified Linux programs")]
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
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// List live sessions and their processes.
    Ps {
        #[arg(long)]
        json: bool,
    },
    /// Show the state table of every process of a session.
    Table {
        session: String,
        #[arg(long)]
        json: bool,
        /// Also show the journal records not yet folded into the table.
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
        Cmd::Run { name, detach, allow_static, log, command } => run::run(run::RunArgs {
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
        Cmd::Table { session, json, journal } => {
            let rt = sessions::runtime_dir()?;
            let live = sessions::find(&rt, &session)?;
            let mut tables = Vec::new();
            for p in live.processes() {
                let mut c = match client::Client::connect(&live.dir, p.vpid, p.pid, live.table.signal()) {
                    Ok(c) => c,
                    // It may have exited since it was listed.
                    Err(_) if !migrt::sys::alive(p.pid) => continue,
                    Err(e) => return Err(e),
                };
                match c.call(&Request::Table { journal })? {
                    Response::Table { table, journal } => tables.push((table, journal)),
                    other => bail!("process {}: unexpected answer {other:?}", p.vpid),
                }
            }
            let mut plain: Vec<_> = tables.iter().map(|(t, _)| t.clone()).collect();
            migrt::link::link_peers(&mut plain);
            for ((t, _), linked) in tables.iter_mut().zip(plain) {
                *t = linked;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&show::table_json(&live, &tables))?);
            } else {
                print!("{}", show::table_text(&live, &tables));
            }
            Ok(0)
        }
    }
}
