//! A whole NBD session (handshake, options, transmission) driven by the
//! fuzzer's bytes against a pool on the memory backend. Fails on a panic,
//! a hang, or a pool that no longer verifies.

#![no_main]

use std::sync::Arc;
use std::time::Duration;

use basalt_sds::backend::MemBackend;
use basalt_sds::nbd::Server;
use basalt_sds::pool::{Pool, PoolOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let backend = Arc::new(MemBackend::new(8 << 20));
    let opts = PoolOptions {
        chunk_size: 4096,
        ..PoolOptions::default()
    };
    let pool = Pool::create(backend, &opts).expect("pool");
    pool.create_volume("v", 2 << 20).expect("volume");
    pool.snapshot("v", "s").expect("snapshot");
    let server = Server::new(pool.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let out = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), server.replay(data)).await
    });
    assert!(out.is_ok(), "session hung");
    pool.verify().expect("pool verifies after the session");
});
