//! Faults from the machine itself, not the network (issue 13): a second agent
//! on one machine, inputs that are not regular files, and a log stream that
//! goes away. Each test drives the real binary; the agents that mount run the
//! real buildkitd on a loop device under the test's own directory.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use nix::sys::signal::Signal;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;
use support::engine::{readyz, wait_ready, World};
use support::{agent, base_config, cleanup_engine_of, cleanup_volumes_under, engine_pid, free_port, http_get, process_alive, WAIT};
use tokio::time::Instant;

/// A refused second agent, or a refused input, answers within this: it reads a
/// few KiB and touches nothing, so anything slower is waiting on something.
const AT_ONCE: Duration = Duration::from_secs(5);

/// The mountinfo line of whatever is mounted at `path`, if anything: it
/// carries the mount id and the device, so an equal line is the same mount.
fn mount_line(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines().find(|l| l.split(' ').nth(4) == path.to_str()).map(str::to_string)
}

/// Loop devices whose backing file is `file`.
fn loops_backed_by(file: &Path) -> Vec<String> {
    let mut found = vec![];
    for entry in std::fs::read_dir("/sys/block").unwrap().flatten() {
        if let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) {
            if Path::new(backing.trim()) == file {
                found.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    found
}

// === one agent per machine ===

#[tokio::test]
async fn a_second_agent_on_the_same_state_dir_exits_2_at_once_naming_the_holder_and_the_first_keeps_serving_its_mount() {
    let w = World::new();
    let mut first = w.start();
    let base = wait_ready(&first).await;
    let engine = engine_pid(&w.root).expect("the first agent's engine");
    let mounted = mount_line(&w.cache()).expect("the first agent mounted the cache");

    // One config, only another endpoints port: what the issue saw. The config
    // lives in a directory of its own, so this agent's guard cleans up nothing of the first's.
    let elsewhere = tempfile::tempdir().unwrap();
    let config = elsewhere.path().join("config.toml");
    let text = std::fs::read_to_string(&w.config).unwrap().replacen("127.0.0.1:0", &format!("127.0.0.1:{}", free_port()), 1);
    std::fs::write(&config, text).unwrap();
    let started = Instant::now();
    let mut second = agent(&config).standalone(&w.task).start();
    let status = second.wait_exit(AT_ONCE * 2).await;
    let took = started.elapsed();
    let logs = second.logs();
    eprintln!("second agent: {status} after {took:?}");

    assert_eq!(status.code(), Some(2), "a second agent exits 2; log:\n{logs}");
    assert!(took < AT_ONCE, "refused at once, took {took:?}");
    assert!(logs.contains(&format!("pid {}", first.pid)), "the message names the holder's pid {}; log:\n{logs}", first.pid);
    assert!(logs.contains(&w.root.join("state").display().to_string()), "the message names the state dir; log:\n{logs}");
    for touched in ["endpoints serving", "already mounted", "formatting", "engine"] {
        assert!(!logs.contains(touched), "the second agent touched nothing, yet logged {touched:?}:\n{logs}");
    }

    assert!(process_alive(first.pid), "the first agent lives");
    assert_eq!(engine_pid(&w.root), Some(engine), "the first agent's engine is the same process");
    assert!(process_alive(engine), "the first agent's engine lives");
    assert_eq!(mount_line(&w.cache()).as_deref(), Some(mounted.as_str()), "the cache is the same mount");
    assert_eq!(readyz(&base).await.0, 200, "the first agent still serves");

    first.signal(Signal::SIGTERM);
    let status = first.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(0), "the first agent still drains cleanly; log:\n{}", first.logs());
    assert_eq!(mount_line(&w.cache()), None);
}

#[tokio::test]
async fn a_drain_never_kills_or_unmounts_what_another_live_agent_holds() {
    let w = World::new();
    let first = w.start();
    let base = wait_ready(&first).await;
    let engine = engine_pid(&w.root).expect("the first agent's engine");
    let mounted = mount_line(&w.cache()).expect("the first agent mounted the cache");

    // Another state dir (so the lock does not stop it), the same task and so
    // the same cache, and the last resort switched on: it would SIGKILL
    // whatever keeps the cache busy once half its unmount timeout has passed.
    let other = tempfile::tempdir().unwrap();
    let other_root = other.path().canonicalize().unwrap();
    let config = other_root.join("config.toml");
    let text = base_config(&other_root)
        .replace(&other_root.join("mnt").display().to_string(), &w.root.join("mnt").display().to_string())
        .replace(&format!("allowed_backing_dirs = [\"{}\"]", other_root.display()), &format!("allowed_backing_dirs = [\"{}\"]", w.root.display()))
        .replace("unmount_timeout_secs = 5", "unmount_timeout_secs = 4\nkill_holders = true");
    std::fs::write(&config, text).unwrap();
    let mut second = agent(&config).standalone(&w.task).start();
    second.wait_for_log("already mounted").await;
    let started = Instant::now();
    second.signal(Signal::SIGTERM);
    let status = second.wait_exit(WAIT).await;
    eprintln!("second agent: {status} {:?} after SIGTERM", started.elapsed());
    let logs = second.logs();

    assert!(process_alive(first.pid), "the first agent was not killed; second's log:\n{logs}");
    assert!(process_alive(engine), "the first agent's engine was not killed; second's log:\n{logs}");
    assert_eq!(mount_line(&w.cache()).as_deref(), Some(mounted.as_str()), "the cache stays mounted");
    assert_eq!(readyz(&base).await.0, 200, "the first agent still serves");
    assert!(!logs.contains("SIGKILL to a process"), "nothing was killed:\n{logs}");
    assert!(logs.contains(&format!("machine-agent (pid {})", first.pid)), "the drain names the agent that holds the cache:\n{logs}");
    assert_eq!(status.code(), Some(1), "a drain that leaves a mount behind is incomplete: exit 1; log:\n{logs}");
    drop(first);
}

// === inputs that are not files ===

/// `machine-agent <args>` under a 1 GiB address-space limit (so a runaway read
/// fails instead of eating the machine), killed if it runs past `within`.
/// None when it had to be killed.
async fn run_bounded(args: &[&str], within: Duration) -> Option<(ExitStatus, String)> {
    let mut child = Command::new("prlimit")
        .arg("--as=1073741824")
        .arg(env!("CARGO_BIN_EXE_machine-agent"))
        .args(args)
        .env_remove("MACHINE_AGENT_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("prlimit (util-linux)");
    // Drained on a thread: a child blocked on a full stderr pipe would look hung.
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some((status, reader.join().unwrap()));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        // Polling a child's exit: std has no wait with a timeout.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

#[tokio::test]
async fn check_refuses_fifos_and_devices_for_every_input_quickly_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let fifo = root.join("fifo");
    mkfifo(&fifo);
    let good_config = root.join("config.toml");
    std::fs::write(&good_config, base_config(root)).unwrap();
    let good_task = support::write_task_file(root, &root.join("mnt"));
    let good = |p: &Path| p.to_str().unwrap().to_string();

    let mut failures = vec![];
    for odd in [fifo.clone(), PathBuf::from("/dev/zero")] {
        let odd_s = odd.display().to_string();
        // (what, the check's arguments)
        let mut cases: Vec<(&str, Vec<String>)> = vec![];
        cases.push(("config", vec!["check".into(), "--config".into(), odd_s.clone()]));
        cases.push(("task file", vec!["check".into(), "--config".into(), good(&good_config), "--task".into(), odd_s.clone()]));
        let pem_task = root.join(format!("task-pem-{}.toml", odd.file_name().unwrap().to_string_lossy()));
        std::fs::write(&pem_task, std::fs::read_to_string(&good_task).unwrap().replace("\"server.pem\"", &format!("{odd_s:?}"))).unwrap();
        cases.push(("task PEM file", vec!["check".into(), "--config".into(), good(&good_config), "--task".into(), good(&pem_task)]));
        let cp = |identity: &str, ca: &str| format!("{}\n[control_plane]\nurl = \"https://cp.example\"\n{ca}\n[identity]\n{identity}\n", base_config(root));
        let ca_config = root.join(format!("ca-{}.toml", odd.file_name().unwrap().to_string_lossy()));
        std::fs::write(&ca_config, cp("mode = \"aws\"", &format!("ca_bundle = {odd_s:?}"))).unwrap();
        cases.push(("CA bundle", vec!["check".into(), "--config".into(), good(&ca_config)]));
        let token_config = root.join(format!("token-{}.toml", odd.file_name().unwrap().to_string_lossy()));
        std::fs::write(&token_config, cp(&format!("mode = \"static_token\"\ntoken_file = {odd_s:?}"), "")).unwrap();
        cases.push(("token file", vec!["check".into(), "--config".into(), good(&token_config)]));

        for (what, args) in cases {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let started = Instant::now();
            match run_bounded(&args, AT_ONCE).await {
                None => failures.push(format!("{what} = {odd_s}: still running after {AT_ONCE:?}")),
                Some((status, stderr)) => {
                    let took = started.elapsed();
                    eprintln!("{what} = {odd_s}: {status} in {took:?}");
                    if status.code() != Some(2) || !stderr.contains(&odd_s) || !stderr.contains("not a regular file") {
                        failures.push(format!("{what} = {odd_s}: {status}, expected exit 2 naming the file as not a regular one; stderr:\n{stderr}"));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} case(s) failed:\n{}", failures.len(), failures.join("\n"));
}

#[tokio::test]
async fn a_huge_one_line_config_is_refused_quoting_a_short_excerpt_only() {
    let dir = tempfile::tempdir().unwrap();
    // Under the size cap: refused by the parser, which must not echo it back.
    let long_line = dir.path().join("long-line.toml");
    std::fs::write(&long_line, "a".repeat(200 << 10)).unwrap();
    // 100 MB (sparse): refused by its size before a byte of it is read.
    let huge = dir.path().join("huge.toml");
    let file = std::fs::File::create(&huge).unwrap();
    std::io::Write::write_all(&mut &file, b"x").unwrap();
    file.set_len(100 << 20).unwrap();
    drop(file);

    for path in [&long_line, &huge] {
        let started = Instant::now();
        let (status, stderr) = run_bounded(&["check", "--config", path.to_str().unwrap()], AT_ONCE)
            .await
            .unwrap_or_else(|| panic!("check of {} still running after {AT_ONCE:?}", path.display()));
        let took = started.elapsed();
        eprintln!("{}: {status} in {took:?}, {} bytes of stderr", path.display(), stderr.len());
        assert_eq!(status.code(), Some(2), "{}: exit 2", path.display());
        assert!(stderr.contains(path.to_str().unwrap()), "the message names the file:\n{stderr}");
        assert!(stderr.len() < 1024, "{}: {} bytes of stderr; a short excerpt at most:\n{}", path.display(), stderr.len(), &stderr[..stderr.len().min(2048)]);
    }
}

// === losing the log ===

/// An agent started by hand, its stdout and stderr one pipe (`2>&1 | ...`);
/// killed, and whatever it left under the test's directory undone, on drop.
struct PipedAgent {
    child: Child,
    root: PathBuf,
}

impl Drop for PipedAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        cleanup_engine_of(&self.root);
        cleanup_volumes_under(&self.root);
    }
}

/// The sum of every `machine_agent_gc_runs_total` series in a scrape.
fn gc_runs(scrape: &str) -> f64 {
    scrape.lines().filter(|l| l.starts_with("machine_agent_gc_runs_total{")).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

#[tokio::test]
async fn an_agent_whose_log_reader_exits_keeps_running_and_drains_cleanly_on_sigterm() {
    let w = World::new();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    // A GC run every second logs a line every second: the agent keeps writing to the closed pipe.
    let text = std::fs::read_to_string(&w.config).unwrap().replacen("127.0.0.1:0", &format!("127.0.0.1:{port}"), 1);
    std::fs::write(&w.config, format!("{text}\n[gc]\ninterval_secs = 1\n")).unwrap();

    // Close-on-exec: a read end leaked into the agent would keep its own pipe open.
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_machine-agent"));
    cmd.args(["run", "--config", w.config.to_str().unwrap(), "--standalone", w.task.to_str().unwrap()])
        .env("MACHINE_AGENT_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end.try_clone().unwrap()))
        .stderr(Stdio::from(write_end));
    let mut agent = PipedAgent { child: cmd.spawn().unwrap(), root: w.root.clone() };
    drop(cmd); // the parent's copies of the write end: the reader below must be the pipe's last one

    // `| head -c 500`: read 500 bytes, then close the pipe for good.
    let mut head = vec![0u8; 500];
    std::fs::File::from(read_end).read_exact(&mut head).unwrap();
    eprintln!("head -c 500 read:\n{}", String::from_utf8_lossy(&head));

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(agent.child.try_wait().unwrap().is_none(), "the agent exited after its log pipe closed: {:?}", agent.child.try_wait());
        if reqwest::get(format!("{base}/readyz")).await.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "/readyz not 200 within 60 s of start");
        tokio::time::sleep(Duration::from_millis(200)).await; // polling an endpoint; nothing to await from outside
    }
    let engine = engine_pid(&w.root).expect("an engine");

    // Two GC runs after the pipe closed, each logged: the agent wrote into the
    // broken pipe at least twice and is still counting.
    let before = gc_runs(&http_get(&base, "/metrics").await.1);
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(agent.child.try_wait().unwrap().is_none(), "the agent exited after its log pipe closed: {:?}", agent.child.try_wait());
        let (_, scrape) = http_get(&base, "/metrics").await;
        if gc_runs(&scrape) >= before + 2.0 {
            break;
        }
        assert!(Instant::now() < deadline, "GC runs stopped at {} (from {before}) after the log pipe closed", gc_runs(&scrape));
        tokio::time::sleep(Duration::from_millis(200)).await; // polling a counter; no event to await from outside
    }
    assert!(process_alive(engine), "the engine outlives the agent's log pipe");
    assert_eq!(readyz(&base).await.0, 200);

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(agent.child.id()).unwrap()), Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit within {WAIT:?} of SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await; // std has no async wait for a child
    };
    assert_eq!(status.code(), Some(0), "a clean drain exits 0, got {status}");
    assert_eq!(mount_line(&w.cache()), None, "nothing left mounted");
    assert_eq!(loops_backed_by(&w.root.join("cache.img")), Vec::<String>::new(), "no loop device left attached");
    assert!(!process_alive(engine), "the engine was stopped");
    assert_eq!(support::test_cgroup_dirs(&w.root), Vec::<PathBuf>::new(), "the engine cgroup is gone");
}
