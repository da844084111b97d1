//! CDI devices with the real engine: a made-up vendor's spec (a device that
//! sets a variable and bind-mounts a host file) in a spec dir the config
//! names, a task that asks for the device, and real builds whose steps use it
//! with `RUN --device` or not. This machine has no GPU; the NVIDIA path is the
//! same with a spec nvidia-ctk writes.
//!
//! Needs root (the OCI worker, the engine's cgroup), runc and the buildkitd
//! of scripts/install-buildkit.sh.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use support::engine::{buildctl_build, rand_suffix, readyz, unix_addr, wait_ready, World};

const DEVICE: &str = "cdi.example/probe=marker";
const UNUSED_DEVICE: &str = "cdi.example/probe=unused";
const PAYLOAD: &str = "bind-mounted from the host by CDI\n";

/// A world whose config reads CDI specs from `<root>/cdi` (and generates no
/// NVIDIA spec), holding the test vendor's spec; the task asks for `devices`.
fn cdi_world(devices: &[&str]) -> (World, PathBuf) {
    let w = World::new();
    let spec_dir = w.root.join("cdi");
    std::fs::create_dir(&spec_dir).unwrap();
    let payload = w.root.join("cdi-payload.txt");
    std::fs::write(&payload, PAYLOAD).unwrap();
    let spec = format!(
        "cdiVersion: \"0.6.0\"\nkind: cdi.example/probe\ndevices:\n- name: marker\n  containerEdits:\n    env:\n    - CDI_PROBE=injected\n    mounts:\n    - hostPath: {}\n      containerPath: /cdi-probe.txt\n      options: [ro, bind]\n- name: unused\n  containerEdits:\n    env:\n    - CDI_PROBE=unused\n",
        payload.display()
    );
    std::fs::write(spec_dir.join("probe.yaml"), spec).unwrap();
    let config = std::fs::read_to_string(&w.config).unwrap();
    let marker = "allowed_task_env = [\"ENGINE_MARKER\"]\n";
    assert!(config.contains(marker));
    let cdi = format!("{marker}cdi_spec_dirs = [\"{}\"]\ncdi_nvidia_spec = \"\"\n", spec_dir.display());
    std::fs::write(&w.config, config.replace(marker, &cdi)).unwrap();
    set_task_devices(&w, devices);
    (w, spec_dir)
}

fn set_task_devices(w: &World, devices: &[&str]) {
    let task = std::fs::read_to_string(&w.task).unwrap();
    let task: String = task.lines().filter(|l| !l.starts_with("devices = ")).map(|l| format!("{l}\n")).collect();
    let line = format!("devices = {devices:?}\n");
    std::fs::write(&w.task, task.replacen("max_parallelism = 2\n", &format!("max_parallelism = 2\n{line}"), 1)).unwrap();
}

/// Two stages from one base, one step with the device and one without, run
/// side by side (neither sees what the other's step left); the result holds
/// what each saw.
fn device_context(dir: &Path, device: &str) -> PathBuf {
    let ctx = dir.join(format!("ctx-{}", rand_suffix()));
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::copy("/bin/busybox", ctx.join("busybox")).unwrap();
    let look = |tag: &str| {
        format!(
            "[\"/bin/busybox\", \"sh\", \"-c\", \"echo \\\"${{CDI_PROBE:-unset}}\\\" > /{tag}-env; if [ -e /cdi-probe.txt ]; then /bin/busybox cat /cdi-probe.txt; else echo absent; fi > /{tag}-file; echo {} > /{tag}-nonce\"]",
            rand_suffix()
        )
    };
    let dockerfile = format!(
        "FROM scratch AS base\nCOPY busybox /bin/busybox\n\
         FROM base AS with\nRUN --device={device} {}\n\
         FROM base AS without\nRUN {}\n\
         FROM scratch\nCOPY --from=with /with-env /with-file /\nCOPY --from=without /without-env /without-file /\n",
        look("with"),
        look("without"),
    );
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    ctx
}

#[tokio::test]
async fn a_task_device_reaches_only_the_steps_that_ask_for_it_and_the_worker_lists_it() {
    let (w, _) = cdi_world(&[DEVICE]);
    let agent = w.start();
    let base = wait_ready(&agent).await;

    // The worker lists the spec's devices; /readyz says so.
    let (code, json) = readyz(&base).await;
    assert_eq!(code, 200, "{json}");
    let devices: Vec<&str> = json["devices"].as_array().unwrap().iter().map(|d| d.as_str().unwrap()).collect();
    assert_eq!(devices, [DEVICE, UNUSED_DEVICE], "{json}");
    let config = std::fs::read_to_string(w.root.join("state/engine/buildkitd.toml")).unwrap();
    assert!(config.contains("[cdi]") && config.contains(&format!("autoAllowed = [\"{DEVICE}\"]")), "{config}");

    // A real build: the step with --device sees the variable and the file, the other neither.
    let out = w.root.join("out");
    let built = buildctl_build(&w.buildctl_tls_args(true), &device_context(&w.root, DEVICE), &out);
    assert!(built.status.success(), "build with a device failed:\n{}", String::from_utf8_lossy(&built.stderr));
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap();
    assert_eq!(read("with-env"), "injected\n");
    assert_eq!(read("with-file"), PAYLOAD);
    assert_eq!(read("without-env"), "unset\n");
    assert_eq!(read("without-file"), "absent\n");

    // A device the spec defines but the task did not ask for: BuildKit refuses the step.
    let refused = buildctl_build(&unix_addr(&w), &device_context(&w.root, UNUSED_DEVICE), &w.root.join("out2"));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "a device outside the task's list must be refused");
    assert!(stderr.contains(UNUSED_DEVICE) && stderr.contains("not allowed"), "{stderr}");
    drop(agent);
}

#[tokio::test]
async fn a_device_no_spec_defines_or_a_malformed_name_is_a_task_error_naming_the_field() {
    let (w, _) = cdi_world(&[DEVICE]);
    let cases = [
        (vec![DEVICE, "cdi.example/probe=missing"], "buildkit.devices[1]", "not defined by any CDI spec"),
        (vec!["nvidia.com/gpu=all"], "buildkit.devices[0]", "not defined by any CDI spec"),
        (vec!["gpu"], "buildkit.devices[0]", "vendor/class=name"),
    ];
    for (devices, field, problem) in cases {
        set_task_devices(&w, &devices);
        for args in [
            vec!["check", "--config", w.config.to_str().unwrap(), "--task", w.task.to_str().unwrap()],
            vec!["run", "--config", w.config.to_str().unwrap(), "--standalone", w.task.to_str().unwrap()],
        ] {
            let out = Command::new(env!("CARGO_BIN_EXE_machine-agent")).args(&args).output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{devices:?} with {}: exit 2; stderr:\n{stderr}", args[0]);
            assert!(stderr.contains(field) && stderr.contains(problem), "{devices:?} with {}: names {field}:\n{stderr}", args[0]);
            assert!(!w.root.join("state/engine").exists(), "{devices:?}: nothing written for the engine");
            assert!(!w.cache().exists(), "{devices:?}: no volume prepared");
        }
    }
}

#[tokio::test]
async fn from_the_control_plane_an_undefined_device_is_rejected_and_the_health_stream_lists_the_workers_devices() {
    use machine_agent::proto::v1 as pb;
    use support::control_plane::{buildkit_task, control_plane};
    let (w, _) = cdi_world(&[]);
    let cp = control_plane().start();
    w.use_control_plane(&cp);
    let agent = support::agent(&w.config).start();
    cp.wait_for("a registration", |r| !r.registrations.is_empty()).await;

    let with_devices = |id: &str, devices: &[&str]| {
        let mut task = buildkit_task(id, &w.root.join("mnt"));
        if let pb::register_response::Task::Buildkit(t) = &mut task {
            t.devices = devices.iter().map(|d| d.to_string()).collect();
        }
        task
    };
    cp.push(with_devices("task-missing-device", &[DEVICE, "cdi.example/probe=missing"]));
    let line = agent.wait_for_log("task rejected").await;
    assert!(line.contains("buildkit.devices[1]") && line.contains("not defined by any CDI spec"), "{line}");
    cp.wait_for("the rejection in a health report", |r| r.health.iter().any(|h| h.last_task_rejection.contains("buildkit.devices[1]"))).await;
    assert!(agent.children().is_empty(), "no engine for a rejected task");

    cp.push(with_devices("task-with-device", &[DEVICE]));
    let recorded = cp
        .wait_for_within(std::time::Duration::from_secs(90), "the worker's devices in a health report", |r| {
            r.health.iter().any(|h| h.agent_state == pb::AgentState::Ready as i32 && !h.devices.is_empty())
        })
        .await;
    let report = recorded.health.iter().rev().find(|h| !h.devices.is_empty()).unwrap();
    assert_eq!(report.devices, [DEVICE, UNUSED_DEVICE]);
    drop(agent);
}
