//! What the in-process disk tests share: a memory-backed pool with one
//! 8 MiB volume `vol` (its backend kept, to fail on command), attachments
//! over it that retry peers every 50 ms, an attach spec at epoch 1 that
//! lets writes go on without a peer, and writes through the volume's
//! attachment.

#![allow(dead_code, reason = "each test file uses part of it")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use basalt_sds::backend::MemBackend;
use basalt_sds::pool::{Pool, PoolOptions};
use basalt_sds::replication::attach::{AttachOptions, AttachSpec, Attachments, Role};
use basalt_sds::replication::book::ReplicaBook;
use basalt_sds::replication::{Op, ReplicationError};

/// The size of `vol`.
pub const VOL: u64 = 8 << 20;

/// A 64 MiB memory pool holding `vol`, and its backend.
pub fn pool() -> (Pool, Arc<MemBackend>) {
    let backend = Arc::new(MemBackend::new(64 << 20));
    let pool = Pool::create(backend.clone(), &PoolOptions::default()).expect("pool");
    pool.create_volume("vol", VOL).expect("volume");
    (pool, backend)
}

/// Attachments of `pool` with an in-memory book, retrying peers every
/// 50 ms.
pub fn attachments(pool: &Pool) -> Arc<Attachments> {
    Arc::new(Attachments::new(
        pool.clone(),
        Arc::new(ReplicaBook::in_memory(0)),
        AttachOptions {
            retry: Duration::from_millis(50),
            ..AttachOptions::default()
        },
    ))
}

/// `role` at epoch 1 with `peers`, writes going on without a lost peer.
pub fn spec(role: Role, peers: &[SocketAddr]) -> AttachSpec {
    AttachSpec {
        role,
        epoch: 1,
        peers: peers.iter().map(ToString::to_string).collect(),
        allow_outdate: true,
        protocol: Default::default(),
    }
}

/// Writes 4 KiB of `byte` at `offset` of `vol` through its attachment.
pub fn write(
    att: &Attachments,
    pool: &Pool,
    offset: u64,
    byte: u8,
) -> Result<(), ReplicationError> {
    write_bytes(att, pool, offset, &[byte; 4096])
}

/// Writes `data` at `offset` of `vol` through its attachment.
pub fn write_bytes(
    att: &Attachments,
    pool: &Pool,
    offset: u64,
    data: &[u8],
) -> Result<(), ReplicationError> {
    let vol = pool.open_volume("vol").expect("open");
    att.slot("vol").submit(
        Op::Write {
            offset,
            data,
            fua: false,
        },
        || vol.write(offset, data, false),
    )
}
