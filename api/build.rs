//! Generates the gRPC code for `proto/basalt/v1/*.proto` with `protoc`.
//!
//! `protoc` is `$PROTOC` when set, `/usr/bin/protoc` (Debian's
//! `protobuf-compiler`) otherwise; a missing one fails the build with the
//! package to install instead of a bare "No such file or directory".

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "proto/basalt/v1/meta.proto",
    "proto/basalt/v1/node.proto",
    "proto/basalt/v1/vm.proto",
    "proto/basalt/v1/placement.proto",
    "proto/basalt/v1/token.proto",
    "proto/basalt/v1/member.proto",
    "proto/basalt/v1/network.proto",
    "proto/basalt/v1/migration.proto",
    "proto/basalt/v1/image.proto",
    "proto/basalt/v1/policy.proto",
    "proto/basalt/v1/volume.proto",
    "proto/basalt/v1/admin.proto",
    "proto/basalt/v1/agent.proto",
    "proto/basalt/v1/raft.proto",
    "proto/basalt/v1/error.proto",
    "proto/basalt/v1/storage.proto",
];

fn main() {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-env-changed=PROTOC");

    let protoc = std::env::var_os("PROTOC")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/protoc"));
    if !protoc.is_file() {
        panic!(
            "basalt-api needs protoc, not found at {}: install protobuf-compiler \
             (apt-get install protobuf-compiler) or set PROTOC to its path",
            protoc.display()
        );
    }

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(&protoc);
    // Deterministic encoding of maps (labels, node selectors).
    config.btree_map(["."]);
    if let Err(err) = tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        .compile_with_config(config, PROTOS, &["proto"])
    {
        panic!("basalt-api: compiling the .proto files failed: {err}");
    }
}
