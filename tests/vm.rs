//! The whole product path on a real VM: a Debian bookworm image built with
//! debootstrap from Debian's packages and provisioned by
//! `packer/scripts/provision.sh` (the script Packer runs), booted with
//! qemu-system-x86_64, systemd as PID 1, and a blank second virtio disk as the
//! cache volume. The control-plane double runs on the host; the guest reaches
//! it through user-mode networking (10.0.2.2 is the host's loopback), and the
//! host reaches the guest's /readyz and engine through forwarded loopback ports.
//!
//! control plane -> agent (under its unit) -> cache disk -> buildkitd (in its
//! own systemd scope) -> an mTLS build from buildctl on the host -> a build held
//! at a gate across `systemctl kill -s SIGKILL` of the agent and across the
//! upgrade (new binary, `machine-agent handoff`): systemd restarts the agent, it
//! adopts the same buildkitd, the build finishes whole -> the engine's scope
//! stopped by hand, the engine restarted in a new one -> should_terminate ->
//! clean drain -> the unit ends inactive with success, the scope gone -> the
//! guest powers off -> fsck on the host finds the cache disk clean. Commands
//! reach the guest through a root shell on its second serial port.
//!
//! Run alone: `cargo test --locked --test vm -- --nocapture` (root; qemu-system-x86,
//! debootstrap and zstd installed; BuildKit by scripts/install-buildkit.sh).
//! The debootstrap tree is cached under /var/cache/machine-agent-vm
//! (MA_VM_CACHE); MA_VM_ACCEL=kvm|tcg overrides the accelerator choice.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use machine_agent::proto::v1 as pb;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use support::control_plane::control_plane;
use support::engine::{build_context, GatedBuild};
use support::vm::{
    choose_accel, control_plane_pki, fields, require_tools, run, GuestImage, ImageInputs, Timeline, Vm, BOOTSTRAP_TOKEN, CACHE_DEVICE, CACHE_MOUNT,
    CONTROL_PLANE_HOST, GUEST_BUILDKIT_PORT,
};
use support::{write_private, TestPki};

/// The issue's bound on the whole test, debootstrap included.
const BUDGET: Duration = Duration::from_secs(15 * 60);

/// The guest's agent config: the shipped example's shape
/// (examples/config-control-plane.toml) with the static-token identity and the
/// test's control plane; every other setting is the shipped default.
fn agent_config(control_plane_port: u16) -> String {
    format!(
        r#"# machine-agent config of the VM boot test's guest (tests/vm.rs).
[control_plane]
url = "https://{CONTROL_PLANE_HOST}:{control_plane_port}"
ca_bundle = "/etc/machine-agent/control-plane-ca.pem"
# The guest boots under software emulation: keep reconnects prompt.
backoff_max_secs = 5

[identity]
mode = "static_token"
token_file = "/etc/machine-agent/bootstrap-token"

[endpoints]
listen = "0.0.0.0:9911"
# Beyond loopback only so that qemu's forwarded port reaches it: the test reads
# the task id from the detail view. A real builder keeps it on 127.0.0.1.
detail_listen = "0.0.0.0:9912"

[volume]
allowed_mount_prefixes = ["/var/lib/buildkit"]
"#
    )
}

/// The task the control plane hands the guest: the second virtio disk as the
/// cache volume, the engine listening on every guest address (qemu forwards a
/// host port to it), and mTLS material from `pki`.
fn vm_task(pki: &TestPki) -> pb::register_response::Task {
    pb::register_response::Task::Buildkit(pb::BuildkitTask {
        task_id: "vm-boot-1".into(),
        tls: Some(pb::TlsMaterial { cert_pem: pki.server_cert_pem.clone(), key_pem: pki.server_key_pem.clone(), ca_pem: pki.ca_pem.clone() }),
        mounts: vec![pb::VolumeMount {
            mount_path: CACHE_MOUNT.into(),
            source: Some(pb::volume_mount::Source::Device(pb::BlockDevice { path: CACHE_DEVICE.into(), ebs_volume_id: String::new() })),
            fs_type: pb::FilesystemType::Ext4 as i32,
            options: vec!["noatime".into()],
            skip_trim: false,
            cache_mode: 0,
        }],
        cache_size_bytes: 2 << 30,
        gc: None,
        max_parallelism: 2,
        debug: false,
        listen_address: format!("0.0.0.0:{GUEST_BUILDKIT_PORT}"),
        engine_env: Default::default(),
        ..Default::default()
    })
}

/// GET http://127.0.0.1:{port}{path} with a short timeout: (status, body), or None when not answering yet.
async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let resp = client.get(format!("http://127.0.0.1:{port}{path}")).send().await.ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.text().await.ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provisioned_vm_registers_builds_over_mtls_and_drains_clean_on_should_terminate() {
    require_tools();
    let mut t = Timeline::new(BUDGET);

    // The control plane first: its port goes into the image's config.
    let cp = control_plane().pki(Arc::new(control_plane_pki())).expect_static_token(BOOTSTRAP_TOKEN).start();
    let config = agent_config(cp.addr.port());
    let image = GuestImage::build(&mut t, &ImageInputs { agent_config: &config, control_plane_ca_pem: &cp.pki.ca_pem });

    // --- boot: systemd starts the agent under its unit; it registers.
    t.begin("boot-to-register");
    let (accel, why) = choose_accel();
    eprintln!("vm: accelerator {accel:?}: {why}");
    let mut vm = Vm::boot(&image, accel);
    let phase = "boot-to-register";
    let within = t.limit(Duration::from_secs(300));
    vm.wait_until(phase, "a registration at the control-plane double", within, |_| !cp.recorded().registrations.is_empty()).await;
    let reg = cp.recorded().registrations[0].clone();
    assert_eq!(reg.hostname, "ma-vm", "the guest's hostname (tests/vm/overlay/etc/hostname): {reg:?}");
    assert_eq!(reg.architecture, pb::Architecture::Amd64 as i32);
    assert!(
        matches!(&reg.identity, Some(pb::register_request::Identity::StaticToken(tok)) if tok.token == BOOTSTRAP_TOKEN),
        "the static token installed in the image: {:?}",
        reg.identity
    );
    // Type=notify: systemd reports the unit started only after the agent's READY=1.
    vm.wait_until(phase, "systemd's 'Started machine-agent.service'", t.limit(Duration::from_secs(60)), |vm| {
        !vm.console_lines("Started machine-agent.service").is_empty()
    })
    .await;
    t.end(&format!("{accel:?} ({why})"));

    // --- the task: cache disk formatted and mounted, buildkitd started, /readyz from the host says Ready.
    t.begin("task-to-ready");
    let phase = "task-to-ready";
    let task_pki = TestPki::new("vm engine ca");
    cp.push(vm_task(&task_pki));
    let deadline = tokio::time::Instant::now() + t.limit(Duration::from_secs(300));
    loop {
        vm.check(phase);
        if let Some((200, _)) = get(vm.endpoints_port, "/readyz").await {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            let last = get(vm.endpoints_port, "/readyz").await;
            vm.fail(phase, &format!("/readyz through the forwarded port 127.0.0.1:{} never answered 200; last answer {last:?}", vm.endpoints_port));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The public /readyz says Ready; its detail (the task id) is on the detail listener.
    let Some((200, detail)) = get(vm.detail_port, "/readyz").await else {
        vm.fail(phase, &format!("the detail /readyz through the forwarded port 127.0.0.1:{} did not answer 200", vm.detail_port));
    };
    let json: serde_json::Value = serde_json::from_str(&detail).unwrap();
    assert_eq!(json["state"], "ready", "{json}");
    assert_eq!(json["engine"], "running", "{json}");
    assert_eq!(json["task_id"], "vm-boot-1", "{json}");
    assert_eq!(json["control_plane_connected"], true, "{json}");
    vm.wait_until(phase, "a Ready health report", t.limit(Duration::from_secs(60)), |_| {
        cp.recorded().health.iter().any(|h| h.agent_state == pb::AgentState::Ready as i32)
    })
    .await;
    t.end(&format!("/readyz 200 via 127.0.0.1:{}", vm.endpoints_port));

    // --- a build from the host: buildctl -> forwarded port -> the guest's buildkitd, mTLS with a client cert of the task's CA.
    t.begin("build");
    let phase = "build";
    let client = tempfile::tempdir().unwrap();
    let ca = client.path().join("ca.pem");
    std::fs::write(&ca, &task_pki.ca_pem).unwrap();
    let (cert, key) = task_pki.client_cert("vm build client");
    let (cert_path, key_path) = (client.path().join("client.pem"), client.path().join("client-key.pem"));
    write_private(&cert_path, &cert);
    write_private(&key_path, &key);
    let addr = format!("tcp://127.0.0.1:{}", vm.buildkit_port);
    let tls = |with_cert: bool| {
        let mut args = vec!["--addr".to_string(), addr.clone(), "--tlsservername".into(), "localhost".into(), "--tlscacert".into(), ca.display().to_string()];
        if with_cert {
            args.extend(["--tlscert".into(), cert_path.display().to_string(), "--tlskey".into(), key_path.display().to_string()]);
        }
        args
    };
    let ctx = build_context(client.path(), "/bin/busybox cat /proc/sys/kernel/osrelease > /osrelease", 256 << 10);
    let out = client.path().join("out");
    let build = {
        let (args, ctx, out) = (tls(true), ctx.clone(), out.clone());
        let limit = t.limit(Duration::from_secs(300));
        // buildctl blocks; the guest is checked while it runs.
        let mut handle = tokio::task::spawn_blocking(move || support::engine::buildctl_build(&args, &ctx, &out));
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            tokio::select! {
                done = &mut handle => break done.unwrap(),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    vm.check(phase);
                    if tokio::time::Instant::now() > deadline {
                        vm.fail(phase, &format!("buildctl did not finish within {limit:?}"));
                    }
                }
            }
        }
    };
    if !build.status.success() {
        vm.fail(phase, &format!("the mTLS build through 127.0.0.1:{} failed: {}", vm.buildkit_port, String::from_utf8_lossy(&build.stderr)));
    }
    assert_eq!(std::fs::read(out.join("payload")).unwrap().len(), 256 << 10);
    // The RUN step ran on the guest's kernel, not the host's.
    let osrelease = std::fs::read_to_string(out.join("osrelease")).unwrap();
    assert_eq!(osrelease.trim(), image.kernel_release, "the build step's kernel");
    let refused = support::engine::buildctl_build(&tls(false), &ctx, &client.path().join("out-refused"));
    assert!(!refused.status.success(), "a client without a certificate must be refused");
    t.end(&format!("buildctl build via 127.0.0.1:{}, RUN step on guest kernel {osrelease}", vm.buildkit_port).replace('\n', ""));

    // --- a build survives the agent: SIGKILL under systemd, then the documented upgrade.
    t.begin("command-channel");
    vm.wait_command_channel("command-channel", t.limit(Duration::from_secs(60))).await;
    t.end("root shell on ttyS1 via a unix socket");
    let engine = engine_in_its_scope(&mut vm, "kill-adopt", None).await;
    for (phase, how) in [
        ("kill-adopt", "systemctl kill -s SIGKILL machine-agent.service"),
        // The README's upgrade: install the new binary (atomically, beside the
        // running one), then hand off; systemd restarts the unit on exit 75.
        ("upgrade-handoff", "cp /usr/local/bin/machine-agent /usr/local/bin/.machine-agent.new && mv /usr/local/bin/.machine-agent.new /usr/local/bin/machine-agent && /usr/local/bin/machine-agent handoff --config /etc/machine-agent/config.toml"),
    ] {
        t.begin(phase);
        let restarts_before = vm.unclean_stops_expected;
        let gate = GatedBuild::new(client.path());
        let (args, ctx, out) = (tls(true), gate.ctx.clone(), client.path().join(format!("out-{phase}")));
        let mut build = tokio::task::spawn_blocking(move || support::engine::buildctl_build(&args, &ctx, &out));
        let waiting = format!("for d in /proc/[0-9]*; do tr '\\0' ' ' <$d/cmdline 2>/dev/null | grep -q '^/bin/busybox sh -c until.*{}' && exit 0; done; exit 1", gate.tag);
        let deadline = tokio::time::Instant::now() + t.limit(Duration::from_secs(120));
        while vm.sh(phase, &waiting, Duration::from_secs(30)).await.0 != 0 {
            if tokio::time::Instant::now() > deadline {
                vm.fail(phase, "the gated build step never ran in the guest");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        vm.unclean_stops_expected += 1;
        let registered_before = cp.recorded().registrations.len();
        let started = tokio::time::Instant::now();
        vm.sh_ok(phase, how, Duration::from_secs(60)).await;
        vm.wait_until(phase, "systemd to restart machine-agent.service", t.limit(Duration::from_secs(120)), |vm| {
            vm.console_lines("MA-VM-STOP").len() > restarts_before
        })
        .await;
        // The new agent registers as the machine it was; the control plane
        // hands a known machine its task again, and the agent finds its engine serving it.
        vm.wait_until(phase, "the restarted agent's registration", t.limit(Duration::from_secs(120)), |_| {
            cp.recorded().registrations.len() > registered_before
        })
        .await;
        let again = cp.recorded().registrations[registered_before].clone();
        assert!(!again.previous_machine_id.is_empty(), "a reconnect with previous_machine_id, not a new machine: {again:?}");
        cp.push(vm_task(&task_pki));
        let deadline = tokio::time::Instant::now() + t.limit(Duration::from_secs(180));
        let adopted = loop {
            vm.check(phase);
            if let Some((200, body)) = get(vm.detail_port, "/readyz").await {
                let json: serde_json::Value = serde_json::from_str(&body).unwrap();
                if json["engine_adopted"] == true {
                    break json;
                }
            }
            if tokio::time::Instant::now() > deadline {
                vm.fail(phase, &format!("the restarted agent never reported an adopted engine; last /readyz {:?}", get(vm.detail_port, "/readyz").await));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let to_ready = started.elapsed();
        assert_eq!(adopted["engine_pid"].as_u64(), Some(u64::from(engine)), "the same buildkitd, adopted: {adopted}");
        let restarts = vm.sh_ok(phase, "systemctl show -p NRestarts --value machine-agent.service", Duration::from_secs(30)).await;
        assert_eq!(restarts.trim(), (restarts_before + 1).to_string(), "systemd restarted the agent");
        engine_in_its_scope(&mut vm, phase, Some(engine)).await;
        // Only now may the build go on.
        vm.sh_ok(phase, &waiting.replace("&& exit 0", "&& touch $d/root/gate && exit 0"), Duration::from_secs(30)).await;
        let deadline = tokio::time::Instant::now() + t.limit(Duration::from_secs(300));
        let built = loop {
            tokio::select! {
                done = &mut build => break done.unwrap(),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    vm.check(phase);
                    if tokio::time::Instant::now() > deadline {
                        vm.fail(phase, "the gated build did not finish after its gate opened");
                    }
                }
            }
        };
        if !built.status.success() {
            vm.fail(phase, &format!("the build in flight across {how:?} failed: {}", String::from_utf8_lossy(&built.stderr)));
        }
        gate.assert_complete(&client.path().join(format!("out-{phase}")));
        t.end(&format!("agent restarted by systemd, engine pid {engine} adopted {} ms after the kill/handoff; the gated build finished", to_ready.as_millis()));
    }

    // --- the engine's scope stopped from outside (an operator's `systemctl
    // stop`): the engine ends with it; the agent restarts it in a new scope.
    t.begin("scope-stopped");
    let phase = "scope-stopped";
    vm.sh_ok(phase, "systemctl stop machine-agent-engine.scope", Duration::from_secs(60)).await;
    let deadline = tokio::time::Instant::now() + t.limit(Duration::from_secs(180));
    loop {
        vm.check(phase);
        if let Some((200, body)) = get(vm.detail_port, "/readyz").await {
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            if json["engine_pid"].as_u64().is_some_and(|p| p != u64::from(engine)) && json["state"] == "ready" {
                break;
            }
        }
        if tokio::time::Instant::now() > deadline {
            vm.fail(phase, &format!("no new engine after the scope's stop; last /readyz {:?}", get(vm.detail_port, "/readyz").await));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let restarted = engine_in_its_scope(&mut vm, phase, None).await;
    t.end(&format!("engine {engine} ended with its scope; engine {restarted} ready in a new one"));

    // --- should_terminate: drain, the unit ends inactive with success, the guest powers off.
    t.begin("drain");
    let phase = "drain";
    cp.terminate();
    vm.wait_until(phase, "the guest's MA-VM-REPORT line (machine-agent.service stopped for good)", t.limit(Duration::from_secs(180)), |vm| {
        !vm.console_lines("MA-VM-REPORT").is_empty()
    })
    .await;
    let report_line = vm.console_lines("MA-VM-REPORT").remove(0);
    eprintln!("vm: guest: {}", report_line.trim());
    let report = fields(&report_line);
    let restarts = vm.unclean_stops_expected.to_string();
    let expect = [
        ("ActiveState", "inactive"),
        ("Result", "success"),
        ("ExecMainCode", "1"),
        ("ExecMainStatus", "0"),
        ("NRestarts", restarts.as_str()),
        ("cache_mounted", "no"),
        ("engine_scope", "inactive"),
    ];
    for (key, want) in expect {
        if report.get(key).map(String::as_str) != Some(want) {
            vm.fail(phase, &format!("machine-agent's end state: expected {key}={want}, got {report_line:?}"));
        }
    }
    let stops = vm.console_lines("MA-VM-STOP");
    assert_eq!(stops.len(), 1 + vm.unclean_stops_expected, "the unit stopped once per kill or handoff, and once for good: {stops:?}");
    assert!(stops.last().unwrap().contains("service_result=success"), "the last stop, the drain's, was clean: {stops:?}");
    for stop in &stops {
        eprintln!("vm: guest: {}", stop.trim());
    }
    let status = vm.wait_exit(phase, t.limit(Duration::from_secs(120))).await;
    assert!(status.success(), "qemu's exit after the guest's poweroff: {status}");
    let rec = cp.recorded();
    assert_eq!(rec.shutdowns.len(), 1, "one shutdown report: {:?}", rec.shutdowns);
    let shutdown = &rec.shutdowns[0];
    assert_eq!(shutdown.reason, "should_terminate", "{shutdown:?}");
    assert!(shutdown.unmounted && shutdown.errors.is_empty(), "{shutdown:?}");
    assert!(shutdown.engine_stopped_cleanly, "{shutdown:?}");
    assert_eq!(shutdown.task_id, "vm-boot-1");
    t.end(&format!(
        "drain {} ms in the agent; unit inactive/success after {} restarts; guest powered off",
        shutdown.drain_duration_ms, vm.unclean_stops_expected
    ));

    // --- the cache disk, from the host: a clean ext4 that holds the engine's state.
    t.begin("fsck");
    let fsck = Command::new("fsck.ext4").arg("-fn").arg(&image.cache_img).output().unwrap();
    assert!(
        fsck.status.success(),
        "fsck.ext4 -fn on the cache disk: {}\n{}{}",
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let listing = run("debugfs ls of the cache disk", Command::new("debugfs").args(["-R", "ls -p /"]).arg(&image.cache_img));
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.contains("/runc-overlayfs/"), "the engine's root was on the cache disk; its top level:\n{listing}");
    t.end("fsck.ext4 -fn: clean");
    eprintln!("vm: guest console: {}", vm.keep_console());
}

/// Checks that buildkitd runs in the engine's own systemd scope (active, and
/// the engine's cgroup under it) and, when given, is still `expected`; returns its pid.
async fn engine_in_its_scope(vm: &mut support::vm::Vm, phase: &str, expected: Option<u32>) -> u32 {
    let scope = "machine-agent-engine.scope";
    let active = vm.sh_ok(phase, &format!("systemctl is-active {scope}"), Duration::from_secs(30)).await;
    assert_eq!(active.trim(), "active", "the engine's scope");
    let pid = vm.sh_ok(phase, "cut -d' ' -f1 /var/lib/machine-agent/engine/buildkitd.pid", Duration::from_secs(30)).await;
    let pid: u32 = pid.trim().parse().unwrap_or_else(|_| panic!("the engine's pidfile: {pid:?}"));
    if let Some(expected) = expected {
        assert_eq!(pid, expected, "the same engine");
    }
    let cgroup = vm.sh_ok(phase, &format!("cat /proc/{pid}/cgroup"), Duration::from_secs(30)).await;
    assert_eq!(cgroup.trim(), format!("0::/system.slice/{scope}/daemon"), "buildkitd in its scope's daemon cgroup");
    let status = vm.sh_ok(phase, &format!("systemctl status --no-pager {scope} | head -20"), Duration::from_secs(30)).await;
    eprintln!("vm: {phase}: systemctl status {scope}:\n{status}");
    pid
}
