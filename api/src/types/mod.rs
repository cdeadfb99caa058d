//! The domain types of the contract: what the rest of Basalt works with.
//! Each has a `validate` whose errors name the offending field.

mod agent;
mod image;
mod member;
mod meta;
mod migration;
mod network;
mod node;
mod object;
mod placement;
mod policy;
mod storage;
mod token;
pub(crate) mod validate;
mod vm;
mod volume;
mod watch;

pub use agent::{Heartbeat, HeartbeatAck, Registered, Registration, ReplicaMark, StatusReport};
pub use image::{Image, ImageFormat, ImageNodeStatus, ImagePhase, ImageSpec, ImageStatus};
pub use member::Member;
pub use meta::{Condition, ObjectMeta};
pub use migration::{
    DEFAULT_MIGRATION_START_TIMEOUT_SECONDS, DEFAULT_MIGRATION_TIMEOUT_SECONDS,
    MAX_MIGRATION_FLOWS, MAX_MIGRATION_START_TIMEOUT_SECONDS, MAX_MIGRATION_TIMEOUT_SECONDS,
    Migration, MigrationPhase, MigrationSpec, MigrationStatus, TrackedFlow,
};
pub use network::{Endpoint, MAX_VNI, Network, NetworkRouting, NetworkSpec};
pub use node::{Node, NodeSpec, NodeStatus, Resources};
pub use object::{Kind, Object, ObjectList};
pub use placement::Placement;
pub use policy::{
    MAX_POLICY_RULES, Policy, PolicyAction, PolicyProtocol, PolicyRule, PolicySpec, labels_match,
};
pub use storage::{
    AttachVolume, DiskState, EnsureVolume, FenceAnswer, FenceRequest, MAX_LISTED_OUT_OF_SYNC,
    MAX_REPLICA_PEERS, MAX_STORAGE_VOLUME_BYTES, MAX_VOLUME_NAME_LEN, PeerVerify, ReplicaPeer,
    ReplicaPeerState, ReplicationProtocol, StorageStatus, StorageVolume, VerifyVolume,
    VolumeAttachment, VolumeExport, VolumeRole, VolumeVerify,
};
pub(crate) use storage::{validate_volume_name, validate_volume_size};
pub use token::{JoinToken, JoinTokenSpec, JoinTokenStatus, TokenSecret};
pub use vm::{
    CloudInit, DISK_SECTOR_BYTES, Disk, KernelBoot, MAX_DISK_REPLICAS, MIN_VM_MEMORY_MIB, Nic,
    NicAddress, PlacementRules, Vm, VmPhase, VmSpec, VmStatus,
};
pub use volume::{
    MAX_REPLICA_ERROR_LEN, ReplicaReport, ReplicaState, Volume, VolumeOwner, VolumeReplica,
    VolumeReport, VolumeSource, VolumeSpec, VolumeStatus, disk_storage_name,
};
pub use watch::WatchEvent;
