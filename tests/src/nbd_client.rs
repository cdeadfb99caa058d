//! A minimal NBD client for tests: fixed newstyle, `NBD_OPT_EXPORT_NAME`,
//! simple replies, one request at a time. Tests that must know exactly
//! which writes a server acknowledged use it instead of a full client.

use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};

const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;

/// One connection to one export.
#[derive(Debug)]
pub struct NbdClient {
    stream: TcpStream,
    cookie: u64,
}

fn protocol(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl NbdClient {
    /// Connects to `addr` and opens `export`.
    pub fn connect(addr: SocketAddr, export: &str) -> io::Result<NbdClient> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        let mut hello = [0u8; 18];
        stream.read_exact(&mut hello)?;
        if &hello[..8] != b"NBDMAGIC" {
            return Err(protocol(format!("bad server greeting {:?}", &hello[..8])));
        }
        // Client flags: fixed newstyle and no zeroes.
        stream.write_all(&3u32.to_be_bytes())?;
        let mut option = b"IHAVEOPT".to_vec();
        option.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
        let len =
            u32::try_from(export.len()).map_err(|_| protocol("export name too long".into()))?;
        option.extend_from_slice(&len.to_be_bytes());
        option.extend_from_slice(export.as_bytes());
        stream.write_all(&option)?;
        // Export size and transmission flags.
        let mut info = [0u8; 10];
        stream.read_exact(&mut info)?;
        Ok(NbdClient { stream, cookie: 0 })
    }

    /// Sends one request and reads its simple reply's error code.
    fn request(&mut self, kind: u16, offset: u64, len: u32, data: &[u8]) -> io::Result<u32> {
        self.cookie += 1;
        let mut frame = Vec::with_capacity(28 + data.len());
        frame.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        frame.extend_from_slice(&0u16.to_be_bytes());
        frame.extend_from_slice(&kind.to_be_bytes());
        frame.extend_from_slice(&self.cookie.to_be_bytes());
        frame.extend_from_slice(&offset.to_be_bytes());
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(data);
        self.stream.write_all(&frame)?;
        let mut reply = [0u8; 16];
        self.stream.read_exact(&mut reply)?;
        let field = |range: std::ops::Range<usize>| {
            reply[range]
                .iter()
                .fold(0u64, |acc, b| acc << 8 | u64::from(*b))
        };
        if field(0..4) != u64::from(SIMPLE_REPLY_MAGIC) {
            return Err(protocol(format!("bad reply magic {:#x}", field(0..4))));
        }
        if field(8..16) != self.cookie {
            return Err(protocol(format!(
                "reply for cookie {}, expected {}",
                field(8..16),
                self.cookie
            )));
        }
        Ok(field(4..8) as u32)
    }

    fn check(code: u32) -> io::Result<()> {
        match code {
            0 => Ok(()),
            e => Err(io::Error::other(format!("NBD error {e}"))),
        }
    }

    /// Writes `data` at `offset`; `Ok` means the server acknowledged it.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let len = u32::try_from(data.len()).map_err(|_| protocol("write too large".into()))?;
        Self::check(self.request(CMD_WRITE, offset, len, data)?)
    }

    /// Flushes the export.
    pub fn flush(&mut self) -> io::Result<()> {
        Self::check(self.request(CMD_FLUSH, 0, 0, &[])?)
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = u32::try_from(buf.len()).map_err(|_| protocol("read too large".into()))?;
        Self::check(self.request(CMD_READ, offset, len, &[])?)?;
        self.stream.read_exact(buf)
    }
}

/// Size of one numbered block of [`block`].
pub const BLOCK: usize = 4096;
/// How many distinct blocks [`slot`] spreads writes over (64 MiB).
pub const SLOTS: u64 = 16384;

/// Block number `i`: its number in the first 8 bytes, then a fill byte, so
/// a read-back tells exactly which write landed.
pub fn block(i: u64) -> Vec<u8> {
    let mut b = vec![(i % 251) as u8; BLOCK];
    b[..8].copy_from_slice(&i.to_le_bytes());
    b
}

/// The offset write `i` goes to: its own block, spread over the volume.
pub fn slot(i: u64) -> u64 {
    (i * 7919 % SLOTS) * BLOCK as u64
}

/// A thread writing [`block`]`(i)` to [`slot`]`(i)` for i = 0, 1, …,
/// recording each write the server acknowledged, until it is stopped or a
/// write fails (e.g. the server was killed).
#[derive(Debug)]
pub struct WriteStream {
    acked: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    writer: std::thread::JoinHandle<()>,
}

impl WriteStream {
    /// Connects to `export` at `addr` and starts writing.
    pub fn start(addr: SocketAddr, export: &str) -> WriteStream {
        use std::sync::atomic::Ordering;
        let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (a, s, export) = (acked.clone(), stop.clone(), export.to_owned());
        let writer = std::thread::spawn(move || {
            let mut c = NbdClient::connect(addr, &export).expect("connect");
            for i in 0..SLOTS {
                if s.load(Ordering::SeqCst) || c.write(slot(i), &block(i)).is_err() {
                    return;
                }
                a.lock().expect("lock").push(i);
            }
        });
        WriteStream {
            acked,
            stop,
            writer,
        }
    }

    /// How many writes were acknowledged so far.
    pub fn acked(&self) -> usize {
        self.acked.lock().expect("lock").len()
    }

    /// Stops the writer and returns the acknowledged writes' numbers.
    pub fn finish(self) -> Vec<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.writer.join().expect("writer");
        std::mem::take(&mut *self.acked.lock().expect("lock"))
    }
}
