//! What observing the machine costs the agent, printed as tables:
//!
//! 1. the OOM watcher's pure core per /dev/kmsg record: ordinary kernel lines
//!    (the bulk of what a reader sees) and whole kernel OOM reports, each
//!    parsed and fed to the assembler;
//! 2. `Metrics::render` in process, and /metrics latency over loopback at a
//!    fixed request rate (default 100/s for BENCH_SECS, default 10) against
//!    the release agent, Ready with the real buildkitd and registered with the
//!    control-plane double. The client is open loop: a request is sent every
//!    1/rate whatever the earlier ones are doing, and each latency is measured
//!    from its scheduled send time, so a stall shows up in every request it
//!    delays (no coordinated omission). /healthz at the same rate is the
//!    baseline: the same listener and HTTP path without the render;
//! 3. the agent's RSS (VmRSS, VmHWM) after startup and after the load;
//! 4. the agent's CPU over an idle BENCH_SECS window and during each load,
//!    and its CPU per request above idle.
//!
//! `cargo bench --bench observe` as root with the real BuildKit installed
//! (scripts/install-buildkit.sh). BENCH_RATE sets the request rate.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench fails loudly

#[path = "../tests/support/mod.rs"]
mod support;

use machine_agent::observe::metrics::Metrics;
use machine_agent::observe::oom::{parse_kmsg_record, OomAssembler};
use std::hint::black_box;
use std::time::Duration;
use support::control_plane::{buildkit_task, control_plane};
use support::engine::{wait_ready, World};
use support::{agent, http_get, metric_value};
use tokio::time::Instant;

// === 1. the OOM parser ===

/// Kernel lines of a busy builder VM that are not about OOM: mounts, loop
/// devices, overlayfs, veth and bridge churn from build steps, audit, EXT4.
const ORDINARY: &[&str] = &[
    "EXT4-fs (loop3): mounted filesystem 4f1c6f1e-6a57-4f0f-9b0a-0d8d2f1c3e21 with ordered data mode. Quota mode: none.",
    "loop3: detected capacity change from 0 to 20971520",
    "overlayfs: idmapped layers are currently not supported",
    "IPv6: ADDRCONF(NETDEV_CHANGE): veth4a3c2e1: link becomes ready",
    "br-buildkit: port 2(veth4a3c2e1) entered blocking state",
    "br-buildkit: port 2(veth4a3c2e1) entered forwarding state",
    "device veth4a3c2e1 left promiscuous mode",
    "audit: type=1400 audit(1718035200.123:42): apparmor=\"STATUS\" operation=\"profile_load\" profile=\"unconfined\" name=\"buildkit-default\" pid=4242 comm=\"apparmor_parser\"",
    "EXT4-fs (loop3): unmounting filesystem 4f1c6f1e-6a57-4f0f-9b0a-0d8d2f1c3e21.",
    "nvme nvme1: pci function 0000:00:1f.0",
    "xfs filesystem being mounted at /var/lib/machine-agent/cache supports timestamps until 2038-01-19 (0x7fffffff)",
    "TCP: request_sock_TCP: Possible SYN flooding on port 1234. Sending cookies.  Check SNMP counters.",
    "cgroup: fork rejected by pids controller in /machine-agent-engine/buildkit/abc123",
    "systemd-journald[312]: Received client request to flush runtime journal.",
    "random: crng init done",
    "hrtimer: interrupt took 2411 ns",
    "Memory cgroup stats for /machine-agent-engine: cache:0KB rss:1KB",
    "oom_reaper: reaped process 4242 (python3), now anon-rss:0kB, file-rss:0kB, shmem-rss:0kB",
];

/// A whole kernel 6.1 report of a build step killed at the engine's v1 memcg
/// limit (what this agent's engine cgroup produces on Debian 12), as /dev/kmsg
/// delivers it: one record per line.
const MEMCG_REPORT: &[&str] = &[
    "python3 invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0",
    "CPU: 1 PID: 4242 Comm: python3 Not tainted 6.1.0-18-amd64 #1 Debian 6.1.76-1",
    "Hardware name: Amazon EC2 m5.large/, BIOS 1.0 10/16/2017",
    "Call Trace:",
    " <TASK>",
    " dump_stack_lvl+0x44/0x5c",
    " dump_header+0x4a/0x211",
    " oom_kill_process.cold+0xb/0x10",
    " out_of_memory+0x1ed/0x2e0",
    " mem_cgroup_out_of_memory+0x13b/0x150",
    " try_charge_memcg+0x6d4/0x780",
    " charge_memcg+0x45/0xb0",
    " __mem_cgroup_charge+0x28/0x80",
    " __handle_mm_fault+0x9a4/0xfd0",
    " handle_mm_fault+0xdb/0x2d0",
    " do_user_addr_fault+0x191/0x570",
    " exc_page_fault+0x70/0x170",
    " asm_exc_page_fault+0x22/0x30",
    "RIP: 0033:0x7f3c2d8a1b2a",
    "Code: Unable to access opcode bytes at 0x7f3c2d8a1b00.",
    "RSP: 002b:00007ffd1c2e5a78 EFLAGS: 00010206",
    "RAX: 00007f3b9c000010 RBX: 0000000040000000 RCX: 00007f3bdc000000",
    "RDX: 00007f3c2c000000 RSI: 0000000040001000 RDI: 00007f3b9c000010",
    "RBP: 00007ffd1c2e5b00 R08: 00000000ffffffff R09: 0000000000000000",
    "R10: 0000000000000022 R11: 0000000000000246 R12: 0000000040000000",
    "R13: 0000000000000000 R14: 00007f3c2d9f2c40 R15: 0000000000001000",
    " </TASK>",
    "memory: usage 3145728kB, limit 3145728kB, failcnt 118",
    "memory+swap: usage 3145728kB, limit 9007199254740988kB, failcnt 0",
    "kmem: usage 24576kB, limit 9007199254740988kB, failcnt 0",
    "Memory cgroup stats for /machine-agent-engine:",
    "cache 12288",
    "rss 3195027456",
    "rss_huge 2097152000",
    "shmem 0",
    "mapped_file 4096",
    "dirty 0",
    "writeback 0",
    "pgpgin 812345",
    "pgpgout 42042",
    "pgfault 901234",
    "pgmajfault 12",
    "inactive_anon 3195027456",
    "active_anon 0",
    "inactive_file 8192",
    "active_file 4096",
    "unevictable 0",
    "hierarchical_memory_limit 3221225472",
    "hierarchical_memsw_limit 9223372036854771712",
    "total_rss 3195027456",
    "total_cache 12288",
    "Tasks state (memory values in pages):",
    "[  pid  ]   uid  tgid total_vm      rss pgtables_bytes swapents oom_score_adj name",
    "[    900]     0   900   500000    20000   400000        0             0 buildkitd",
    "[   4201]     0  4201   180000     1900   102400        0             0 buildkit-runc",
    "[   4230]     0  4230      420      100    45056        0             0 sh",
    "[   4242]     0  4242   800000   779000  6500000        0             0 python3",
    "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/machine-agent-engine,task_memcg=/machine-agent-engine/buildkit/abc123,task=python3,pid=4242,uid=0",
    "Memory cgroup out of memory: Killed process 4242 (python3) total-vm:3200000kB, anon-rss:3116000kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:6348kB oom_score_adj:0",
    "oom_reaper: reaped process 4242 (python3), now anon-rss:0kB, file-rss:0kB, shmem-rss:0kB",
];

/// A whole kernel 6.1 system OOM (no memcg limit hit): the Mem-Info block
/// and per-zone lines replace the memcg stats.
const GLOBAL_REPORT: &[&str] = &[
    "stress invoked oom-killer: gfp_mask=0x140cca(GFP_HIGHUSER_MOVABLE|__GFP_COMP), order=0, oom_score_adj=0",
    "CPU: 0 PID: 1234 Comm: stress Not tainted 6.1.0-18-amd64 #1 Debian 6.1.76-1",
    "Hardware name: Amazon EC2 m5.large/, BIOS 1.0 10/16/2017",
    "Call Trace:",
    " <TASK>",
    " dump_stack_lvl+0x44/0x5c",
    " dump_header+0x4a/0x211",
    " oom_kill_process.cold+0xb/0x10",
    " out_of_memory+0x1ed/0x2e0",
    " __alloc_pages_slowpath.constprop.0+0xcb2/0xe00",
    " __alloc_pages+0x305/0x330",
    " __folio_alloc+0x16/0x40",
    " vma_alloc_folio+0x29b/0x3d0",
    " __handle_mm_fault+0xa5e/0xfd0",
    " handle_mm_fault+0xdb/0x2d0",
    " do_user_addr_fault+0x191/0x570",
    " exc_page_fault+0x70/0x170",
    " asm_exc_page_fault+0x22/0x30",
    " </TASK>",
    "Mem-Info:",
    "active_anon:1940 inactive_anon:960123 isolated_anon:0",
    " active_file:36 inactive_file:0 isolated_file:0",
    " unevictable:0 dirty:0 writeback:0",
    " slab_reclaimable:4321 slab_unreclaimable:9876",
    " mapped:120 shmem:310 pagetables:2500",
    " sec_pagetables:0 bounce:0",
    " kernel_misc_reclaimable:0",
    " free:12345 free_pcp:60 free_cma:0",
    "Node 0 active_anon:7760kB inactive_anon:3840492kB active_file:144kB inactive_file:0kB unevictable:0kB isolated(anon):0kB isolated(file):0kB mapped:480kB dirty:0kB writeback:0kB shmem:1240kB shmem_thp: 0kB shmem_pmdmapped: 0kB anon_thp: 3000320kB writeback_tmp:0kB kernel_stack:2816kB pagetables:10000kB sec_pagetables:0kB all_unreclaimable? yes",
    "Node 0 DMA free:14336kB boost:0kB min:128kB low:160kB high:192kB reserved_highatomic:0KB active_anon:0kB inactive_anon:1536kB active_file:0kB inactive_file:0kB unevictable:0kB writepending:0kB present:15992kB managed:15360kB mlocked:0kB bounce:0kB free_pcp:0kB local_pcp:0kB free_cma:0kB",
    "lowmem_reserve[]: 0 2934 3859 3859 3859",
    "Node 0 DMA32 free:22100kB boost:0kB min:24920kB low:31148kB high:37376kB reserved_highatomic:0KB active_anon:4000kB inactive_anon:2980000kB active_file:60kB inactive_file:0kB unevictable:0kB writepending:0kB present:3129200kB managed:3063660kB mlocked:0kB bounce:0kB free_pcp:120kB local_pcp:0kB free_cma:0kB",
    "lowmem_reserve[]: 0 0 925 925 925",
    "Node 0 DMA: 0*4kB 0*8kB 0*16kB 0*32kB 0*64kB 0*128kB 0*256kB 0*512kB 0*1024kB 1*2048kB (M) 3*4096kB (M) = 14336kB",
    "Node 0 DMA32: 275*4kB (UME) 210*8kB (UME) 144*16kB (UME) 92*32kB (UME) 51*64kB (UME) 28*128kB (UM) 9*256kB (UM) 2*512kB (M) 1*1024kB (M) 0*2048kB 0*4096kB = 22100kB",
    "Node 0 hugepages_total=0 hugepages_free=0 hugepages_surp=0 hugepages_size=1048576kB",
    "Node 0 hugepages_total=0 hugepages_free=0 hugepages_surp=0 hugepages_size=2048kB",
    "346 total pagecache pages",
    "0 pages in swap cache",
    "Free swap  = 0kB",
    "Total swap = 0kB",
    "1048446 pages RAM",
    "0 pages HighMem/MovableOnly",
    "36704 pages reserved",
    "Tasks state (memory values in pages):",
    "[  pid  ]   uid  tgid total_vm      rss pgtables_bytes swapents oom_score_adj name",
    "[    312]     0   312    12000     1000   110592        0          -250 systemd-journal",
    "[    650]     0   650     3000      400    61440        0         -1000 sshd",
    "[    700]     0   700   300000     3000   200704        0          -900 machine-agent",
    "[    900]     0   900   500000    20000   400000        0             0 buildkitd",
    "[   1234]  1000  1234  1000000   975000  7884800        0             0 stress",
    "oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),cpuset=/,mems_allowed=0,global_oom,task_memcg=/user.slice/user-1000.slice/session-3.scope,task=stress,pid=1234,uid=1000",
    "Out of memory: Killed process 1234 (stress) total-vm:4000000kB, anon-rss:3900000kB, file-rss:0kB, shmem-rss:0kB, UID:1000 pgtables:7700kB oom_score_adj:0",
    "oom_reaper: reaped process 1234 (stress), now anon-rss:0kB, file-rss:0kB, shmem-rss:0kB",
];

/// The shortest report the kernel prints (4.19 memcg, no dump): the unit tests' shape.
const MINIMAL_REPORT: &[&str] = &[
    "buildkitd invoked oom-killer: gfp_mask=0x6000c0(GFP_KERNEL), nodemask=(null), order=0, oom_score_adj=0",
    "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/machine-agent-engine,task_memcg=/machine-agent-engine/daemon,task=buildkitd,pid=900,uid=0",
    "Memory cgroup out of memory: Kill process 900 (buildkitd) score 1500 or sacrifice child",
    "Killed process 900 (buildkitd) total-vm:2000000kB, anon-rss:900000kB, file-rss:100kB, shmem-rss:0kB",
];

/// `copies` of `lines` as /dev/kmsg records (`<prio>,<seq>,<usec>,-;msg`),
/// with strictly increasing sequence numbers and 10 us between records.
fn kmsg_records(lines: &[&str], copies: usize) -> Vec<String> {
    let mut seq = 1_000_u64;
    let mut out = Vec::with_capacity(lines.len() * copies);
    for _ in 0..copies {
        for line in lines {
            seq += 1;
            out.push(format!("6,{seq},{},-;{line}\n", 5_000_000 + seq * 10));
        }
    }
    out
}

/// Feeds every record through parse + assemble, as the watcher does; returns
/// the events and the time it took.
fn feed(records: &[String]) -> (usize, Duration) {
    let mut asm = OomAssembler::new("/machine-agent-engine");
    let started = Instant::now();
    let mut events = 0;
    for record in records {
        if let Some(rec) = parse_kmsg_record(black_box(record)) {
            if let Some(event) = asm.feed_record(&rec) {
                events += 1;
                black_box(event);
            }
        }
    }
    (events, started.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn bench_kmsg() {
    const RUNS: usize = 7;
    println!("1. OOM watcher core: parse_kmsg_record + OomAssembler::feed_record (median of {RUNS} runs)");
    println!("{:<44} {:>7} {:>9} {:>12} {:>12}", "input", "lines", "events", "ns / line", "us / report");
    let ordinary = kmsg_records(ORDINARY, 200_000 / ORDINARY.len());
    let times: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let (events, took) = feed(&ordinary);
            assert_eq!(events, 0, "an ordinary kernel line was taken for an OOM kill");
            took
        })
        .collect();
    let per_line = median(times).as_nanos() as f64 / ordinary.len() as f64;
    println!("{:<44} {:>7} {:>9} {:>12.0} {:>12}", format!("ordinary kernel lines ({} kinds)", ORDINARY.len()), ordinary.len(), 0, per_line, "-");

    for (name, report) in [
        ("6.1 v1 memcg kill of a build step", MEMCG_REPORT),
        ("6.1 system OOM (Mem-Info, zones)", GLOBAL_REPORT),
        ("4.19 memcg, no dump (4 lines)", MINIMAL_REPORT),
    ] {
        let copies = 200_000 / report.len();
        let records = kmsg_records(report, copies);
        let times: Vec<Duration> = (0..RUNS)
            .map(|_| {
                let (events, took) = feed(&records);
                assert_eq!(events, copies, "{name}: one kill per report");
                took
            })
            .collect();
        let took = median(times);
        println!(
            "{:<44} {:>7} {:>9} {:>12.0} {:>12.2}",
            format!("{name}, {} lines", report.len()),
            records.len(),
            copies,
            took.as_nanos() as f64 / records.len() as f64,
            took.as_nanos() as f64 / copies as f64 / 1000.0
        );
    }
}

// === 2-4. the running agent ===

/// Nanoseconds on CPU summed over the process's live threads (schedstat):
/// far finer than clock ticks, but a thread that exits takes its time with it.
fn cpu_ns_threads(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// CPU used by `pid` between two readings, as (ticks-based ms, schedstat ms).
struct CpuWindow {
    pid: u32,
    ticks: u64,
    ns: u64,
    at: Instant,
}

impl CpuWindow {
    fn start(pid: u32) -> Self {
        Self { pid, ticks: support::cpu_ticks(pid), ns: cpu_ns_threads(pid), at: Instant::now() }
    }

    /// (wall seconds, CPU ms from utime+stime, CPU ms from schedstat).
    fn end(&self) -> (f64, f64, f64) {
        let wall = self.at.elapsed().as_secs_f64();
        let ticks_ms = support::cpu_ticks(self.pid).saturating_sub(self.ticks) as f64 * 10.0;
        let sched_ms = cpu_ns_threads(self.pid).saturating_sub(self.ns) as f64 / 1e6;
        (wall, ticks_ms, sched_ms)
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn bench_render() {
    const N: u32 = 20_000;
    let m = Metrics::new();
    m.gc_runs.with_label_values(&["startup", "ok"]).inc();
    m.control_plane_errors.with_label_values(&["ReportHealth"]).inc();
    let bytes = m.render().len();
    let started = Instant::now();
    for _ in 0..N {
        black_box(m.render());
    }
    let per = started.elapsed() / N;
    println!("2a. Metrics::render in process: {:.1} us per scrape ({bytes} bytes), {N} renders", per.as_nanos() as f64 / 1000.0);
}

/// What the open-loop client saw.
struct Load {
    latencies: Vec<Duration>,
    errors: Vec<String>,
    bytes: usize,
    max_send_lag: Duration,
}

/// Sends `rate` GETs a second for `secs` to `url`, each at its scheduled time
/// whatever the others are doing; latency runs from the scheduled time to the
/// last body byte. A request gets 2 s.
async fn open_loop(url: &str, rate: u32, secs: u64) -> Load {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
    let period = Duration::from_secs(1) / rate;
    let n = u32::try_from(secs).unwrap() * rate;
    let start = Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::with_capacity(n as usize);
    let mut max_send_lag = Duration::ZERO;
    for i in 0..n {
        let at = start + period * i;
        tokio::time::sleep_until(at).await;
        max_send_lag = max_send_lag.max(at.elapsed());
        let (client, url) = (client.clone(), url.to_string());
        tasks.push(tokio::spawn(async move {
            let result = async {
                let resp = client.get(&url).send().await.map_err(|e| e.to_string())?;
                let status = resp.status();
                let body = resp.bytes().await.map_err(|e| e.to_string())?;
                if status.is_success() {
                    Ok(body.len())
                } else {
                    Err(format!("HTTP {status}"))
                }
            }
            .await;
            (at.elapsed(), result)
        }));
    }
    let mut load = Load { latencies: vec![], errors: vec![], bytes: 0, max_send_lag };
    for task in tasks {
        let (latency, result) = task.await.unwrap();
        match result {
            Ok(bytes) => {
                load.latencies.push(latency);
                load.bytes = bytes;
            }
            Err(e) => load.errors.push(e),
        }
    }
    load.latencies.sort();
    load
}

async fn bench_agent(secs: u64, rate: u32) {
    let w = World::new();
    let cp = control_plane().start();
    w.use_control_plane(&cp);
    let agent = agent(&w.config).env("MACHINE_AGENT_LOG", "warn,machine_agent=info").start();
    cp.wait_for("a registration", |r| !r.registrations.is_empty()).await;
    cp.push(buildkit_task("observe-bench", &w.root.join("mnt")));
    let base = wait_ready(&agent).await;
    agent.wait_for_log("gc run trigger=startup").await;
    // Settle: the startup burst (mkfs, engine start, first GC) is over.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, scrape) = http_get(&base, "/metrics").await;
    assert_eq!(metric_value(&scrape, "machine_agent_state{state=\"ready\"}"), Some(1.0), "{scrape}");
    let pid = agent.pid;
    let rss_start = (support::proc_status_kib(pid, "VmRSS:"), support::proc_status_kib(pid, "VmHWM:"));
    let threads = support::proc_status_kib(pid, "Threads:");

    let health_before = cp.recorded().health.len();
    let idle = CpuWindow::start(pid);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (idle_wall, idle_ticks_ms, idle_sched_ms) = idle.end();
    let health_idle = cp.recorded().health.len() - health_before;

    // /metrics, then /healthz as the baseline: the same HTTP path without the render.
    let idle_ms_per_s = idle_sched_ms / idle_wall;
    let mut runs = vec![];
    for path in ["/metrics", "/healthz"] {
        let window = CpuWindow::start(pid);
        let load = open_loop(&format!("{base}{path}"), rate, secs).await;
        let (wall, ticks_ms, sched_ms) = window.end();
        runs.push((path, load, wall, ticks_ms, sched_ms));
    }
    let rss_end = (support::proc_status_kib(pid, "VmRSS:"), support::proc_status_kib(pid, "VmHWM:"));
    let (code, _) = http_get(&base, "/healthz").await;
    assert_eq!(code, 200, "the agent's loops after the load");

    println!(
        "2b. GET over loopback, open loop at {rate}/s for {secs} s each (release agent, Ready, real buildkitd, control-plane double); latency from the scheduled send"
    );
    println!(
        "{:<9} {:>7} {:>6} {:>6} {:>8} {:>8} {:>8} {:>9} {:>8} {:>9} {:>13}",
        "path", "bytes", "sent", "errors", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "send lag", "agent CPU/req"
    );
    for (path, load, wall, _, sched_ms) in &runs {
        let l = &load.latencies;
        let sent = l.len() + load.errors.len();
        let cpu_per_req_us = (sched_ms - idle_ms_per_s * wall).max(0.0) * 1000.0 / sent.max(1) as f64;
        if l.is_empty() {
            println!("{path:<9} {:>7} {sent:>6} {:>6}  (no request succeeded)", "-", load.errors.len());
            continue;
        }
        println!(
            "{path:<9} {:>7} {sent:>6} {:>6} {:>8.3} {:>8.3} {:>8.3} {:>9.3} {:>8.3} {:>6.1} ms {:>10.1} us",
            load.bytes,
            load.errors.len(),
            ms(percentile(l, 0.5)),
            ms(percentile(l, 0.9)),
            ms(percentile(l, 0.99)),
            ms(percentile(l, 0.999)),
            ms(l[l.len() - 1]),
            ms(load.max_send_lag),
            cpu_per_req_us,
        );
        for e in load.errors.iter().take(5) {
            println!("   error: {e}");
        }
    }
    println!("3. agent RSS ({threads} threads)");
    println!("   after startup (Ready, first GC done): VmRSS {:.1} MiB, VmHWM {:.1} MiB", rss_start.0 as f64 / 1024.0, rss_start.1 as f64 / 1024.0);
    println!("   after the loads:                      VmRSS {:.1} MiB, VmHWM {:.1} MiB", rss_end.0 as f64 / 1024.0, rss_end.1 as f64 / 1024.0);
    println!("4. agent CPU (utime+stime in 10 ms ticks; schedstat of live threads in ns)");
    println!(
        "   idle {idle_wall:.1} s ({health_idle} health reports sent): {:.2} ms/s by ticks, {:.3} ms/s by schedstat ({:.3} % of one core)",
        idle_ticks_ms / idle_wall,
        idle_ms_per_s,
        idle_ms_per_s / 10.0
    );
    for (path, _, wall, ticks_ms, sched_ms) in &runs {
        println!("   under {rate}/s {path:<9} {wall:.1} s: {:.2} ms/s by ticks, {:.3} ms/s by schedstat", ticks_ms / wall, sched_ms / wall);
    }
    for (path, load, ..) in &runs {
        assert!(load.errors.is_empty(), "{path} failed under {rate}/s: {:?}", &load.errors[..load.errors.len().min(5)]);
    }
}

fn main() {
    let secs: u64 = std::env::var("BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let rate: u32 = std::env::var("BENCH_RATE").ok().and_then(|s| s.parse().ok()).unwrap_or(100);
    bench_kmsg();
    bench_render();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(bench_agent(secs, rate));
}
