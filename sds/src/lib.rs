//! Basalt's software-defined storage, run as its own process per node
//! (`basaltd storage`): a thin-provisioned pool and an NBD server that
//! QEMU reads its disks from.
//!
//! - [`backend`]: where the bytes live (a file or block device, or a
//!   memory store that simulates power loss for tests);
//! - [`pool`]: thin volumes, snapshots and clones on one backing store,
//!   crash-safe through a journal and two checkpoint slots
//!   (`sds/DESIGN.md` has the on-disk format and the crash argument);
//! - [`nbd`]: the NBD server (fixed newstyle, structured replies,
//!   `base:allocation`) over TCP and Unix sockets;
//! - [`pipe`]: a kernel pipe that moves a big write's payload from the
//!   socket to the pool's file without copying it through user memory;
//! - [`replication`]: DRBD-style synchronous replication to one or two
//!   peers (protocol C, epoch fencing, dirty-chunk resync, full sync of a
//!   new replica), each volume's role set at run time;
//! - [`local`]: the storage-local gRPC API the node agent calls on a Unix
//!   socket (volumes, exports, replication roles, status).
//!
//! Invariants:
//! - after `kill -9` every acknowledged write is readable; after a power
//!   loss every write covered by an acknowledged FLUSH or FUA is;
//! - no chunk is ever leaked or doubly owned ([`pool::Pool::verify`]);
//! - no input from a client can panic the process or damage a volume.

pub mod backend;
pub mod local;
pub mod nbd;
pub mod pipe;
pub mod pool;
pub mod replication;
