//! The CDI device check a task pays when it is taken: reading every spec in
//! the spec dirs and finding the task's devices. The spec is shaped like
//! `nvidia-ctk cdi generate` output for an 8-GPU machine (a device per GPU
//! by index and by UUID, `all`, and ~120 driver-library mounts in the
//! spec-wide edits, ~40 KiB); a second dir holds a small vendor spec.
//! Prints the median of BENCH_RUNS runs (default 200) of `check_devices`
//! and of parsing the YAML alone.
//!
//! `cargo bench --bench cdi`

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench fails loudly
#![allow(clippy::disallowed_types)] // wall-clock timing is the point of a bench; no paused clock here

use machine_agent::engine::cdi::{check_devices, parse_yaml_spec};
use std::hint::black_box;
use std::time::{Duration, Instant};

fn nvidia_like_spec(gpus: usize) -> String {
    let mut s = String::from("---\ncdiVersion: 0.5.0\ncontainerEdits:\n  deviceNodes:\n  - path: /dev/nvidiactl\n  - path: /dev/nvidia-uvm\n  hooks:\n  - args:\n    - nvidia-cdi-hook\n    - update-ldcache\n    hookName: createContainer\n    path: /usr/bin/nvidia-cdi-hook\n  mounts:\n");
    for i in 0..120 {
        s.push_str(&format!(
            "  - containerPath: /usr/lib/x86_64-linux-gnu/libnvidia-lib{i}.so.550.54.15\n    hostPath: /usr/lib/x86_64-linux-gnu/libnvidia-lib{i}.so.550.54.15\n    options:\n    - ro\n    - nosuid\n    - nodev\n    - bind\n"
        ));
    }
    s.push_str("devices:\n");
    let mut names: Vec<String> = (0..gpus).map(|i| i.to_string()).collect();
    names.extend((0..gpus).map(|i| format!("GPU-4cf8db2d-06c0-7d70-1a51-e59b25b2c1{i:02}")));
    names.push("all".into());
    for name in names {
        s.push_str(&format!("- containerEdits:\n    deviceNodes:\n    - path: /dev/nvidia0\n  name: \"{name}\"\n"));
    }
    s.push_str("kind: nvidia.com/gpu\n");
    s
}

fn median(mut d: Vec<Duration>) -> Duration {
    d.sort();
    d[d.len() / 2]
}

fn main() {
    let runs: usize = std::env::var("BENCH_RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(200);
    let dir = tempfile::tempdir().unwrap();
    let (etc, run) = (dir.path().join("etc-cdi"), dir.path().join("run-cdi"));
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(&run).unwrap();
    let spec = nvidia_like_spec(8);
    std::fs::write(run.join("nvidia.yaml"), &spec).unwrap();
    std::fs::write(
        etc.join("vendor.json"),
        r#"{"cdiVersion":"0.6.0","kind":"vendor.example/fpga","devices":[{"name":"f0","containerEdits":{"env":["X=1"]}}]}"#,
    )
    .unwrap();
    let dirs = vec![etc, run];
    let devices = vec!["nvidia.com/gpu=all".to_string(), "nvidia.com/gpu=7".to_string()];
    check_devices(&devices, &dirs).unwrap();

    let check: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            black_box(check_devices(black_box(&devices), black_box(&dirs))).unwrap();
            t.elapsed()
        })
        .collect();
    let parse: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            black_box(parse_yaml_spec(black_box(&spec))).unwrap();
            t.elapsed()
        })
        .collect();
    println!("spec: {} KiB, {} lines, {} devices", spec.len() / 1024, spec.lines().count(), parse_yaml_spec(&spec).unwrap().len());
    println!("check_devices (2 dirs, 2 specs, 2 devices asked): median {:?} of {runs}", median(check));
    println!("parse_yaml_spec (8-GPU nvidia-like spec): median {:?} of {runs}", median(parse));
}
