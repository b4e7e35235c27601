//! Compiles the `.proto` files with `protox` (a pure-Rust protobuf compiler),
//! so building needs no system `protoc`. The descriptor set is kept for gRPC
//! reflection and for decoding events to JSON.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "nrm/common/v1/common.proto",
    "nrm/common/v1/operator.proto",
    "nrm/common/v1/audit.proto",
    "nrm/identification/v1/identification.proto",
    "nrm/referral/v1/referral.proto",
    "nrm/shelter/v1/shelter.proto",
    "nrm/repatriation/v1/repatriation.proto",
    "nrm/casepath/v1/casepath.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=nrm");
    let fds = protox::compile(PROTOS, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("nrm_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
