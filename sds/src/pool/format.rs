//! The pool's on-disk encodings: the label, the checkpoint slot header and
//! the journal records (see `sds/DESIGN.md` for the layout and the crash
//! argument). Everything is little-endian and every structure carries a
//! CRC-32, so a torn or stale write is detected, never trusted.
//!
//! Decoding never panics on any input: a short or malformed buffer is a
//! [`FormatError`].

/// Bytes reserved for the label at offset 0.
pub const LABEL_SIZE: u64 = 4096;
/// Bytes of a checkpoint slot's header.
pub const SLOT_HEADER_SIZE: usize = 48;

const LABEL_MAGIC: &[u8; 8] = b"BSLTPOOL";
const SLOT_MAGIC: &[u8; 8] = b"BSLTCKPT";
const FORMAT_VERSION: u32 = 1;

/// Bytes of a journal record besides its payload: length, generation,
/// sequence, kind, and the CRC.
const RECORD_OVERHEAD: usize = 4 + 8 + 8 + 1 + 4;
/// The longest record we ever write (a volume name is at most 64 bytes).
pub const MAX_RECORD: usize = 256;

/// A structure on disk is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The buffer ended before the structure did.
    #[error("{what} is truncated")]
    Truncated {
        /// What was being decoded.
        what: &'static str,
    },
    /// A magic number or version does not match.
    #[error("{what}: not a Basalt pool (bad magic or version)")]
    BadMagic {
        /// What was being decoded.
        what: &'static str,
    },
    /// A checksum does not match.
    #[error("{what}: checksum mismatch")]
    BadChecksum {
        /// What was being decoded.
        what: &'static str,
    },
    /// A field holds an impossible value.
    #[error("{what}: invalid {field}")]
    Invalid {
        /// What was being decoded.
        what: &'static str,
        /// The field.
        field: &'static str,
    },
}

/// CRC-32 of `bytes` salted with the pool's uid, so a structure left on
/// the device by an earlier pool never passes for one of this pool's.
pub fn salted_crc(salt: &[u8; 16], bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(salt);
    h.update(bytes);
    h.finalize()
}

/// Appends little-endian fields to a buffer.
#[derive(Debug, Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    /// A string of at most `u16::MAX` bytes, length first.
    pub fn str(&mut self, v: &str) -> &mut Self {
        let bytes = &v.as_bytes()[..v.len().min(usize::from(u16::MAX))];
        self.u16(bytes.len() as u16).bytes(bytes)
    }
}

/// Reads little-endian fields from a buffer, failing on a short one.
#[derive(Debug)]
pub struct Dec<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Dec<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Dec { buf, what }
    }
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if self.buf.len() < n {
            return Err(FormatError::Truncated { what: self.what });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    pub fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.array::<1>()?[0])
    }
    pub fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub fn uid(&mut self) -> Result<[u8; 16], FormatError> {
        self.array()
    }
    pub fn str(&mut self) -> Result<String, FormatError> {
        let n = usize::from(self.u16()?);
        let what = self.what;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| FormatError::Invalid {
            what,
            field: "string",
        })
    }
    pub fn invalid(&self, field: &'static str) -> FormatError {
        FormatError::Invalid {
            what: self.what,
            field,
        }
    }
}

/// The pool's fixed geometry, written once at creation in the label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Label {
    /// Bytes per data chunk (a power of two).
    pub chunk_size: u32,
    /// Bytes per checkpoint slot (two of them).
    pub slot_size: u64,
    /// Bytes of the journal.
    pub journal_size: u64,
    /// Offset of data chunk 0 (chunk-aligned).
    pub data_start: u64,
    /// Sum of volume sizes allowed, in percent of the data area.
    pub overprovision_percent: u32,
    /// The pool's identity.
    pub uid: [u8; 16],
}

impl Label {
    /// Offset of checkpoint slot `i` (0 or 1).
    pub fn slot_offset(&self, i: usize) -> u64 {
        LABEL_SIZE + i as u64 * self.slot_size
    }

    /// Offset of the journal.
    pub fn journal_offset(&self) -> u64 {
        LABEL_SIZE + 2 * self.slot_size
    }

    /// Offset of data chunk `chunk`.
    pub fn chunk_offset(&self, chunk: u64) -> u64 {
        self.data_start + chunk * u64::from(self.chunk_size)
    }

    /// Data chunks in a backing store of `len` bytes.
    pub fn data_chunks(&self, len: u64) -> u64 {
        len.saturating_sub(self.data_start) / u64::from(self.chunk_size)
    }

    /// The label's bytes (padded to [`LABEL_SIZE`] by the caller).
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.bytes(LABEL_MAGIC)
            .u32(FORMAT_VERSION)
            .u32(self.chunk_size)
            .u64(self.slot_size)
            .u64(self.journal_size)
            .u64(self.data_start)
            .u32(self.overprovision_percent)
            .bytes(&self.uid);
        let crc = crc32fast::hash(&e.0);
        e.u32(crc);
        e.0
    }

    /// Parses and checks a label.
    pub fn decode(buf: &[u8]) -> Result<Label, FormatError> {
        const WHAT: &str = "pool label";
        let mut d = Dec::new(buf, WHAT);
        if d.take(8)? != LABEL_MAGIC || d.u32()? != FORMAT_VERSION {
            return Err(FormatError::BadMagic { what: WHAT });
        }
        let label = Label {
            chunk_size: d.u32()?,
            slot_size: d.u64()?,
            journal_size: d.u64()?,
            data_start: d.u64()?,
            overprovision_percent: d.u32()?,
            uid: d.uid()?,
        };
        let body = buf.len() - d.remaining();
        if d.u32()? != crc32fast::hash(&buf[..body]) {
            return Err(FormatError::BadChecksum { what: WHAT });
        }
        let cs = u64::from(label.chunk_size);
        if !label.chunk_size.is_power_of_two() || !(4096..=(4 << 20)).contains(&label.chunk_size) {
            return Err(d.invalid("chunk size"));
        }
        if label.slot_size < 4096
            || label.journal_size < 4096
            || !label.data_start.is_multiple_of(cs)
            || label.data_start < label.journal_offset() + label.journal_size
        {
            return Err(d.invalid("geometry"));
        }
        Ok(label)
    }
}

/// A checkpoint slot's header: which generation its body is, the body's
/// length and CRC, and the boot of the process that writes the journal
/// after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotHeader {
    /// The checkpoint's generation; the journal after it carries the same.
    pub generation: u64,
    /// Body bytes after the header.
    pub body_len: u64,
    /// Salted CRC-32 of the body.
    pub body_crc: u32,
    /// The kernel boot id of the process that wrote this checkpoint and
    /// appends the journal after it.
    pub boot_id: [u8; 16],
}

impl SlotHeader {
    pub fn encode(&self, salt: &[u8; 16]) -> [u8; SLOT_HEADER_SIZE] {
        let mut e = Enc::default();
        e.bytes(SLOT_MAGIC)
            .u64(self.generation)
            .u64(self.body_len)
            .u32(self.body_crc)
            .bytes(&self.boot_id);
        let crc = salted_crc(salt, &e.0);
        e.u32(crc);
        let mut out = [0u8; SLOT_HEADER_SIZE];
        out.copy_from_slice(&e.0);
        out
    }

    /// Parses a header; `None` if the slot holds no valid header of this
    /// pool (never written, torn, or an earlier pool's).
    pub fn decode(buf: &[u8], salt: &[u8; 16]) -> Option<SlotHeader> {
        let mut d = Dec::new(buf, "checkpoint header");
        if d.take(8).ok()? != SLOT_MAGIC {
            return None;
        }
        let h = SlotHeader {
            generation: d.u64().ok()?,
            body_len: d.u64().ok()?,
            body_crc: d.u32().ok()?,
            boot_id: d.uid().ok()?,
        };
        (d.u32().ok()? == salted_crc(salt, &buf[..SLOT_HEADER_SIZE - 4])).then_some(h)
    }
}

/// A volume's descriptive fields, as records and checkpoints carry them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMeta {
    /// The pool-local id (never reused).
    pub id: u32,
    /// The volume's uid.
    pub uid: [u8; 16],
    /// The volume's unique name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// A snapshot: no writes.
    pub read_only: bool,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
}

impl VolumeMeta {
    pub fn encode(&self, e: &mut Enc) {
        e.u32(self.id)
            .bytes(&self.uid)
            .str(&self.name)
            .u64(self.size)
            .u8(u8::from(self.read_only))
            .u64(self.created);
    }

    pub fn decode(d: &mut Dec<'_>) -> Result<VolumeMeta, FormatError> {
        Ok(VolumeMeta {
            id: d.u32()?,
            uid: d.uid()?,
            name: d.str()?,
            size: d.u64()?,
            read_only: match d.u8()? {
                0 => false,
                1 => true,
                _ => return Err(d.invalid("read_only")),
            },
            created: d.u64()?,
        })
    }
}

/// One metadata change, as the journal stores it. Replaying the records
/// after a checkpoint, in order, rebuilds the state the pool had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A new, empty volume.
    CreateVolume(VolumeMeta),
    /// A new volume sharing `source`'s mapping (snapshot or clone).
    Snapshot {
        /// The volume copied.
        source: u32,
        /// The new volume.
        volume: VolumeMeta,
    },
    /// A volume grew to `size` bytes.
    Resize {
        /// The volume.
        volume: u32,
        /// Its new size.
        size: u64,
    },
    /// A volume is gone; its chunks lose a reference.
    Delete {
        /// The volume.
        volume: u32,
    },
    /// Virtual chunk `vchunk` of `volume` now maps to the freshly
    /// allocated data chunk `chunk`.
    Map {
        /// The volume.
        volume: u32,
        /// The virtual chunk.
        vchunk: u64,
        /// The data chunk.
        chunk: u64,
    },
    /// Virtual chunk `vchunk` of `volume` is a hole again.
    Unmap {
        /// The volume.
        volume: u32,
        /// The virtual chunk.
        vchunk: u64,
    },
    /// Every record with a sequence number below `upto`, and the data
    /// they map, was durable (synced) before this record was written.
    Commit {
        /// The first sequence number not covered.
        upto: u64,
    },
}

impl Record {
    fn kind(&self) -> u8 {
        match self {
            Record::CreateVolume(_) => 1,
            Record::Snapshot { .. } => 2,
            Record::Resize { .. } => 3,
            Record::Delete { .. } => 4,
            Record::Map { .. } => 5,
            Record::Unmap { .. } => 6,
            Record::Commit { .. } => 7,
        }
    }

    /// The record framed for the journal at (`generation`, `seq`).
    pub fn encode(&self, generation: u64, seq: u64, salt: &[u8; 16]) -> Vec<u8> {
        let mut e = Enc::default();
        e.u32(0).u64(generation).u64(seq).u8(self.kind());
        match self {
            Record::CreateVolume(v) => v.encode(&mut e),
            Record::Snapshot { source, volume } => {
                e.u32(*source);
                volume.encode(&mut e);
            }
            Record::Resize { volume, size } => {
                e.u32(*volume).u64(*size);
            }
            Record::Delete { volume } => {
                e.u32(*volume);
            }
            Record::Map {
                volume,
                vchunk,
                chunk,
            } => {
                e.u32(*volume).u64(*vchunk).u64(*chunk);
            }
            Record::Unmap { volume, vchunk } => {
                e.u32(*volume).u64(*vchunk);
            }
            Record::Commit { upto } => {
                e.u64(*upto);
            }
        }
        let len = (e.0.len() + 4) as u32;
        e.0[..4].copy_from_slice(&len.to_le_bytes());
        let crc = salted_crc(salt, &e.0);
        e.u32(crc);
        e.0
    }

    /// Decodes the record at the start of `buf` if it is intact and is
    /// exactly (`generation`, `seq`); returns it and its length. `None`
    /// marks the journal's end (never written, stale, or torn).
    pub fn decode(
        buf: &[u8],
        generation: u64,
        seq: u64,
        salt: &[u8; 16],
    ) -> Option<(Record, usize)> {
        let mut d = Dec::new(buf, "journal record");
        let len = d.u32().ok()? as usize;
        if !(RECORD_OVERHEAD..=MAX_RECORD).contains(&len) || len > buf.len() {
            return None;
        }
        let stored = u32::from_le_bytes(buf[len - 4..len].try_into().ok()?);
        if stored != salted_crc(salt, &buf[..len - 4]) {
            return None;
        }
        if d.u64().ok()? != generation || d.u64().ok()? != seq {
            return None;
        }
        let mut d = Dec::new(&buf[RECORD_OVERHEAD - 4..len - 4], "journal record");
        let record = match buf[RECORD_OVERHEAD - 5] {
            1 => Record::CreateVolume(VolumeMeta::decode(&mut d).ok()?),
            2 => Record::Snapshot {
                source: d.u32().ok()?,
                volume: VolumeMeta::decode(&mut d).ok()?,
            },
            3 => Record::Resize {
                volume: d.u32().ok()?,
                size: d.u64().ok()?,
            },
            4 => Record::Delete {
                volume: d.u32().ok()?,
            },
            5 => Record::Map {
                volume: d.u32().ok()?,
                vchunk: d.u64().ok()?,
                chunk: d.u64().ok()?,
            },
            6 => Record::Unmap {
                volume: d.u32().ok()?,
                vchunk: d.u64().ok()?,
            },
            7 => Record::Commit {
                upto: d.u64().ok()?,
            },
            _ => return None,
        };
        (d.remaining() == 0).then_some((record, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol() -> VolumeMeta {
        VolumeMeta {
            id: 7,
            uid: [3; 16],
            name: "vm-disk-0".into(),
            size: 1 << 30,
            read_only: false,
            created: 1_700_000_000,
        }
    }

    #[test]
    fn records_round_trip_and_reject_damage() {
        let records = [
            Record::CreateVolume(vol()),
            Record::Snapshot {
                source: 7,
                volume: vol(),
            },
            Record::Resize {
                volume: 7,
                size: 2 << 30,
            },
            Record::Delete { volume: 7 },
            Record::Map {
                volume: 7,
                vchunk: 99,
                chunk: 12,
            },
            Record::Unmap {
                volume: 7,
                vchunk: 99,
            },
            Record::Commit { upto: 41 },
        ];
        let salt = [1u8; 16];
        for r in records {
            let bytes = r.encode(5, 42, &salt);
            assert!(bytes.len() <= MAX_RECORD);
            assert_eq!(
                Record::decode(&bytes, 5, 42, &salt),
                Some((r.clone(), bytes.len()))
            );
            // Wrong generation, sequence or pool: the journal ends here.
            assert_eq!(Record::decode(&bytes, 4, 42, &salt), None);
            assert_eq!(Record::decode(&bytes, 5, 43, &salt), None);
            assert_eq!(Record::decode(&bytes, 5, 42, &[2; 16]), None);
            // Any flipped byte is caught.
            for i in 0..bytes.len() {
                let mut bad = bytes.clone();
                bad[i] ^= 0x40;
                assert_eq!(
                    Record::decode(&bad, 5, 42, &salt),
                    None,
                    "byte {i} of {r:?}"
                );
            }
            // Truncated.
            assert_eq!(
                Record::decode(&bytes[..bytes.len() - 1], 5, 42, &salt),
                None
            );
        }
    }

    #[test]
    fn label_round_trips_and_rejects_damage() {
        let l = Label {
            chunk_size: 65536,
            slot_size: 1 << 20,
            journal_size: 1 << 20,
            data_start: 4 << 20,
            overprovision_percent: 400,
            uid: [9; 16],
        };
        let bytes = l.encode();
        assert_eq!(Label::decode(&bytes), Ok(l));
        let mut bad = bytes.clone();
        bad[12] ^= 1;
        assert!(Label::decode(&bad).is_err());
        assert!(Label::decode(&bytes[..10]).is_err());
    }

    #[test]
    fn slot_header_round_trips() {
        let h = SlotHeader {
            generation: 3,
            body_len: 100,
            body_crc: 0xdead_beef,
            boot_id: [4; 16],
        };
        let salt = [1u8; 16];
        assert_eq!(SlotHeader::decode(&h.encode(&salt), &salt), Some(h));
        assert_eq!(SlotHeader::decode(&h.encode(&salt), &[2; 16]), None);
        let mut bad = h.encode(&salt);
        bad[9] ^= 1;
        assert_eq!(SlotHeader::decode(&bad, &salt), None);
    }
}
