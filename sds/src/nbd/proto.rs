//! The NBD wire format (fixed newstyle negotiation, simple and structured
//! replies), written from the protocol document: constants, request and
//! option parsing, reply encoding. Pure functions over byte slices, so
//! the fuzz target and the property tests drive them directly.
//!
//! Invariant: no parser panics or allocates more than its input on any
//! input; malformed input is a [`ProtoError`].

/// `NBDMAGIC`, the first eight bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the prefix of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of a request in the transmission phase.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// The magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags we understand (fixed newstyle, no zeroes).
pub const CLIENT_FLAGS_KNOWN: u32 = 0b11;
/// Client flag: no zeroes after `NBD_OPT_EXPORT_NAME`.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub mod opt {
    /// Enter transmission, old way (no error possible).
    pub const EXPORT_NAME: u32 = 1;
    /// End negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// TLS (not offered).
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe and enter transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types.
pub mod rep {
    /// Done.
    pub const ACK: u32 = 1;
    /// One export (to `LIST`).
    pub const SERVER: u32 = 2;
    /// One piece of export information.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    /// Option not supported.
    pub const ERR_UNSUP: u32 = ERR | 1;
    /// Option malformed or not allowed now.
    pub const ERR_INVALID: u32 = ERR | 3;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    /// Request too large.
    pub const ERR_TOO_BIG: u32 = ERR | 9;
}

/// Export information types.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// The export's name.
    pub const NAME: u16 = 1;
    /// A description.
    pub const DESCRIPTION: u16 = 2;
    /// Block size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags.
pub mod tflag {
    /// Flags are valid.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// FLUSH supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// FUA supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// TRIM supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// WRITE_ZEROES supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// The DF (don't fragment) read flag is honoured.
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections see one consistent export, and a FLUSH on one
    /// covers writes completed on all.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// CACHE supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// FAST_ZERO supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command flags.
pub mod cflag {
    /// Durable before the reply.
    pub const FUA: u16 = 1 << 0;
    /// WRITE_ZEROES: do not punch holes.
    pub const NO_HOLE: u16 = 1 << 1;
    /// READ: one content chunk.
    pub const DF: u16 = 1 << 2;
    /// BLOCK_STATUS: one descriptor.
    pub const REQ_ONE: u16 = 1 << 3;
    /// WRITE_ZEROES: fail rather than be slow.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Commands.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write.
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Discard.
    pub const TRIM: u16 = 4;
    /// Prefetch.
    pub const CACHE: u16 = 5;
    /// Zero a range.
    pub const WRITE_ZEROES: u16 = 6;
    /// Query allocation.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Error values in replies.
pub mod errno {
    /// Not permitted (read-only).
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// Past the end on a write.
    pub const ENOSPC: u32 = 28;
    /// Too large to send unfragmented.
    pub const EOVERFLOW: u32 = 75;
    /// Cannot zero fast.
    pub const ENOTSUP: u32 = 95;
    /// Shutting down (export gone).
    pub const ESHUTDOWN: u32 = 108;
}

/// Structured reply chunk types.
pub mod reply {
    /// No payload (final chunk).
    pub const NONE: u16 = 0;
    /// Offset and data.
    pub const OFFSET_DATA: u16 = 1;
    /// Block status descriptors.
    pub const BLOCK_STATUS: u16 = 5;
    /// An error with a message.
    pub const ERROR: u16 = (1 << 15) + 1;
    /// Flag: the last chunk of the reply.
    pub const FLAG_DONE: u16 = 1 << 0;
}

/// `base:allocation` descriptor flags.
pub const STATE_HOLE: u32 = 1 << 0;
/// Reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Its context id.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// The largest READ or WRITE payload accepted.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// The largest option payload accepted.
pub const MAX_OPTION: u32 = 64 << 10;
/// Preferred block size advertised.
pub const PREFERRED_BLOCK: u32 = 4096;

/// Bytes of a request header.
pub const REQUEST_LEN: usize = 28;

/// Malformed input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// A magic number is wrong.
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    /// An option's payload does not parse.
    #[error("malformed {0} option")]
    Malformed(&'static str),
}

/// A transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// The client's cookie, echoed in the reply.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length.
    pub length: u32,
}

impl Request {
    /// Parses a 28-byte header.
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Request, ProtoError> {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic(u64::from(magic)));
        }
        let mut u64at = [0u8; 8];
        u64at.copy_from_slice(&b[8..16]);
        let cookie = u64::from_be_bytes(u64at);
        u64at.copy_from_slice(&b[16..24]);
        Ok(Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            cookie,
            offset: u64::from_be_bytes(u64at),
            length: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
        })
    }

    /// The header's bytes (clients and tests use it).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// The flags each command accepts.
pub fn allowed_flags(kind: u16, structured: bool) -> Option<u16> {
    Some(match kind {
        cmd::READ if structured => cflag::FUA | cflag::DF,
        cmd::READ => cflag::FUA,
        cmd::WRITE | cmd::TRIM | cmd::FLUSH | cmd::CACHE | cmd::DISC => cflag::FUA,
        cmd::WRITE_ZEROES => cflag::FUA | cflag::NO_HOLE | cflag::FAST_ZERO,
        cmd::BLOCK_STATUS => cflag::FUA | cflag::REQ_ONE,
        _ => return None,
    })
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Some(h)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        if n > 4096 {
            return None;
        }
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

/// An `NBD_OPT_INFO` or `NBD_OPT_GO` payload: the export name and the
/// information types asked for.
pub fn parse_info_request(data: &[u8]) -> Result<(String, Vec<u16>), ProtoError> {
    let err = ProtoError::Malformed("INFO/GO");
    let mut c = Cursor(data);
    let name = c.string().ok_or(err.clone())?;
    let n = c.u16().ok_or(err.clone())?;
    let mut wanted = Vec::new();
    for _ in 0..n {
        wanted.push(c.u16().ok_or(err.clone())?);
    }
    if !c.0.is_empty() {
        return Err(err);
    }
    Ok((name, wanted))
}

/// An `NBD_OPT_{LIST,SET}_META_CONTEXT` payload: the export name and the
/// queries.
pub fn parse_meta_request(data: &[u8]) -> Result<(String, Vec<String>), ProtoError> {
    let err = ProtoError::Malformed("META_CONTEXT");
    let mut c = Cursor(data);
    let name = c.string().ok_or(err.clone())?;
    let n = c.u32().ok_or(err.clone())?;
    let mut queries = Vec::new();
    for _ in 0..n {
        queries.push(c.string().ok_or(err.clone())?);
    }
    if !c.0.is_empty() {
        return Err(err);
    }
    Ok((name, queries))
}

/// Whether a metadata-context query selects `base:allocation`: the exact
/// name, or (when listing) the `base:` namespace.
pub fn query_matches(query: &str, listing: bool) -> bool {
    query == BASE_ALLOCATION || (listing && query == "base:")
}

/// An option reply.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// A simple reply header (data, if any, follows).
pub fn simple_reply(error: u32, cookie: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out
}

/// Bytes of a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;

/// A structured reply chunk header for a payload of `len` bytes.
pub fn structured_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&len.to_be_bytes());
    out
}

/// A final structured error chunk.
pub fn structured_error(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(1024)];
    let mut out = structured_header(
        reply::FLAG_DONE,
        reply::ERROR,
        cookie,
        (6 + msg.len()) as u32,
    )
    .to_vec();
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips() {
        let r = Request {
            flags: cflag::FUA,
            kind: cmd::WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 4096,
        };
        assert_eq!(Request::parse(&r.encode()), Ok(r));
        let mut bad = r.encode();
        bad[0] = 0;
        assert!(matches!(Request::parse(&bad), Err(ProtoError::BadMagic(_))));
    }

    #[test]
    fn option_payloads_parse_and_reject_garbage() {
        let mut go = Vec::new();
        go.extend_from_slice(&3u32.to_be_bytes());
        go.extend_from_slice(b"vol");
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_info_request(&go),
            Ok(("vol".to_owned(), vec![info::BLOCK_SIZE]))
        );
        assert!(parse_info_request(&go[..go.len() - 1]).is_err());
        let mut long = go.clone();
        long.push(0);
        assert!(parse_info_request(&long).is_err());
        assert!(parse_info_request(&[0xff; 4]).is_err());

        let mut meta = Vec::new();
        meta.extend_from_slice(&0u32.to_be_bytes());
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&15u32.to_be_bytes());
        meta.extend_from_slice(BASE_ALLOCATION.as_bytes());
        assert_eq!(
            parse_meta_request(&meta),
            Ok((String::new(), vec![BASE_ALLOCATION.to_owned()]))
        );
        assert!(parse_meta_request(&meta[..10]).is_err());
        // A huge query count with no data is rejected, not allocated.
        let mut many = Vec::new();
        many.extend_from_slice(&0u32.to_be_bytes());
        many.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_request(&many).is_err());
    }
}
