//! mig — launch migshim sessions, list them, read their state tables.

mod agentd;
mod checkpoint;
mod client;
mod demo;
mod elf;
mod frozen;
mod inherit;
mod inspect;
mod migrate;
mod netaddr;
mod objects;
mod outgoing;
mod owner;
mod pager;
mod peer;
mod prebuilt;
mod relay;
mod restore;
mod run;
mod samepages;
mod sessions;
mod show;
mod sockets;
mod sparse;
mod spool;
mod sysv;
mod table;
mod terminal;
mod walkhelp;

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
    /// The same rules as `mig restore` arguments.
    fn args(&self) -> Vec<String> {
        let flags = [
            ("--map-path", &self.map_path),
            ("--map-port", &self.map_port),
            ("--map-addr", &self.map_addr),
        ];
        flags
            .iter()
            .flat_map(|(f, v)| v.iter().flat_map(move |r| [f.to_string(), r.clone()]))
            .collect()
    }

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
        /// Ask the agent on HOST[:PORT] instead (its sessions; an agent running as root
        /// answers with yours there).
        #[arg(long, value_name = "HOST[:PORT]")]
        host: Option<String>,
        /// The agents' shared key (default: $MIGSHIM_KEY, else ~/.config/migshim/agent.key).
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
    },
    /// The per-host daemon: accepts sessions from peers holding the shared key, restores
    /// them here, answers `mig ps --host`.
    Agent {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7070", value_name = "ADDR")]
        listen: String,
        /// The shared key (made if missing; default: $MIGSHIM_KEY, else
        /// ~/.config/migshim/agent.key).
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// Where incoming images and the sessions restored here live (default: the runtime
        /// directory `mig ps` reads).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Sessions that may come in at the same time.
        #[arg(long, default_value_t = 2)]
        max_incoming: usize,
        /// Largest session image accepted, in bytes.
        #[arg(long, default_value_t = 64 << 30)]
        max_bytes: u64,
        /// Seconds a peer may stay silent.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Move a running session to the agent on another host; it ends here only once it runs
    /// there (any failure leaves it running here).
    Migrate {
        session: String,
        /// The target agent.
        #[arg(long, value_name = "HOST[:PORT]")]
        to: String,
        /// precopy (default): memory is sent while the session runs, round after round, and
        /// only what it wrote since is sent frozen; stop-and-copy: all of it frozen; lazy: it
        /// runs there at once, its memory fetched from here on demand and in the background
        /// while it is kept frozen here (ended once all is there).
        #[arg(long, value_enum, default_value_t = migrate::Mode::Precopy)]
        mode: migrate::Mode,
        /// The agents' shared key (default: $MIGSHIM_KEY, else ~/.config/migshim/agent.key).
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// Move it even if some fds cannot be rebuilt (they read as closed there).
        #[arg(long)]
        ignore_unsupported: bool,
        /// An IPv4 address of this host that moves with the session (root): taken off
        /// here once the session is frozen, put on the target's interface on the same
        /// subnet and announced there. The session's TCP connections from it to peers
        /// outside are handed over whole (repair mode): they pause, and go on there.
        #[arg(long, value_name = "ADDR")]
        move_addr: Vec<std::net::Ipv4Addr>,
        /// Seconds to wait for the agent at each step.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Let the target fill in every process's memory after it runs, even what a forked
        /// tree's processes had alike, shared copy-on-write: a shorter freeze, but there
        /// each gets a copy of its own. Without it, such memory is copied in before they
        /// run, once, and shared again (the freeze grows with it: ~75 ms for 48 MiB here).
        #[arg(long)]
        no_sharing: bool,
        #[command(flatten)]
        map: MapArgs,
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
        /// Let it run at once, its memory filled in afterwards: every page it touches is
        /// fetched from the image on demand, the rest in the background (userfaultfd: root,
        /// or vm.unprivileged_userfaultfd=1; else the pages are copied in first, as without).
        #[arg(long)]
        lazy: bool,
        /// With --lazy: fill in every process's memory after it runs, even what a forked
        /// tree's processes had alike, shared copy-on-write (a shorter wait, but each gets a
        /// copy of its own). Without it, such memory is copied in first, once, and shared
        /// again.
        #[arg(long)]
        no_sharing: bool,
        /// (For the agent: start now, while the image still comes, and restore once a line
        /// `go` comes on stdin; end without one. The agent has checked the stream's MAC by
        /// then: page data is not checked again.)
        #[arg(long, hide = true)]
        when_told: bool,
        /// (For the agent, with --lazy: the pages the image keeps in a migration's source
        /// are asked for on this inherited stream socket; see pager.rs.)
        #[arg(long, value_name = "FD", hide = true, requires = "lazy")]
        pages_from: Option<i32>,
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
    quiet_on_a_closed_output();
    let cli = Cli::parse();
    match dispatch(cli.cmd) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("mig: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Output read by a reader that stops early (`mig ps | head -1`) ends mig as it would end
/// a C program, by SIGPIPE's status, without a panic's message: println! panics on a
/// closed pipe, and mig keeps SIGPIPE ignored (a peer or restore that vanishes is an
/// error it handles, not its death). What mig was asked to do is done by then.
fn quiet_on_a_closed_output() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let said = info
            .payload()
            .downcast_ref::<String>()
            .map_or("", String::as_str);
        if said.starts_with("failed printing to stdout") && said.contains("Broken pipe") {
            std::process::exit(128 + libc::SIGPIPE);
        }
        report(info);
    }));
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
        Cmd::Ps {
            host: Some(host),
            key,
            json,
        } => {
            let key = peer::read_key(&peer::key_path(key.as_deref()))?;
            let mut link = peer::connect(&host, &key, std::time::Duration::from_secs(10))?;
            link.send(&peer::Msg::Ps {
                json,
                uid: migrt::sys::getuid(),
            })?;
            match link.recv()? {
                peer::Msg::Sessions(text) => print!("{text}"),
                peer::Msg::Refused(why) => anyhow::bail!("the agent at {host} refused: {why}"),
                other => anyhow::bail!("the agent at {host} said {other:?}"),
            }
            Ok(0)
        }
        Cmd::Agent {
            listen,
            key,
            state_dir,
            max_incoming,
            max_bytes,
            timeout,
        } => agentd::agent(agentd::AgentArgs {
            listen,
            key,
            state_dir,
            max_incoming,
            max_bytes,
            timeout: std::time::Duration::from_secs(timeout),
        }),
        Cmd::Migrate {
            session,
            to,
            mode,
            key,
            ignore_unsupported,
            move_addr,
            timeout,
            no_sharing,
            map,
        } => {
            map.rebind()?; // refused here, not on the target
            let mut restore_args = map.args();
            if no_sharing {
                restore_args.push("--no-sharing".into());
            }
            migrate::migrate(migrate::MigrateArgs {
                session,
                to,
                mode,
                key,
                ignore_unsupported,
                move_addr,
                restore_args,
                timeout: std::time::Duration::from_secs(timeout),
            })
        }
        Cmd::Ps { json, .. } => {
            migrt::sys::quiet_broken_pipe();
            let rt = sessions::runtime_dir()?;
            print!("{}", show::ps(&sessions::list(&rt), json)?);
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
            lazy,
            no_sharing,
            when_told,
            pages_from,
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
            lazy,
            no_sharing,
            when_told,
            pages_from: pages_from.map(migrt::sys::take_inherited).transpose()?,
            rebind: map.rebind()?,
            stdio: [stdin, stdout, stderr],
        }),
        Cmd::Image { dir } => {
            migrt::sys::quiet_broken_pipe();
            inspect::inspect(&dir)
        }
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
