//! machine-agent: the node agent of a remote container-build service's builder VMs.
//!
//! It proves the VM's identity to the control plane, takes a task (run BuildKit
//! with this mTLS material on this cache volume), prepares the volume, starts
//! and supervises the engine, streams health, and on termination drains and
//! reports. See README.md for the picture and ARCHITECTURE.md for the plan.
//!
//! # Module map
//!
//! Uses point one way, down this list; `scripts/module-deps.py` (run by CI)
//! fails on a cycle between top-level modules:
//!
//! 1. [`agent`]: the wiring and the one loop; the only module that changes the lifecycle state.
//! 2. [`config`]: at the top, below the agent only: it validates the file and builds
//!    each capability's settings type; no capability reads the config.
//! 3. Capabilities, each owning its I/O and its settings type, in this order of use:
//!    [`control`] (reads the status, starts nothing), [`gc`] (prunes through the engine's client),
//!    [`observe`] (the status snapshot, samples, OOM kills, metrics, endpoints),
//!    [`engine`] (buildkitd), [`volume`] (the cache volume).
//! 4. [`task`]: the untrusted task turned into validated types (and its TLS material).
//! 5. Leaves, which use nothing of the crate: [`lifecycle`] (the state table), [`backoff`],
//!    [`describe`], [`clock`], [`fsutil`], [`instance`] (one agent per machine), [`secret`],
//!    [`signal`], [`sys`], [`systemd`], and the generated [`proto`].
#![deny(unsafe_code)]

/// The wiring and the one loop that drives the lifecycle.
pub mod agent;
/// Exponential backoff with full jitter for remote calls; exact poll gaps for local state.
pub mod backoff;
/// Wall-clock timestamps for reports.
pub mod clock;
/// The agent's TOML config, validated once at start into each capability's settings.
pub mod config;
/// The control plane: registration, health stream, usage and shutdown reports.
pub mod control;
/// One-line descriptions of errors, gRPC statuses and process exits.
pub mod describe;
/// The build engine's process.
pub mod engine;
/// Atomic file writes, bounded reads of input files, and the clean-absolute-path check.
pub mod fsutil;
/// Cache garbage collection: policy, planner, executor, BuildKit's backstop rules.
pub mod gc;
/// One agent per machine: the state dir's lock, and how a live agent is recognised.
pub mod instance;
/// The lifecycle as data: states, events, legal transitions (pure).
pub mod lifecycle;
/// The status snapshot, samples, OOM kills, metrics, loop liveness and the HTTP endpoints.
pub mod observe;
/// A string that never reaches a log.
pub mod secret;
/// SIGTERM and SIGINT.
pub mod signal;
/// The crate's only unsafe code: raw syscalls (FITRIM) behind safe wrappers.
#[allow(unsafe_code)]
pub mod sys;
/// sd_notify over the datagram socket.
pub mod systemd;
/// Untrusted tasks turned into validated domain types.
pub mod task;
/// The cache volume.
pub mod volume;

/// The control-plane contract, generated from proto/ by build.rs.
#[allow(missing_docs, clippy::all, clippy::pedantic, missing_debug_implementations)]
pub mod proto {
    pub mod v1 {
        tonic::include_proto!("machineagent.v1");
    }
    /// BuildKit's Control API (the subset the agent calls), client only.
    pub mod moby {
        pub mod buildkit {
            pub mod v1 {
                tonic::include_proto!("moby.buildkit.v1");
                pub mod types {
                    tonic::include_proto!("moby.buildkit.v1.types");
                }
            }
        }
    }
    /// The standard gRPC health check buildkitd serves, client only.
    pub mod grpc {
        pub mod health {
            pub mod v1 {
                tonic::include_proto!("grpc.health.v1");
            }
        }
    }
}
