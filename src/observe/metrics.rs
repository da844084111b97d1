//! The agent's Prometheus registry: every metric it exports, in one place, with
//! `machine_agent_` names, base units and HELP text.

use crate::lifecycle::State;
use prometheus::{Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

/// Handles to every metric; cheap to clone (each is an `Arc` inside).
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    state: IntGaugeVec,
    /// Held while the nine state series change and while a scrape gathers,
    /// so no scrape sees zero or two states at 1.
    state_change: std::sync::Arc<std::sync::Mutex<()>>,
    pub control_plane_connected: IntGauge,
    pub control_plane_reconnects: IntCounter,
    pub control_plane_errors: IntCounterVec,
    pub health_reports_sent: IntCounter,
    pub health_report_bytes: IntCounterVec,
    pub tasks_rejected: IntCounter,
    pub engine_up: IntGauge,
    pub engine_restarts: IntCounterVec,
    pub gc_runs: IntCounterVec,
    pub gc_freed_bytes: IntCounter,
    pub gc_freed_records: IntCounter,
    pub gc_last_run_freed_bytes: IntGauge,
    pub gc_last_run_duration_seconds: Gauge,
    pub gc_last_run_timestamp_seconds: Gauge,
    pub oom_kills: IntCounterVec,
    pub kmsg_overruns: IntCounter,
    pub kmsg_user_records: IntCounter,
    pub task_conflicts: IntCounter,
    /// Endpoint connections the server closed, by `listener` and `reason`.
    pub endpoint_connections_closed: IntCounterVec,
    pub volume_size_bytes: GaugeVec,
    pub volume_free_bytes: GaugeVec,
    pub volume_inodes: GaugeVec,
    pub volume_free_inodes: GaugeVec,
    /// 1 for each prepared cache mount, labelled with its cache mode and source kind.
    pub volume_info: GaugeVec,
    pub cache_resets: IntCounterVec,
    pub engine_adoptions: IntCounter,
    /// Finished build steps: how long each ran, its peak memory and CPU.
    pub build_step_duration_seconds: Histogram,
    pub build_step_peak_memory_bytes: Histogram,
    pub build_step_cpu_seconds: Histogram,
    /// Host and engine-tree CPU and memory, from the sampler.
    resources: ResourceMetrics,
}

/// Registering a metric fails only on a duplicate name or bad label set, which
/// is a programming error caught by every test that builds `Metrics`.
#[allow(clippy::expect_used)]
fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    registry.register(Box::new(metric.clone())).expect("metric names are unique and valid");
    metric
}

#[allow(clippy::expect_used)] // static, valid names and labels: see `register`
impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("machine_agent".into()), None).expect("valid prefix");
        let build_info = register(
            &registry,
            IntGaugeVec::new(Opts::new("build_info", "The agent's version and architecture; always 1."), &["version", "arch"]).expect("valid"),
        );
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION"), std::env::consts::ARCH]).set(1);
        let state = register(
            &registry,
            IntGaugeVec::new(Opts::new("state", "1 for the agent's current lifecycle state, 0 for the others."), &["state"]).expect("valid"),
        );
        for s in State::ALL {
            state.with_label_values(&[s.as_str()]).set(i64::from(s == State::Starting));
        }
        Self {
            state,
            state_change: std::sync::Arc::default(),
            control_plane_connected: register(
                &registry,
                IntGauge::new("control_plane_connected", "1 while the task stream to the control plane is open.").expect("valid"),
            ),
            control_plane_reconnects: register(
                &registry,
                IntCounter::new("control_plane_reconnects_total", "Times the agent dialled the control plane again after losing or failing to open a stream.")
                    .expect("valid"),
            ),
            control_plane_errors: register(
                &registry,
                IntCounterVec::new(Opts::new("control_plane_errors_total", "Failed control-plane calls, by call."), &["call"]).expect("valid"),
            ),
            health_reports_sent: register(
                &registry,
                IntCounter::new("health_reports_sent_total", "Health reports handed to the health stream.").expect("valid"),
            ),
            health_report_bytes: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "health_report_bytes_total",
                        "Protobuf bytes of the health reports sent, by kind (full or delta), before gRPC, HTTP/2 and TLS framing.",
                    ),
                    &["kind"],
                )
                .expect("valid"),
            ),
            tasks_rejected: register(
                &registry,
                IntCounter::new("tasks_rejected_total", "Tasks from the control plane or a task file that failed validation.").expect("valid"),
            ),
            engine_up: register(&registry, IntGauge::new("engine_up", "1 while buildkitd answers health checks and has a worker.").expect("valid")),
            engine_restarts: {
                let restarts = register(
                    &registry,
                    IntCounterVec::new(Opts::new("engine_restarts_total", "Engine exits the supervisor restarted after, by how it ended."), &["reason"])
                        .expect("valid"),
                );
                // Every reason exported from the start, so a rate() sees the first one.
                for reason in ["clean_exit", "exit_code", "signal", "oom_killed", "unresponsive", "spawn_failed"] {
                    restarts.with_label_values(&[reason]);
                }
                restarts
            },
            gc_runs: register(
                &registry,
                IntCounterVec::new(
                    Opts::new("gc_runs_total", "Cache GC runs by trigger (startup, interval, pressure, manual) and outcome (ok, error, deferred)."),
                    &["trigger", "outcome"],
                )
                .expect("valid"),
            ),
            gc_freed_bytes: register(
                &registry,
                IntCounter::new("gc_freed_bytes_total", "Bytes the engine reported freed by the agent's cache GC.").expect("valid"),
            ),
            gc_freed_records: register(&registry, IntCounter::new("gc_freed_records_total", "Cache records pruned by the agent's cache GC.").expect("valid")),
            gc_last_run_freed_bytes: register(&registry, IntGauge::new("gc_last_run_freed_bytes", "Bytes freed by the last completed GC run.").expect("valid")),
            gc_last_run_duration_seconds: register(
                &registry,
                Gauge::new("gc_last_run_duration_seconds", "How long the last completed GC run took.").expect("valid"),
            ),
            gc_last_run_timestamp_seconds: register(
                &registry,
                Gauge::new("gc_last_run_timestamp_seconds", "Unix time of the last completed GC run.").expect("valid"),
            ),
            oom_kills: {
                let kills = register(
                    &registry,
                    IntCounterVec::new(
                        Opts::new(
                            "oom_kills_total",
                            "Processes the kernel's OOM killer killed on this host, by whom it hit: engine (buildkitd), build_step, other, unknown (no memcg in the kernel's lines), unattributed (counted by /proc/vmstat, lines lost).",
                        ),
                        &["attribution"],
                    )
                    .expect("valid"),
                );
                for attribution in crate::observe::oom::Attribution::LABELS {
                    kills.with_label_values(&[attribution]);
                }
                kills
            },
            kmsg_overruns: register(
                &registry,
                IntCounter::new("kmsg_overruns_total", "Times the kernel log ring overwrote records before the OOM watcher read them.").expect("valid"),
            ),
            kmsg_user_records: register(
                &registry,
                IntCounter::new(
                    "kmsg_user_records_total",
                    "Kernel log records written from user space (not the kernel's facility) that the OOM watcher read and ignored.",
                )
                .expect("valid"),
            ),
            task_conflicts: register(
                &registry,
                IntCounter::new(
                    "task_conflicts_total",
                    "Tasks the control plane re-sent under the running task's id with different content; the running task was kept.",
                )
                .expect("valid"),
            ),
            endpoint_connections_closed: {
                let closed = register(
                    &registry,
                    IntCounterVec::new(
                        Opts::new(
                            "endpoint_connections_closed_total",
                            "Endpoint connections the agent closed: shed at the connection cap, or not sending a whole request head within the header read timeout.",
                        ),
                        &["listener", "reason"],
                    )
                    .expect("valid"),
                );
                for listener in ["public", "detail"] {
                    for reason in ["shed", "header_timeout"] {
                        closed.with_label_values(&[listener, reason]);
                    }
                }
                closed
            },
            volume_size_bytes: volume_gauge(&registry, "volume_size_bytes", "Size of the filesystem at each watched mount."),
            volume_free_bytes: volume_gauge(&registry, "volume_free_bytes", "Bytes available to unprivileged writers on the filesystem at each watched mount."),
            volume_inodes: volume_gauge(
                &registry,
                "volume_inodes",
                "Inodes of the filesystem at each watched mount (0 where the filesystem has no fixed count).",
            ),
            volume_free_inodes: volume_gauge(&registry, "volume_free_inodes", "Free inodes of the filesystem at each watched mount."),
            volume_info: register(
                &registry,
                GaugeVec::new(
                    Opts::new("volume_info", "1 for each prepared cache mount: its cache mode (primary, clone, isolated) and source kind (device, file, rbd)."),
                    &["mount", "mode", "kind"],
                )
                .expect("valid"),
            ),
            engine_adoptions: register(
                &registry,
                IntCounter::new("engine_adoptions_total", "Engines a starting agent found running for its task and adopted instead of restarting.")
                    .expect("valid"),
            ),
            cache_resets: {
                let resets = register(
                    &registry,
                    IntCounterVec::new(
                        Opts::new("cache_resets_total", "Cache reset requests from the control plane, by outcome (done, refused, failed)."),
                        &["outcome"],
                    )
                    .expect("valid"),
                );
                for outcome in ["done", "refused", "failed"] {
                    resets.with_label_values(&[outcome]);
                }
                resets
            },
            build_step_duration_seconds: register(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new("build_step_duration_seconds", "How long each finished build step's container ran (its cgroup first to last seen).")
                        .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0]),
                )
                .expect("valid"),
            ),
            build_step_peak_memory_bytes: register(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new("build_step_peak_memory_bytes", "Each finished build step's memory high-water mark (0 where the kernel keeps none).")
                        .buckets(prometheus::exponential_buckets(f64::from(1u32 << 20), 4.0, 9).expect("valid")),
                )
                .expect("valid"),
            ),
            build_step_cpu_seconds: register(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new("build_step_cpu_seconds", "CPU time each finished build step's processes used.")
                        .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0]),
                )
                .expect("valid"),
            ),
            resources: ResourceMetrics::new(&registry),
            registry,
        }
    }

    /// Counts a finished build step in the step histograms.
    pub fn record_step(&self, step: &crate::observe::steps::StepRecord) {
        self.build_step_duration_seconds.observe(step.duration_seconds());
        // f64 holds integers exactly up to 2^53 bytes: every real step.
        #[allow(clippy::cast_precision_loss)]
        self.build_step_peak_memory_bytes.observe(step.peak_memory_bytes as f64);
        self.build_step_cpu_seconds.observe(step.cpu_seconds);
    }

    /// Names the prepared cache mounts: one `volume_info` series each, the
    /// series of mounts no longer prepared removed.
    pub fn set_cache_volumes(&self, volumes: &[crate::observe::status::CacheVolume]) {
        self.volume_info.reset();
        for v in volumes {
            self.volume_info.with_label_values(&[&v.mount_path.display().to_string(), v.mode, v.kind]).set(1.0);
        }
    }

    /// Sets the host and engine gauges from one sampler tick (engine gauges to
    /// 0 when no engine runs), and adds the tick's engine CPU to its counter.
    pub fn record_sample(&self, sample: &crate::observe::sampler::Sample) {
        self.resources.record(sample);
    }

    /// Sets the volume gauges of every mount one sampler tick read, and
    /// drops the series of mounts no longer watched.
    pub fn record_mounts(&self, mounts: &[crate::observe::status::MountFigures]) {
        // Drop only the mounts no longer watched, never the watched ones: a
        // reset() before the sets let a scrape in between miss every mount (a
        // gap and a staleness marker in Prometheus; tests/metrics_load.rs races them).
        for gauge in [&self.volume_size_bytes, &self.volume_free_bytes, &self.volume_inodes, &self.volume_free_inodes] {
            for family in prometheus::core::Collector::collect(gauge) {
                for metric in family.get_metric() {
                    let Some(path) = metric.get_label().iter().find(|l| l.name() == "mount").map(|l| l.value()) else { continue };
                    if !mounts.iter().any(|m| m.path.as_os_str() == path) {
                        let _ = gauge.remove_label_values(&[path]);
                    }
                }
            }
        }
        for m in mounts {
            let path = m.path.display().to_string();
            let label = [path.as_str()];
            let m = &m.stats;
            // f64 holds integers exactly up to 2^53 bytes (8 PiB): every real disk.
            #[allow(clippy::cast_precision_loss)]
            {
                self.volume_size_bytes.with_label_values(&label).set(m.total_bytes as f64);
                self.volume_free_bytes.with_label_values(&label).set(m.free_bytes as f64);
                self.volume_inodes.with_label_values(&label).set(m.total_inodes as f64);
                self.volume_free_inodes.with_label_values(&label).set(m.free_inodes as f64);
            }
        }
    }

    pub fn set_state(&self, current: State) {
        let _changing = self.state_change.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for s in State::ALL {
            self.state.with_label_values(&[s.as_str()]).set(i64::from(s == current));
        }
    }

    /// The text exposition format, for /metrics.
    pub fn render(&self) -> String {
        let mut buf = vec![];
        // Encoding into a Vec only fails on a metric family that violates the
        // format, which our registry cannot hold; an empty scrape is the fallback.
        let families = {
            let _stable = self.state_change.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            self.registry.gather()
        };
        if let Err(error) = TextEncoder::new().encode(&families, &mut buf) {
            tracing::error!(%error, "cannot encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[allow(clippy::expect_used)] // static, valid names and labels: see `register`
fn volume_gauge(registry: &Registry, name: &str, help: &str) -> GaugeVec {
    register(registry, GaugeVec::new(Opts::new(name, help), &["mount"]).expect("valid"))
}

// === impl ResourceMetrics ===

/// The sampler's metrics. Engine CPU is a counter, not a gauge of cores: a
/// gauge shows one tick per scrape (a 30 s scrape of a 5 s tick misses five of
/// six), while `rate()` over the counter covers every tick. It follows the
/// sampler's `cpu_seconds_accounted`, which never decreases and includes steps
/// that exited between ticks; the tree's live total would drop at each exit.
#[derive(Clone, Debug)]
struct ResourceMetrics {
    host_cpu_utilisation: Gauge,
    host_cpus: IntGauge,
    host_load_average: GaugeVec,
    host_memory_total_bytes: IntGauge,
    host_memory_available_bytes: IntGauge,
    host_memory_used_bytes: IntGauge,
    host_swap_total_bytes: IntGauge,
    host_swap_used_bytes: IntGauge,
    engine_processes: IntGauge,
    engine_rss_bytes: IntGauge,
    engine_cpu_seconds: prometheus::Counter,
    /// The sampler's accounted total at the last record: the counter grows by
    /// the difference, so recording one sample twice adds nothing, and a new
    /// sampler (its total back at 0) counts from its own start.
    last_engine_cpu_seconds_accounted: std::sync::Arc<std::sync::Mutex<f64>>,
}

#[allow(clippy::expect_used)] // static, valid names and labels: see `register`
impl ResourceMetrics {
    fn new(registry: &Registry) -> Self {
        let int_gauge = |name: &str, help: &str| register(registry, IntGauge::new(name, help).expect("valid"));
        let host_load_average = register(
            registry,
            GaugeVec::new(Opts::new("host_load_average", "Host load average (runnable and uninterruptible tasks) over the window."), &["window"])
                .expect("valid"),
        );
        for window in LOAD_WINDOWS {
            host_load_average.with_label_values(&[window]);
        }
        Self {
            host_cpu_utilisation: register(
                registry,
                Gauge::new("host_cpu_utilisation_ratio", "Busy share of all host CPUs since the sampler's previous tick (0 to 1).").expect("valid"),
            ),
            host_cpus: int_gauge("host_cpus", "Online CPUs of the host."),
            host_load_average,
            host_memory_total_bytes: int_gauge("host_memory_total_bytes", "Host memory (MemTotal)."),
            host_memory_available_bytes: int_gauge("host_memory_available_bytes", "Host memory available without swapping (MemAvailable)."),
            host_memory_used_bytes: int_gauge("host_memory_used_bytes", "Host memory in use: total minus available."),
            host_swap_total_bytes: int_gauge("host_swap_total_bytes", "Host swap space."),
            host_swap_used_bytes: int_gauge("host_swap_used_bytes", "Host swap space in use."),
            engine_processes: int_gauge("engine_processes", "Processes in the engine's tree: buildkitd, runc and build steps (0 without an engine)."),
            engine_rss_bytes: int_gauge("engine_rss_bytes", "Resident memory summed over the engine's processes (0 without an engine)."),
            engine_cpu_seconds: register(
                registry,
                prometheus::Counter::new("engine_cpu_seconds_total", "CPU time used by the engine's tree, including build steps that exited between samples.")
                    .expect("valid"),
            ),
            last_engine_cpu_seconds_accounted: std::sync::Arc::default(),
        }
    }

    fn record(&self, sample: &crate::observe::sampler::Sample) {
        let bytes = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let host = &sample.host;
        self.host_cpu_utilisation.set(host.cpu_utilisation);
        self.host_cpus.set(i64::from(host.cpus));
        for (window, value) in LOAD_WINDOWS.iter().zip([host.load_1, host.load_5, host.load_15]) {
            self.host_load_average.with_label_values(&[window]).set(value);
        }
        self.host_memory_total_bytes.set(bytes(host.memory_total_bytes));
        self.host_memory_available_bytes.set(bytes(host.memory_available_bytes));
        self.host_memory_used_bytes.set(bytes(host.memory_used_bytes));
        self.host_swap_total_bytes.set(bytes(host.swap_total_bytes));
        self.host_swap_used_bytes.set(bytes(host.swap_used_bytes));
        let Some(engine) = &sample.engine else {
            self.engine_processes.set(0);
            self.engine_rss_bytes.set(0);
            return;
        };
        self.engine_processes.set(i64::from(engine.processes));
        self.engine_rss_bytes.set(bytes(engine.rss_bytes));
        let mut last = self.last_engine_cpu_seconds_accounted.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let grown = if engine.cpu_seconds_accounted >= *last { engine.cpu_seconds_accounted - *last } else { engine.cpu_seconds_accounted };
        if grown > 0.0 {
            self.engine_cpu_seconds.inc_by(grown);
        }
        *last = engine.cpu_seconds_accounted;
    }
}

/// The `window` labels of `host_load_average`, in the order of the sample's fields.
const LOAD_WINDOWS: [&str; 3] = ["1m", "5m", "15m"];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_never_sees_zero_or_two_states() {
        let m = Metrics::new();
        let flipper = {
            let m = m.clone();
            std::thread::spawn(move || {
                for i in 0..2000 {
                    m.set_state(if i % 2 == 0 { State::Ready } else { State::Degraded });
                }
            })
        };
        for _ in 0..300 {
            let text = m.render();
            let on = text.lines().filter(|l| l.starts_with("machine_agent_state{") && l.ends_with(" 1")).count();
            assert_eq!(on, 1, "{text}");
        }
        flipper.join().unwrap();
    }

    #[test]
    fn exposes_every_metric_with_the_prefix() {
        let m = Metrics::new();
        m.set_state(State::Ready);
        m.control_plane_errors.with_label_values(&["register"]).inc();
        let text = m.render();
        for name in [
            "machine_agent_build_info",
            "machine_agent_state{state=\"ready\"} 1",
            "machine_agent_state{state=\"starting\"} 0",
            "machine_agent_control_plane_connected 0",
            "machine_agent_control_plane_reconnects_total 0",
            "machine_agent_control_plane_errors_total{call=\"register\"} 1",
            "machine_agent_health_reports_sent_total 0",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }

    #[test]
    fn records_a_sample_and_zeroes_the_engine_when_it_is_gone() {
        use crate::observe::sampler::{EngineSample, HostSample, Sample};
        let m = Metrics::new();
        let text = m.render();
        for name in ["machine_agent_host_load_average{window=\"15m\"} 0", "machine_agent_engine_cpu_seconds_total 0"] {
            assert!(text.contains(name), "{name} exported before the first sample:\n{text}");
        }
        let host = HostSample {
            cpu_utilisation: 0.25,
            cpus: 2,
            load_1: 1.5,
            load_5: 0.75,
            load_15: 0.5,
            memory_total_bytes: 8 << 30,
            memory_available_bytes: 6 << 30,
            memory_used_bytes: 2 << 30,
            swap_total_bytes: 1 << 30,
            swap_used_bytes: 1 << 20,
        };
        let engine = |accounted: f64| EngineSample {
            pid: 42,
            processes: 7,
            rss_bytes: 300 << 20,
            cpu_seconds_total: 3.0,
            cpu_utilisation: 1.5,
            cpu_seconds_accounted: accounted,
        };
        let with_engine = |accounted| Sample { unix_time_ms: 1, host: host.clone(), engine: Some(engine(accounted)) };
        m.record_sample(&with_engine(10.0));
        m.record_sample(&with_engine(10.0)); // the same tick twice adds nothing
        m.record_sample(&with_engine(12.5));
        let text = m.render();
        for line in [
            "machine_agent_host_cpu_utilisation_ratio 0.25",
            "machine_agent_host_cpus 2",
            "machine_agent_host_load_average{window=\"1m\"} 1.5",
            "machine_agent_host_load_average{window=\"5m\"} 0.75",
            "machine_agent_host_load_average{window=\"15m\"} 0.5",
            "machine_agent_host_memory_total_bytes 8589934592",
            "machine_agent_host_memory_available_bytes 6442450944",
            "machine_agent_host_memory_used_bytes 2147483648",
            "machine_agent_host_swap_total_bytes 1073741824",
            "machine_agent_host_swap_used_bytes 1048576",
            "machine_agent_engine_processes 7",
            "machine_agent_engine_rss_bytes 314572800",
            "machine_agent_engine_cpu_seconds_total 12.5",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
        // The engine stops; a new sampler later starts its total from 0.
        m.record_sample(&Sample { unix_time_ms: 2, host: host.clone(), engine: None });
        m.record_sample(&with_engine(1.0));
        let text = m.render();
        assert!(text.lines().any(|l| l == "machine_agent_engine_cpu_seconds_total 13.5"), "{text}");
        m.record_sample(&Sample { unix_time_ms: 3, host, engine: None });
        let text = m.render();
        for line in ["machine_agent_engine_processes 0", "machine_agent_engine_rss_bytes 0", "machine_agent_engine_cpu_seconds_total 13.5"] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
    }
}
