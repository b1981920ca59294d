//! Generates the worker RPC's code from `proto/worker.proto` with a
//! protobuf compiler written in Rust, so building needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/worker.proto");
    let fds = protox::compile(["worker.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".stacyvm.worker.v1.Chunk.data")
        .bytes(".stacyvm.worker.v1.ImageChunk.data")
        .compile_fds(fds)?;
    Ok(())
}
