//! Generates the SkyWalking v3 protocol code and pprof's profile format from `proto/`
//! with a pure-Rust protobuf compiler (protox), so a fresh machine needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "profile/Profile.proto",
        "profile/ProfileCompat.proto",
        "management/Management.proto",
        "discard/Discard.proto",
        "language-agent/Tracing.proto",
        "pprof/profile.proto",
    ];
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .include_file("skywalking_protocol.rs")
        .compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
