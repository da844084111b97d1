//! The `machine-agent` binary: parses the CLI, sets up logging, loads and
//! validates the config (every problem at once), and only then runs the agent.
//! Only this file turns errors into text and exit codes.

use clap::{Parser, Subcommand};
use machine_agent::agent::{self, AgentError, Mode};
use machine_agent::config::{Config, ConfigError, ProcessEnv, DEFAULT_CONFIG_PATH};
use machine_agent::instance::LockError;
use machine_agent::systemd::{Notifier, NotifyEnv};
use machine_agent::task::{load_task_file, TaskError, TaskLimits};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

/// `println!` that loses the line, instead of panicking, when stdout is closed
/// (`check | head -1`): the exit code must still say what happened.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// The same for stderr, in place of `eprintln!`.
macro_rules! complain {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Exit codes, as systemd and operators see them.
#[derive(Debug, Clone, Copy)]
enum Exit {
    /// A clean drain, or a successful command.
    Clean = 0,
    /// A runtime failure: the drain was incomplete, a port could not be bound...
    Runtime = 1,
    /// Bad command line, config or task file, or another agent already holds
    /// the state dir: fix the input or the deployment, do not restart.
    Usage = 2,
    /// Handed off (SIGUSR2, `machine-agent handoff`): restart me, the engine
    /// runs on. EX_TEMPFAIL; the unit's Restart=always restarts it.
    HandedOff = 75,
}

#[derive(Debug, Parser)]
#[command(name = "machine-agent", version, about = "Builder VM agent: registers, prepares the cache volume, supervises buildkitd")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent until it is told to drain.
    Run {
        /// The agent's config file.
        #[arg(long, env = "MACHINE_AGENT_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Serve this task file instead of registering with a control plane.
        #[arg(long, value_name = "TASK.toml")]
        standalone: Option<PathBuf>,
    },
    /// Validate a config file (and optionally a task file); print every problem.
    Check {
        #[arg(long, env = "MACHINE_AGENT_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long, value_name = "TASK.toml")]
        task: Option<PathBuf>,
    },
    /// Print what the running agent's cache GC would prune now, and why
    /// (against the live engine, with the agent's own policy); prunes nothing.
    Gc {
        #[arg(long, env = "MACHINE_AGENT_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Required: real runs belong to the agent's GC loop, one at a time.
        #[arg(long, required = true)]
        dry_run: bool,
    },
    /// Make the running agent exit at once without draining (for an upgrade):
    /// the engine, its mounts and cgroup stay, and the next agent adopts them.
    Handoff {
        #[arg(long, env = "MACHINE_AGENT_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Print the agent's version and architecture.
    Version,
}

fn main() -> ExitCode {
    abort_on_panic();
    let cli = Cli::parse();
    machine_agent::observe::init_tracing(std::env::var("MACHINE_AGENT_LOG").ok().as_deref());
    let exit = match cli.command {
        Command::Version => {
            say!("machine-agent {} ({})", env!("CARGO_PKG_VERSION"), std::env::consts::ARCH);
            Exit::Clean
        }
        Command::Check { config, task } => check(&config, task.as_deref()),
        Command::Run { config, standalone } => run(&config, standalone.as_deref()),
        Command::Gc { config, dry_run: _ } => gc_dry_run(&config),
        Command::Handoff { config } => handoff(&config),
    };
    ExitCode::from(exit as u8)
}

/// A panic anywhere ends the process at once, as the release profile's
/// `panic = "abort"` does, in every build: without this a debug build's panic
/// in a spawned tokio task would end only that task (the supervisor, say) and
/// leave a half-alive agent, and one in the main task would unwind and run
/// destructors a release build never runs. Either way the engine, mounts and
/// cgroup stay as they are, for the next agent (systemd restarts a crash) to
/// adopt: a crash is a handoff. The default hook prints the message and
/// location first.
fn abort_on_panic() {
    let print = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        print(info);
        std::process::abort();
    }));
}

fn check(config_path: &std::path::Path, task_path: Option<&std::path::Path>) -> Exit {
    let mut ok = true;
    let mut spec_dirs = None;
    let limits = match Config::load(config_path, &ProcessEnv) {
        Ok(config) => {
            say!("{}: ok", config_path.display());
            spec_dirs = Some(config.engine.cdi.spec_dirs.clone());
            Some(config.task_limits())
        }
        Err(e) => {
            ok = false;
            print_config_error(config_path, &e);
            None
        }
    };
    if let Some(task_path) = task_path {
        // With an invalid config there is no allow-list; check everything else.
        let limits = limits.clone().unwrap_or(TaskLimits {
            allowed_mount_prefixes: vec!["/".into()],
            allowed_backing_dirs: vec!["/".into()],
            reserved_paths: vec![],
            allowed_engine_env: Default::default(),
            trace_endpoints: Default::default(),
        });
        // The devices against this machine's CDI specs, when the config says where they are.
        let checked = load_task_file(task_path, &limits).and_then(|task| match &spec_dirs {
            Some(dirs) => machine_agent::engine::cdi::check_devices(&task.devices, dirs),
            None => Ok(()),
        });
        match checked {
            Ok(()) => say!("{}: ok", task_path.display()),
            Err(e) => {
                ok = false;
                print_task_error(task_path, &e);
            }
        }
    }
    if ok {
        Exit::Clean
    } else {
        Exit::Usage
    }
}

fn print_config_error(path: &std::path::Path, e: &ConfigError) {
    match e {
        ConfigError::Read(_) => complain!("{e}"),
        ConfigError::Invalid(n, list) => {
            complain!("{}: {n} problem(s):", path.display());
            for p in &list.0 {
                complain!("  {p}");
            }
        }
    }
}

fn print_task_error(path: &std::path::Path, e: &TaskError) {
    complain!("{}: {} problem(s):", path.display(), e.count());
    for p in &e.0 {
        complain!("  {}: {}", p.field, p.problem);
    }
    if e.1 > 0 {
        complain!("  and {} more not listed", e.1);
    }
}

fn run(config_path: &std::path::Path, standalone: Option<&std::path::Path>) -> Exit {
    let config = match Config::load(config_path, &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            print_config_error(config_path, &e);
            return Exit::Usage;
        }
    };
    let mode = match standalone {
        None if config.control_plane.is_none() => {
            complain!("{}: {}", config_path.display(), AgentError::NoControlPlane);
            return Exit::Usage;
        }
        None => Mode::ControlPlane,
        Some(path) => {
            let limits = config.task_limits();
            match load_task_file(path, &limits) {
                Ok(task) => Mode::Standalone(Box::new(task)),
                Err(e) => {
                    print_task_error(path, &e);
                    return Exit::Usage;
                }
            }
        }
    };
    let notifier = Notifier::new(&NotifyEnv::from_process());
    // Two workers: the agent is I/O bound, and a second thread keeps the
    // endpoints answering while the other is busy.
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            complain!("cannot start the async runtime: {e}");
            return Exit::Runtime;
        }
    };
    let result = runtime.block_on(agent::run(config, mode, notifier));
    // A flush or an unmount the drain abandoned at its deadline may still be
    // running on a blocking thread: exit without waiting for it (the kernel
    // finishes the writeback either way), as the shutdown report already said.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_WAIT);
    match result {
        Ok(()) => Exit::Clean,
        Err(e) => {
            tracing::error!(error = %e, "agent failed");
            exit_code(&e)
        }
    }
}

/// Long enough for tasks that end on their own to finish their last write.
const RUNTIME_SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

fn gc_dry_run(config_path: &std::path::Path) -> Exit {
    let config = match Config::load(config_path, &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            print_config_error(config_path, &e);
            return Exit::Usage;
        }
    };
    let run_file = machine_agent::engine::EngineFiles::under(&config.state_dir).gc_run;
    let run: machine_agent::gc::executor::GcRun = match std::fs::read(&run_file).map(|b| serde_json::from_slice(&b)) {
        Ok(Ok(run)) => run,
        Ok(Err(e)) => {
            complain!("{}: {e}", run_file.display());
            return Exit::Runtime;
        }
        Err(e) => {
            complain!("{}: {e} (the agent writes it once its engine is ready: is a task running?)", run_file.display());
            return Exit::Runtime;
        }
    };
    let run = machine_agent::gc::executor::GcRun { dry_run: true, ..run };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            complain!("cannot start the async runtime: {e}");
            return Exit::Runtime;
        }
    };
    let socket = config.engine.socket.clone();
    let result = runtime.block_on(async move {
        let client = machine_agent::engine::client::EngineClient::connect(&socket).await?;
        run.run(&client, machine_agent::gc::executor::Trigger::Manual).await
    });
    match result {
        Ok(report) => {
            say!("{}", report.explain());
            Exit::Clean
        }
        Err(e) => {
            complain!("{e}");
            Exit::Runtime
        }
    }
}

/// Every agent error's exit code; no wildcard, so a new variant forces a decision.
fn exit_code(e: &AgentError) -> Exit {
    match e {
        AgentError::NoControlPlane => Exit::Usage,
        // A second agent on one state dir is a deployment mistake, not a
        // crash: restarting it would only fight the first one again.
        AgentError::Instance(LockError::Held { .. }) => Exit::Usage,
        AgentError::Instance(LockError::Open { .. } | LockError::Record { .. }) => Exit::Runtime,
        AgentError::Http(_) | AgentError::Control(_) | AgentError::Signals(_) | AgentError::StateDir { .. } | AgentError::DrainIncomplete(_) => Exit::Runtime,
        AgentError::HandedOff => Exit::HandedOff,
        // A task file naming a device no spec defines: the operator's input, like a bad field.
        AgentError::Task(_) => Exit::Usage,
    }
}

/// How long `handoff` waits for the agent to be gone: it exits at once, without a drain.
const HANDOFF_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Sends the running agent SIGUSR2 and waits until it has exited.
fn handoff(config_path: &std::path::Path) -> Exit {
    let config = match Config::load(config_path, &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            print_config_error(config_path, &e);
            return Exit::Usage;
        }
    };
    let pid = match machine_agent::instance::running_agent(&config.state_dir) {
        Ok(Some(pid)) => pid,
        Ok(None) => {
            complain!("no agent holds {}: nothing to hand off", config.state_dir.display());
            return Exit::Runtime;
        }
        Err(e) => {
            complain!("cannot read the agent lock in {}: {e}", config.state_dir.display());
            return Exit::Runtime;
        }
    };
    let target = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(0));
    if let Err(e) = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGUSR2) {
        complain!("cannot signal the agent (pid {pid}): {e}");
        return Exit::Runtime;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            complain!("cannot start the async runtime: {e}");
            return Exit::Runtime;
        }
    };
    let still_there = || {
        std::path::Path::new(&format!("/proc/{pid}")).exists() && matches!(machine_agent::instance::running_agent(&config.state_dir), Ok(Some(p)) if p == pid)
    };
    let gone = runtime.block_on(async {
        tokio::time::timeout(HANDOFF_WAIT, async {
            while still_there() {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await
    });
    if gone.is_err() {
        complain!("the agent (pid {pid}) did not exit within {HANDOFF_WAIT:?}");
        return Exit::Runtime;
    }
    say!("handed off: the agent (pid {pid}) exited; the engine keeps running for the next agent to adopt");
    Exit::Clean
}
