//! Engine traces: a task names an OTLP/gRPC collector from the config's
//! allow-list, the agent starts the real engine with BuildKit's traces
//! exporter pointed at it, and a real build's spans arrive at a small
//! receiver in the test (tests/support/otlp.rs). A collector outside the
//! list, or OTEL_* variables in engine_env, are task errors naming the field.
//!
//! Needs root (the OCI worker, the engine's cgroup), runc and the buildkitd
//! of scripts/install-buildkit.sh.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;
use std::time::Duration;
use support::engine::{build_context, buildctl_build, wait_ready, World};
use support::otlp::OtlpReceiver;

/// BuildKit's batch span processor exports every 5 s (the OpenTelemetry
/// default); a loaded CI machine gets several rounds of that.
const SPANS_WITHIN: Duration = Duration::from_secs(60);

/// A world whose config allows `allowed` as trace endpoints and whose task names `endpoint`.
fn trace_world(allowed: &[String], endpoint: &str) -> World {
    let w = World::new();
    let config = std::fs::read_to_string(&w.config).unwrap();
    let marker = "allowed_task_env = [\"ENGINE_MARKER\"]\n";
    assert!(config.contains(marker));
    std::fs::write(&w.config, config.replace(marker, &format!("{marker}trace_endpoints = {allowed:?}\n"))).unwrap();
    let task = std::fs::read_to_string(&w.task).unwrap();
    std::fs::write(&w.task, task.replacen("max_parallelism = 2\n", &format!("max_parallelism = 2\ntrace_endpoint = {endpoint:?}\n"), 1)).unwrap();
    w
}

#[tokio::test]
async fn spans_of_a_real_build_reach_the_allowed_collector() {
    let receiver = OtlpReceiver::start();
    let w = trace_world(&[receiver.endpoint()], &receiver.endpoint());
    let agent = w.start();
    wait_ready(&agent).await;

    // The exporter's variables are in the engine's environment, set by the agent.
    let pid = support::engine_pid(&w.root).expect("a pidfile");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let vars: Vec<String> = environ.split(|&b| b == 0).map(|kv| String::from_utf8_lossy(kv).into_owned()).filter(|kv| kv.starts_with("OTEL_")).collect();
    assert_eq!(vars, [format!("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT={}", receiver.endpoint()), "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=grpc".to_string()]);

    let ctx = build_context(&w.root, "/bin/busybox echo traced > /traced", 1024);
    let built = buildctl_build(&w.buildctl_tls_args(true), &ctx, &w.root.join("out"));
    assert!(built.status.success(), "build failed:\n{}", String::from_utf8_lossy(&built.stderr));

    let built_at = tokio::time::Instant::now();
    support::eventually("spans from the build at the receiver", SPANS_WITHIN, || receiver.spans() > 0).await;
    let names = receiver.span_names();
    // For the notes: how soon after the build the first export landed.
    println!("spans received: {} ({:?} after the build ended); names: {names:?}", receiver.spans(), built_at.elapsed());
    assert!(names.iter().any(|n| n.contains("moby.buildkit.v1.Control/Solve") || n.contains("Solve")), "a span of the build's Solve call: {names:?}");
    drop(agent);
}

#[tokio::test]
async fn an_endpoint_outside_the_allow_list_or_otel_in_engine_env_is_a_task_error() {
    let allowed = "http://127.0.0.1:4317".to_string();
    let w = trace_world(std::slice::from_ref(&allowed), "http://198.51.100.7:4317");
    let run = |w: &World| {
        Command::new(env!("CARGO_BIN_EXE_machine-agent"))
            .args(["run", "--config", w.config.to_str().unwrap(), "--standalone", w.task.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = run(&w);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit 2 for a bad task; stderr:\n{stderr}");
    assert!(stderr.contains("buildkit.trace_endpoint") && stderr.contains("engine.trace_endpoints"), "{stderr}");
    assert!(!w.root.join("state/engine").exists(), "nothing written for the engine");

    // The allowed endpoint, but also the exporter's variable in engine_env: refused by name.
    let w = trace_world(std::slice::from_ref(&allowed), &allowed);
    let task = std::fs::read_to_string(&w.task).unwrap();
    std::fs::write(&w.task, task.replace("[engine_env]\n", "[engine_env]\nOTEL_EXPORTER_OTLP_ENDPOINT = \"http://198.51.100.7:4317\"\n")).unwrap();
    let out = run(&w);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit 2 for a bad task; stderr:\n{stderr}");
    assert!(stderr.contains("buildkit.engine_env[OTEL_EXPORTER_OTLP_ENDPOINT]") && stderr.contains("buildkit.trace_endpoint"), "{stderr}");
    assert!(!w.root.join("state/engine").exists(), "nothing written for the engine");
}
