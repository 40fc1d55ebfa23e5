//! Generates the damselfly.v1 types with a vendored `protoc`, so a plain `cargo build` needs no system package.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_with_config(config, &["damselfly/v1/ingest.proto"], &["."])?;
    println!("cargo:rerun-if-changed=damselfly/v1/ingest.proto");
    Ok(())
}
