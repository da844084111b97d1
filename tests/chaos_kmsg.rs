//! The kernel log is the kernel's: lines written into the real /dev/kmsg from
//! user space - forged OOM reports that name the live buildkitd, and a flood
//! of garbage - while the real agent runs a real engine. None of it may count
//! as a kill or blame the engine. A real OOM kill made afterwards (in a memory
//! cgroup of the test's own) must still be reported: the kernel log is read
//! in order, so once the agent reports it, it has read every forged line.
//!
//! This writes into the host's one kernel log: every agent on the host reads
//! the forged lines (ours are marked `chaos-kmsg`), and the garbage flood
//! overruns the ring for a second or two.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use machine_agent::proto::v1 as pb;
use rand::{Rng, SeedableRng};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::engine::{readyz, wait_ready, World};
use support::{agent, metric_value, test_cgroup_name};

/// The reproduction: 2,000 forged lines and 200,000 lines of garbage.
const FORGED_LINES: usize = 2_000;
const GARBAGE_LINES: usize = 200_000;
/// /dev/kmsg drops a user's writes beyond 10 per 5 s per open file
/// (printk_devkmsg=ratelimit): a fresh open for each batch gets them all in.
const LINES_PER_OPEN: usize = 10;

// === the kernel log, from user space ===

/// Writes each line as one record, through a fresh open per batch.
fn write_to_kmsg(lines: &[String]) {
    for batch in lines.chunks(LINES_PER_OPEN) {
        let mut kmsg = std::fs::OpenOptions::new().write(true).open("/dev/kmsg").expect("open /dev/kmsg for writing (root)");
        for line in batch {
            // One write is one record; an EINVAL (too long) is the kernel refusing, not a test failure.
            let _ = kmsg.write_all(line.as_bytes());
        }
    }
}

/// A non-blocking reader of /dev/kmsg from its end: what the kernel made of our writes.
struct KmsgTail(std::fs::File);

impl KmsgTail {
    fn open() -> Self {
        let file = std::fs::OpenOptions::new().read(true).custom_flags(nix::libc::O_NONBLOCK).open("/dev/kmsg").unwrap();
        nix::unistd::lseek(std::os::fd::AsRawFd::as_raw_fd(&file), 0, nix::unistd::Whence::SeekEnd).unwrap();
        Self(file)
    }

    /// Every record available now: (priority, message).
    fn drain(&mut self) -> Vec<(u32, String)> {
        let mut out = vec![];
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match self.0.read(&mut buf) {
                Ok(0) => return out,
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    let first = text.lines().next().unwrap_or_default();
                    if let Some((header, message)) = first.split_once(';') {
                        let prio = header.split(',').next().and_then(|p| p.parse().ok()).unwrap_or(u32::MAX);
                        out.push((prio, message.to_string()));
                    }
                }
                Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => continue, // overrun: carry on from the oldest left
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return out,
                Err(e) => panic!("reading /dev/kmsg: {e}"),
            }
        }
    }
}

/// A complete OOM report in the kernel's words (6.x, v1 and v2 memcg alike)
/// that names the engine's daemon cgroup and buildkitd's pid, under a
/// priority prefix of the forger's choice (`<0>` claims the kernel's).
fn forged_engine_report(engine_cgroup: &str, engine_pid: u32, prefix: &str) -> [String; 3] {
    [
        format!("{prefix}buildkitd invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0"),
        format!(
            "{prefix}oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg={engine_cgroup},task_memcg={engine_cgroup}/daemon,task=buildkitd,pid={engine_pid},uid=0"
        ),
        format!(
            "{prefix}Memory cgroup out of memory: Killed process {engine_pid} (buildkitd) total-vm:4000000kB, anon-rss:3900000kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:7700kB oom_score_adj:0"
        ),
    ]
}

/// FORGED_LINES lines: whole reports against the engine, lone `Killed
/// process` lines, a build step's report, the pre-4.19 forms, and whole
/// kmsg records (header and all) as the message.
fn forged_lines(engine_cgroup: &str, engine_pid: u32) -> Vec<String> {
    let prefixes = ["", "<0>", "<3>", "<4>", "<6>", "<8>"];
    let mut lines = vec![];
    let mut i = 0usize;
    while lines.len() < FORGED_LINES {
        let prefix = prefixes[i % prefixes.len()];
        match i % 5 {
            0 | 1 => lines.extend(forged_engine_report(engine_cgroup, engine_pid, prefix)),
            2 => lines.push(format!(
                "{prefix}Out of memory: Killed process {} (chaos-kmsg) total-vm:1000kB, anon-rss:900kB, file-rss:0kB, shmem-rss:0kB, UID:0",
                100_000 + i
            )),
            3 => lines.extend([
                format!("{prefix}Task in {engine_cgroup}/buildkit/chaoskmsg{i} killed as a result of limit of {engine_cgroup}"),
                format!("{prefix}Memory cgroup out of memory: Kill process {engine_pid} (buildkitd) score 999 or sacrifice child"),
                format!("{prefix}Killed process {engine_pid} (buildkitd) total-vm:1kB, anon-rss:1kB, file-rss:0kB, shmem-rss:0kB"),
            ]),
            _ => lines.push(format!(
                "{prefix}3,{},{},-;Memory cgroup out of memory: Killed process {engine_pid} (buildkitd) total-vm:1kB, anon-rss:1kB, file-rss:0kB",
                i, i
            )),
        }
        i += 1;
    }
    lines.truncate(FORGED_LINES);
    lines
}

/// GARBAGE_LINES lines: random bytes, and OOM lines cut and spliced at random.
fn garbage_lines(engine_cgroup: &str, engine_pid: u32) -> Vec<String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b6d_7367);
    let samples = forged_engine_report(engine_cgroup, engine_pid, "");
    (0..GARBAGE_LINES)
        .map(|i| {
            if i % 2 == 0 {
                let len = rng.random_range(1..200);
                // No newline: one write would become several records.
                (0..len).map(|_| char::from(rng.random_range(1u8..=255))).filter(|c| *c != '\n').collect()
            } else {
                let sample = &samples[rng.random_range(0..samples.len())];
                let cut = rng.random_range(0..sample.len());
                let other = &samples[rng.random_range(0..samples.len())];
                let from = rng.random_range(0..other.len());
                format!("{}{}", &sample[..cut], &other[from..])
            }
        })
        .collect()
}

// === a real OOM kill of the test's own ===

/// A memory cgroup of the test's own with a small limit; removed on drop.
struct SmallMemcg {
    dir: PathBuf,
    victim: Option<Child>,
}

impl SmallMemcg {
    const LIMIT_BYTES: u64 = 32 << 20;

    fn create(name: &str) -> Self {
        let v1 = Path::new("/sys/fs/cgroup/memory");
        let dir = if v1.join("memory.limit_in_bytes").exists() { v1.join(name) } else { Path::new("/sys/fs/cgroup").join(name) };
        std::fs::create_dir(&dir).unwrap();
        let limit = if dir.join("memory.limit_in_bytes").exists() { dir.join("memory.limit_in_bytes") } else { dir.join("memory.max") };
        std::fs::write(&limit, Self::LIMIT_BYTES.to_string()).unwrap();
        Self { dir, victim: None }
    }

    /// Starts a process that joins the cgroup, then (same pid) asks for 256
    /// MiB and fills it: the memcg OOM killer's victim. Returns its pid.
    fn start_victim(&mut self) -> u32 {
        let script = format!("echo $$ > {}/cgroup.procs && exec /bin/busybox dd if=/dev/zero of=/dev/null bs=256M count=1", self.dir.display());
        let child = Command::new("/bin/busybox").args(["sh", "-c", &script]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let pid = child.id();
        self.victim = Some(child);
        pid
    }

    /// The victim's end; bounded.
    async fn victim_exit(&mut self) -> std::process::ExitStatus {
        let child = self.victim.as_mut().unwrap();
        let deadline = tokio::time::Instant::now() + support::WAIT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(tokio::time::Instant::now() < deadline, "the victim did not die within {:?}", support::WAIT);
            // Polling a child's exit: std::process::Child has no async wait.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for SmallMemcg {
    fn drop(&mut self) {
        if let Some(mut child) = self.victim.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            eprintln!("cleanup: cannot remove cgroup {}: {e}", self.dir.display());
        }
    }
}

fn vmstat_oom_kills() -> u64 {
    let text = std::fs::read_to_string("/proc/vmstat").unwrap();
    machine_agent::observe::oom::parse_vmstat_oom_kill(&text).expect("oom_kill in /proc/vmstat")
}

fn oom_kills_in(reports: &[pb::HealthReport]) -> Vec<pb::OomKill> {
    reports.iter().flat_map(|r| r.oom_kills.iter().cloned()).collect()
}

#[tokio::test]
async fn forged_and_garbage_kernel_log_lines_count_no_kill_and_never_blame_the_engine() {
    let w = World::new();
    let cp = support::control_plane::control_plane().start();
    w.use_control_plane(&cp);
    let agent = agent(&w.config).start();
    cp.wait_for("a registration", |r| !r.registrations.is_empty()).await;
    cp.push(support::control_plane::buildkit_task("chaos-kmsg", &w.root.join("mnt")));
    let base = wait_ready(&agent).await;
    let (_, before) = readyz(&base).await;
    let engine_pid = u32::try_from(before["engine_pid"].as_u64().expect("engine pid in /readyz")).unwrap();
    let engine_cgroup = format!("/{}", test_cgroup_name(&w.root));
    let kernel_kills_before = vmstat_oom_kills();

    // --- forged reports, read back: the kernel took every one, as the user's.
    let mut tail = KmsgTail::open();
    let forged = forged_lines(&engine_cgroup, engine_pid);
    let mut landed = vec![];
    for batch in forged.chunks(LINES_PER_OPEN) {
        write_to_kmsg(batch);
        landed.extend(tail.drain());
    }
    let forged_landed: Vec<&(u32, String)> = landed.iter().filter(|(_, m)| forged.iter().any(|f| f.ends_with(m.as_str()))).collect();
    assert!(forged_landed.len() >= FORGED_LINES * 9 / 10, "the forged lines reached the kernel log: {} of {FORGED_LINES}", forged_landed.len());
    assert!(
        forged_landed.iter().all(|(prio, _)| prio >> 3 != 0),
        "user space cannot claim the kernel's facility: {:?}",
        forged_landed.iter().find(|(prio, _)| prio >> 3 == 0)
    );

    // --- the garbage flood (it overruns the ring: the agent counts overruns and reads on).
    let started = tokio::time::Instant::now();
    write_to_kmsg(&garbage_lines(&engine_cgroup, engine_pid));
    eprintln!("wrote {FORGED_LINES} forged and {GARBAGE_LINES} garbage lines; garbage took {:?}", started.elapsed());

    // --- a real kill after it all: once it is reported, every line before it was read.
    let mut memcg = SmallMemcg::create(&format!("ma-chaos-kmsg-{}", support::engine::rand_suffix()));
    let victim = memcg.start_victim();
    let exit = memcg.victim_exit().await;
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&exit), Some(9), "the kernel killed the victim: {exit:?}");
    let rec = cp.wait_for("the real kill in the health stream", |r| oom_kills_in(&r.health).iter().any(|k| k.pid == victim)).await;
    let kernel_kills = vmstat_oom_kills() - kernel_kills_before;

    let kills = oom_kills_in(&rec.health);
    let real = kills.iter().find(|k| k.pid == victim).unwrap();
    assert_eq!(real.attribution, pb::OomAttribution::Other as i32, "the real kill is outside the engine: {real:?}");
    assert_eq!(real.process_name, "busybox", "{real:?}");
    let (code, after) = readyz(&base).await;
    let counted = after["oom_kills_total"].as_u64().unwrap();
    eprintln!("kills counted by the agent: {counted}; by the kernel (vmstat) in the same window: {kernel_kills}");
    let blamed: Vec<&pb::OomKill> = kills.iter().filter(|k| k.pid == engine_pid || k.process_name == "buildkitd" || k.process_name == "chaos-kmsg").collect();
    assert!(blamed.is_empty(), "forged lines became kills: {} in the health stream, first {:?}", blamed.len(), blamed.first());
    assert!(counted <= kernel_kills, "the agent counted {counted} kills, the kernel {kernel_kills}: {after}");
    assert_eq!(code, 200, "the agent stays Ready: {after}");
    assert_eq!(after["engine_pid"].as_u64(), Some(u64::from(engine_pid)), "buildkitd was not touched: {after}");
    assert_eq!(after["engine_restarts"].as_u64(), Some(0), "{after}");
    let last_health = rec.health.last().unwrap();
    assert!(last_health.oom_kills_total <= kernel_kills, "the health stream's total agrees: {last_health:?}");

    let scrape = support::http_get(&base, "/metrics").await.1;
    assert_eq!(metric_value(&scrape, "machine_agent_oom_kills_total{attribution=\"engine\"}"), Some(0.0), "{scrape}");
    assert_eq!(metric_value(&scrape, "machine_agent_oom_kills_total{attribution=\"build_step\"}"), Some(0.0), "{scrape}");
    let metric_total: f64 = machine_agent::observe::oom::Attribution::LABELS
        .iter()
        .map(|a| metric_value(&scrape, &format!("machine_agent_oom_kills_total{{attribution=\"{a}\"}}")).unwrap_or(0.0))
        .sum();
    assert!(metric_total <= kernel_kills as f64, "the metric counts {metric_total} kills, the kernel {kernel_kills}");
    assert!(!agent.logs().contains("OOM kill: buildkitd"), "the engine was blamed in the log");
    // What the operator sees instead: the user-space records counted, the forged ones said a few times.
    let user_records = metric_value(&scrape, "machine_agent_kmsg_user_records_total").unwrap_or(0.0);
    eprintln!("user-space records the agent read and ignored: {user_records}");
    assert!(user_records >= forged_landed.len() as f64, "every forged line read was counted as user space's: {user_records}");
    let said = agent.logs().lines().filter(|l| l.contains("OOM-looking line written into the kernel log from user space")).count();
    assert!((1..=10).contains(&said), "forged lines are said, a few at most, not {said} times");
    let overruns = metric_value(&scrape, "machine_agent_kmsg_overruns_total").unwrap_or(0.0);
    let overrun_lines = agent.logs().lines().filter(|l| l.contains("the kernel log overwrote records")).count();
    eprintln!("overruns: {overruns}, logged in {overrun_lines} lines");
    assert!(overrun_lines <= 10, "overruns are counted, not logged one by one: {overrun_lines} lines for {overruns}");
}
