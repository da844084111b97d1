//! Compiles the protobuf contracts in proto/ with tonic-build. protoc comes
//! from the protoc-bin-vendored crate so a fresh machine needs no system package.
//!
//! - machineagent.v1: the control-plane contract, client and server (the
//!   tests' control-plane double serves it);
//! - moby.buildkit.v1 and grpc.health.v1: the subset of BuildKit's own API the
//!   agent calls on buildkitd; the Control server too, for the tests' engine
//!   double (answers a real buildkitd cannot be made to give on demand, such
//!   as a DiskUsage larger than its send limit).

use std::path::PathBuf;

#[allow(clippy::disallowed_methods)] // build scripts are single-threaded
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let well_known = protoc_bin_vendored::include_path()?;
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(true) // the tests' control-plane double serves this contract
        .compile_protos(&["proto/machineagent/v1/agent.proto"], &["proto"])?;
    tonic_prost_build::configure().build_server(true).compile_protos(
        &[PathBuf::from("proto/moby/buildkit/v1/control.proto"), PathBuf::from("proto/grpc/health/v1/health.proto")],
        &[PathBuf::from("proto"), well_known],
    )?;
    Ok(())
}
