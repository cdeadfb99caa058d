//! The replication wire protocol: Basalt's own framed TCP protocol
//! between a primary and a replica (`sds/DESIGN.md`, "Replication").
//!
//! All integers are little-endian. A connection starts with a [`Hello`]
//! from the primary and a [`HelloReply`] from the replica; then the
//! primary sends [`Frame`]s and the replica answers each with one
//! [`Ack`], in order. Decoding never panics: every malformed field is an
//! error that names it.
//!
//! A VERIFY frame ([`FrameKind::Verify`], online verify) changes nothing:
//! the replica reads the range at that point in the frame order and
//! answers with the range's [`digest`] in the ack's last field. A READ
//! frame ([`FrameKind::Read`], a primary whose own disk failed) is
//! answered by an ack followed, when [`Status::Ok`], by `length` bytes of
//! the range. A RESIZE frame ([`FrameKind::Resize`], version 5) grows the
//! replica's volume to `offset` bytes before it is acknowledged, in the
//! frame order, so writes past the old end that follow it apply.
//!
//! Versions: the hello carries the primary's; a replica accepts
//! [`MIN_VERSION`] to [`VERSION`] and answers with the lower of its own
//! and the primary's, which the connection then speaks (a primary never
//! sends a frame kind the answered version lacks). A replica older than
//! the primary's hello closes the connection unanswered; the primary then
//! says so and greets with [`MIN_VERSION`] next time.
//!
//! Protocol B (version 6): a frame flagged [`FLAG_RECEIVE_ACK`] is
//! answered twice, first with a [`Status::Received`] ack as soon as it is
//! read and admitted (before it is applied), then with the usual ack once
//! applied. Nothing else is ever answered twice.
//!
//! An ack with sequence number 0 (no frame has it) and status
//! [`Status::StaleEpoch`] is unsolicited: the replica saw a newer epoch
//! for the volume than this connection's (another primary, or a
//! promotion there), and the primary is deposed from now on.

use std::io::{self, Read, Write};

use uuid::Uuid;

/// Opens a hello (`BSLTREPL`).
pub const HELLO_MAGIC: u64 = u64::from_le_bytes(*b"BSLTREPL");
/// Opens every frame.
pub const FRAME_MAGIC: u32 = 0x5246_4c42;
/// Opens every acknowledgement.
pub const ACK_MAGIC: u32 = 0x4b41_4c42;
/// The protocol version this build speaks (3: VERIFY frames; 4: READ
/// frames; 5: RESIZE frames, a replica grows its copy to the hello's
/// size, and its hello reply carries its boot id; 6: receive acks for
/// protocol B, [`FLAG_RECEIVE_ACK`]; 7: a resync marks the replica's copy
/// incomplete until the FLUSH flagged [`FLAG_SYNCED`] that the primary
/// sends first in the live order, [`SYNCED_LIVE_VERSION`]).
pub const VERSION: u16 = 7;
/// The oldest version this build still speaks (with a peer that answers
/// it, volumes are not grown over the wire).
pub const MIN_VERSION: u16 = 4;
/// The first version with RESIZE frames.
pub const RESIZE_VERSION: u16 = 5;
/// The first version with receive acks ([`FLAG_RECEIVE_ACK`]).
pub const RECEIVE_ACK_VERSION: u16 = 6;
/// The first version in which a resync marks the replica's copy
/// incomplete and the primary, as it goes live, sends a FLUSH flagged
/// [`FLAG_SYNCED`] (also after a full sync, whose own last FLUSH then
/// carries no SYNCED): only then is the copy whole.
pub const SYNCED_LIVE_VERSION: u16 = 7;
/// The largest payload a frame may carry.
pub const MAX_FRAME_PAYLOAD: u32 = 64 << 20;
/// The longest volume name a hello may carry.
const MAX_NAME: usize = 256;

/// Why a frame or hello could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The socket failed or closed.
    #[error("connection lost")]
    Io(#[from] io::Error),
    /// A field holds a value the protocol does not allow.
    #[error("bad {field}: {value:#x}")]
    Bad {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
}

fn bad(field: &'static str, value: u64) -> WireError {
    WireError::Bad { field, value }
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_le_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// The primary's greeting: who it is and which volume it replicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version.
    pub version: u16,
    /// The primary's epoch (issued at promotion).
    pub epoch: u64,
    /// The generation identifier of this primary's stream to this peer.
    pub generation: u64,
    /// The generation the primary's own volume was in sync with when the
    /// stream started (0: none); a replica that is itself the primary of
    /// that generation knows the sender holds its data.
    pub synced_from: u64,
    /// The primary's volume uid.
    pub volume_uid: Uuid,
    /// The volume's size in bytes.
    pub size: u64,
    /// The volume's name (the replica's volume of that name receives).
    pub volume: String,
}

impl Hello {
    /// The hello's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + self.volume.len());
        b.extend_from_slice(&HELLO_MAGIC.to_le_bytes());
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&self.epoch.to_le_bytes());
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.extend_from_slice(&self.synced_from.to_le_bytes());
        b.extend_from_slice(self.volume_uid.as_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&(self.volume.len() as u16).to_le_bytes());
        b.extend_from_slice(self.volume.as_bytes());
        b
    }

    /// Reads a hello.
    pub fn read(r: &mut impl Read) -> Result<Hello, WireError> {
        let magic = read_u64(r)?;
        if magic != HELLO_MAGIC {
            return Err(bad("hello magic", magic));
        }
        let version = read_u16(r)?;
        if !(MIN_VERSION..=VERSION).contains(&version) {
            return Err(bad("protocol version", version.into()));
        }
        let epoch = read_u64(r)?;
        let generation = read_u64(r)?;
        let synced_from = read_u64(r)?;
        let mut uid = [0u8; 16];
        r.read_exact(&mut uid)?;
        let size = read_u64(r)?;
        let len = read_u16(r)? as usize;
        if len == 0 || len > MAX_NAME {
            return Err(bad("volume name length", len as u64));
        }
        let mut name = vec![0u8; len];
        r.read_exact(&mut name)?;
        let volume = String::from_utf8(name).map_err(|_| bad("volume name (not UTF-8)", 0))?;
        Ok(Hello {
            version,
            epoch,
            generation,
            synced_from,
            volume_uid: Uuid::from_bytes(uid),
            size,
            volume,
        })
    }
}

/// How a replica answers a hello or a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Accepted (and, for a frame, applied).
    Ok,
    /// The sender's epoch is older than the newest this replica has seen.
    StaleEpoch,
    /// The replica has no volume of that name, or its size differs.
    UnknownVolume,
    /// Applying the frame failed on the replica (its backing store).
    IoError,
    /// The frame was malformed (out of range, unknown kind).
    Invalid,
    /// The volume is not open to primaries here (attached standalone).
    Refused,
    /// The volume is a primary here and not in sync with the sender: two
    /// diverged primaries (reported, never resolved automatically).
    SplitBrain,
    /// The frame was read and its epoch admitted; it is not applied yet
    /// (protocol B's first answer to a [`FLAG_RECEIVE_ACK`] frame; the
    /// usual ack follows).
    Received,
}

impl Status {
    fn code(self) -> u32 {
        match self {
            Status::Ok => 0,
            Status::StaleEpoch => 1,
            Status::UnknownVolume => 2,
            Status::IoError => 3,
            Status::Invalid => 4,
            Status::Refused => 5,
            Status::SplitBrain => 6,
            Status::Received => 7,
        }
    }

    fn from_code(c: u32) -> Result<Status, WireError> {
        Ok(match c {
            0 => Status::Ok,
            1 => Status::StaleEpoch,
            2 => Status::UnknownVolume,
            3 => Status::IoError,
            4 => Status::Invalid,
            5 => Status::Refused,
            6 => Status::SplitBrain,
            7 => Status::Received,
            other => return Err(bad("status", other.into())),
        })
    }
}

/// The replica's answer to a hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloReply {
    /// The version the connection speaks (the lower of both sides').
    pub version: u16,
    /// Accepted or why not.
    pub status: Status,
    /// The newest epoch the replica has seen (after this hello).
    pub newest_epoch: u64,
    /// The replica is not in sync with this stream: the primary sends
    /// it the whole volume before anything else.
    pub full_sync: bool,
    /// The kernel boot id the replica's pool was opened in (version 5;
    /// zeros when unknown): another one than at the last connection means
    /// it may have lost writes it acknowledged but had not flushed.
    pub boot_id: [u8; 16],
}

impl HelloReply {
    /// The reply's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(24);
        b.extend_from_slice(&HELLO_MAGIC.to_le_bytes());
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&self.status.code().to_le_bytes());
        b.extend_from_slice(&self.newest_epoch.to_le_bytes());
        b.push(u8::from(self.full_sync));
        if self.version >= RESIZE_VERSION {
            b.extend_from_slice(&self.boot_id);
        }
        b
    }

    /// Reads a reply.
    pub fn read(r: &mut impl Read) -> Result<HelloReply, WireError> {
        let magic = read_u64(r)?;
        if magic != HELLO_MAGIC {
            return Err(bad("hello reply magic", magic));
        }
        let version = read_u16(r)?;
        if !(MIN_VERSION..=VERSION).contains(&version) {
            return Err(bad("protocol version", version.into()));
        }
        let status = Status::from_code(read_u32(r)?)?;
        let newest_epoch = read_u64(r)?;
        let mut full = [0u8; 1];
        r.read_exact(&mut full)?;
        let full_sync = match full[0] {
            0 => false,
            1 => true,
            other => return Err(bad("full sync flag", other.into())),
        };
        let mut boot_id = [0u8; 16];
        if version >= RESIZE_VERSION {
            r.read_exact(&mut boot_id)?;
        }
        Ok(HelloReply {
            version,
            status,
            newest_epoch,
            full_sync,
            boot_id,
        })
    }
}

/// What a frame asks the replica to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// Write the payload at the offset.
    Write,
    /// Discard the range.
    Trim,
    /// Zero the range.
    WriteZeroes,
    /// Make every earlier frame durable.
    Flush,
    /// Answer the [`digest`] of the range (online verify); nothing changes.
    Verify,
    /// Answer the range's bytes after the ack (the primary's disk failed).
    Read,
    /// Grow the volume to `offset` bytes (version 5).
    Resize,
}

impl FrameKind {
    fn code(self) -> u8 {
        match self {
            FrameKind::Write => 1,
            FrameKind::Trim => 2,
            FrameKind::WriteZeroes => 3,
            FrameKind::Flush => 4,
            FrameKind::Verify => 5,
            FrameKind::Read => 6,
            FrameKind::Resize => 7,
        }
    }

    fn from_code(c: u8) -> Result<FrameKind, WireError> {
        Ok(match c {
            1 => FrameKind::Write,
            2 => FrameKind::Trim,
            3 => FrameKind::WriteZeroes,
            4 => FrameKind::Flush,
            5 => FrameKind::Verify,
            6 => FrameKind::Read,
            7 => FrameKind::Resize,
            other => return Err(bad("frame kind", other.into())),
        })
    }
}

/// Frame flag: durable before the ack (NBD's FUA).
pub const FLAG_FUA: u8 = 1;
/// Frame flag: zero by writing, never by unmapping (NBD's NO_HOLE).
pub const FLAG_NO_HOLE: u8 = 2;
/// Frame flag: part of a resync, not a live write. From
/// [`SYNCED_LIVE_VERSION`], the first such WRITE, TRIM or WRITE_ZEROES
/// of a session makes the replica's copy incomplete until a FLUSH
/// flagged [`FLAG_SYNCED`].
pub const FLAG_RESYNC: u8 = 4;
/// Frame flag, on a FLUSH: once durable, the replica is in sync with the
/// hello's generation and its copy whole (sent after a full sync's last
/// chunk before [`SYNCED_LIVE_VERSION`]; from it, first in the live
/// order, when nothing is left to resync).
pub const FLAG_SYNCED: u8 = 8;
/// Frame flags of a chunk sent again in the live frame order (online
/// verify's repair): counted as resync, but the copy stays whole (one
/// chunk rewritten in order, not part of a batch).
pub const FLAG_REPAIR: u8 = FLAG_RESYNC | FLAG_SYNCED;
/// Frame flag (version 6, protocol B): answer a [`Status::Received`] ack
/// as soon as the frame is read and admitted, before applying it.
pub const FLAG_RECEIVE_ACK: u8 = 16;
const FLAGS_KNOWN: u8 = FLAG_FUA | FLAG_NO_HOLE | FLAG_RESYNC | FLAG_SYNCED | FLAG_RECEIVE_ACK;

/// One replicated operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What to do.
    pub kind: FrameKind,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// The sender's epoch.
    pub epoch: u64,
    /// The sender's sequence number (1, 2, ... per connection).
    pub seq: u64,
    /// Byte offset in the volume.
    pub offset: u64,
    /// Length in bytes (the payload's length for a write).
    pub length: u32,
    /// The data of a write; empty otherwise.
    pub data: Vec<u8>,
}

/// Bytes of a frame header.
pub const FRAME_HEADER_LEN: usize = 36;

impl Frame {
    /// Writes the frame (header, then payload) to `w`.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        let mut h = [0u8; FRAME_HEADER_LEN];
        h[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        h[4] = self.kind.code();
        h[5] = self.flags;
        h[8..16].copy_from_slice(&self.epoch.to_le_bytes());
        h[16..24].copy_from_slice(&self.seq.to_le_bytes());
        h[24..32].copy_from_slice(&self.offset.to_le_bytes());
        h[32..36].copy_from_slice(&self.length.to_le_bytes());
        w.write_all(&h)?;
        if self.kind == FrameKind::Write {
            w.write_all(&self.data)?;
        }
        w.flush()
    }

    /// Reads one frame.
    pub fn read(r: &mut impl Read) -> Result<Frame, WireError> {
        let mut h = [0u8; FRAME_HEADER_LEN];
        r.read_exact(&mut h)?;
        let le32 = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let le64 = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[i..i + 8]);
            u64::from_le_bytes(b)
        };
        if le32(0) != FRAME_MAGIC {
            return Err(bad("frame magic", le32(0).into()));
        }
        let kind = FrameKind::from_code(h[4])?;
        let flags = h[5];
        if flags & !FLAGS_KNOWN != 0 {
            return Err(bad("frame flags", flags.into()));
        }
        let length = le32(32);
        let mut data = Vec::new();
        if kind == FrameKind::Write {
            if length > MAX_FRAME_PAYLOAD {
                return Err(bad("write payload length", length.into()));
            }
            data = vec![0u8; length as usize];
            r.read_exact(&mut data)?;
        }
        Ok(Frame {
            kind,
            flags,
            epoch: le64(8),
            seq: le64(16),
            offset: le64(24),
            length,
            data,
        })
    }
}

/// The replica's answer to one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// The frame's sequence number.
    pub seq: u64,
    /// Applied, or why not.
    pub status: Status,
    /// The newest epoch the replica has seen; for a VERIFY frame answered
    /// [`Status::Ok`], the [`digest`] of the range instead.
    pub newest_epoch: u64,
}

/// The digest online verify compares: the first 8 bytes of the range's
/// SHA-256, little-endian.
pub fn digest(data: &[u8]) -> u64 {
    use sha2::Digest as _;
    let sum = sha2::Sha256::digest(data);
    let mut b = [0u8; 8];
    b.copy_from_slice(&sum[..8]);
    u64::from_le_bytes(b)
}

/// Bytes of an ack.
pub const ACK_LEN: usize = 24;

impl Ack {
    /// The ack's bytes.
    pub fn encode(&self) -> [u8; ACK_LEN] {
        let mut b = [0u8; ACK_LEN];
        b[0..4].copy_from_slice(&ACK_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.status.code().to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.newest_epoch.to_le_bytes());
        b
    }

    /// Reads one ack.
    pub fn read(r: &mut impl Read) -> Result<Ack, WireError> {
        let magic = read_u32(r)?;
        if magic != ACK_MAGIC {
            return Err(bad("ack magic", magic.into()));
        }
        let status = Status::from_code(read_u32(r)?)?;
        let seq = read_u64(r)?;
        let newest_epoch = read_u64(r)?;
        Ok(Ack {
            seq,
            status,
            newest_epoch,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_an_error() {
        assert_ne!(digest(&[0; 4096]), digest(&[1; 4096]));
        let v = Frame {
            kind: FrameKind::Verify,
            flags: 0,
            epoch: 7,
            seq: 4,
            offset: 65536,
            length: 65536,
            data: Vec::new(),
        };
        let mut vb = Vec::new();
        v.write_to(&mut vb).expect("encode");
        assert_eq!(vb.len(), FRAME_HEADER_LEN);
        assert_eq!(Frame::read(&mut vb.as_slice()).expect("decode"), v);
        let f = Frame {
            kind: FrameKind::Write,
            flags: FLAG_FUA,
            epoch: 7,
            seq: 3,
            offset: 4096,
            length: 5,
            data: b"hello".to_vec(),
        };
        let mut buf = Vec::new();
        f.write_to(&mut buf).expect("encode");
        assert_eq!(Frame::read(&mut buf.as_slice()).expect("decode"), f);
        let h = Hello {
            version: VERSION,
            epoch: 2,
            generation: 9,
            synced_from: 8,
            volume_uid: Uuid::from_u128(5),
            size: 1 << 20,
            volume: "vol".into(),
        };
        assert_eq!(Hello::read(&mut h.encode().as_slice()).expect("hello"), h);
        let reply = HelloReply {
            version: MIN_VERSION,
            status: Status::SplitBrain,
            newest_epoch: 3,
            full_sync: true,
            boot_id: [0; 16],
        };
        assert_eq!(
            HelloReply::read(&mut reply.encode().as_slice()).expect("reply"),
            reply
        );
        let reply = HelloReply {
            version: VERSION,
            boot_id: [7; 16],
            ..reply
        };
        assert_eq!(
            HelloReply::read(&mut reply.encode().as_slice()).expect("reply"),
            reply
        );
        let a = Ack {
            seq: 1,
            status: Status::StaleEpoch,
            newest_epoch: 4,
        };
        assert_eq!(Ack::read(&mut a.encode().as_slice()).expect("ack"), a);
        for n in 0..buf.len() {
            let mut junk = buf.clone();
            junk[n] ^= 0xff;
            let _ = Frame::read(&mut junk.as_slice());
            let _ = Frame::read(&mut &buf[..n]);
        }
        let mut huge = buf.clone();
        huge[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Frame::read(&mut huge.as_slice()),
            Err(WireError::Bad { .. })
        ));
    }
}
