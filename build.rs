//! Compiles the control-plane contract in proto/ with tonic-build. protoc comes
//! from the protoc-bin-vendored crate so a fresh machine needs no system package.

#[allow(clippy::disallowed_methods)] // build scripts are single-threaded
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(true) // the tests' control-plane double serves this contract
        .compile_protos(&["proto/machineagent/v1/agent.proto"], &["proto"])?;
    Ok(())
}
