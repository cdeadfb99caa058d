//! A kernel pipe that carries a write's payload from a socket to the pool's
//! file without passing through this process's memory: `splice(2)` moves
//! the socket's pages into the pipe by reference, and from the pipe into
//! the file with the one copy the page cache needs. A buffered write
//! makes two copies on this side (socket to buffer, buffer to page
//! cache); on loopback the client's own copy makes it three against two.
//!
//! The pipe never blocks (it is opened non-blocking): a fill that finds it
//! full stops and says so, and its caller takes the bytes out the
//! ordinary way.

use std::io;
use std::os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};

/// The pipe sizes asked for, largest first: 2 MiB when the process may
/// pass `/proc/sys/fs/pipe-max-size`, else the usual 1 MiB limit.
const SIZES: [usize; 2] = [2 << 20, 1 << 20];

/// One pipe, both ends owned.
#[derive(Debug)]
pub struct Pipe {
    rd: OwnedFd,
    wr: OwnedFd,
    size: usize,
}

/// How [`Pipe::fill_from`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Fill {
    /// Every byte asked for is in the pipe.
    Done,
    /// The pipe is full with this many bytes; the rest is still on the
    /// socket.
    Full(usize),
}

fn cvt(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// The bytes a read or splice out of the pipe took: 0 when interrupted
/// (try again). The pipe never blocks, so an empty one (nothing read, or
/// `EAGAIN`) is `UnexpectedEof`: the bytes the caller counts on were
/// never there.
fn taken(n: isize) -> io::Result<usize> {
    match cvt(n) {
        Ok(0) => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
        Ok(n) => Ok(n),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            Err(io::Error::from(io::ErrorKind::UnexpectedEof))
        }
        Err(e) => Err(e),
    }
}

/// Waits until `fd` has one of `events`; `Ok(false)` when `timeout_ms`
/// passed first.
fn poll(fd: BorrowedFd<'_>, events: libc::c_short, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    loop {
        // SAFETY: `p` is one valid pollfd that outlives the call.
        let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if n >= 0 {
            return Ok(n > 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The most bytes a fill waits for before the socket wakes it
/// (`SO_RCVLOWAT`): a 1 MiB payload arrives in many segments, and waking
/// for each costs both sides a context switch (halved with this, measured
/// on loopback; see docs/decisions.md, 72).
const LOWAT_MAX: usize = 256 << 10;

/// Sets the socket's `SO_RCVLOWAT`; a socket that refuses it wakes for
/// every segment, as before, which is only slower.
fn set_lowat(socket: BorrowedFd<'_>, bytes: usize) {
    let v = bytes.min(i32::MAX as usize) as libc::c_int;
    // SAFETY: SO_RCVLOWAT reads one int, `v`, which outlives the call.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

impl Pipe {
    /// A non-blocking pipe of at least 1 MiB; an error when the kernel
    /// refuses pipes or that size (a caller then buffers instead).
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [0i32; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are new descriptors owned by
        // nobody else.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut last = io::Error::other("no pipe size tried");
        for want in SIZES {
            // SAFETY: F_SETPIPE_SZ takes an int argument and touches no
            // memory of ours.
            let got =
                unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, want as libc::c_int) };
            if got >= 0 {
                return Ok(Pipe {
                    rd,
                    wr,
                    size: got as usize,
                });
            }
            last = io::Error::last_os_error();
        }
        Err(last)
    }

    /// The pipe's size: its slots, a page each. A socket's pages may hold
    /// less than a page, or (larger pages) more, so the bytes a pipe takes
    /// from a socket before it is full vary around this.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The bytes waiting in the pipe.
    pub fn len(&self) -> io::Result<usize> {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int, into `n`.
        if unsafe { libc::ioctl(self.rd.as_raw_fd(), libc::FIONREAD, &mut n) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Whether no byte waits in the pipe.
    pub fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Appends `bytes`, which must fit: `WouldBlock` when they do not
    /// (the pipe then holds part of them).
    pub fn push(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            // SAFETY: `bytes` is valid for reads of its length.
            let n = unsafe { libc::write(self.wr.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
            match cvt(n) {
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Moves the next `len` bytes of `socket` (a blocking stream socket)
    /// into the pipe, waiting for the socket as a read would; stops early
    /// with [`Fill::Full`] when the pipe has no room left. A socket that
    /// ends first is `UnexpectedEof`.
    pub fn fill_from(&self, socket: BorrowedFd<'_>, len: usize) -> io::Result<Fill> {
        let result = self.fill_loop(socket, len);
        // Back to waking for every byte: the next read is a request
        // header, and a client that sends one and waits must be heard.
        set_lowat(socket, 1);
        result
    }

    fn fill_loop(&self, socket: BorrowedFd<'_>, len: usize) -> io::Result<Fill> {
        let mut moved = 0usize;
        let mut lowat = usize::MAX;
        while moved < len {
            // Wake for the rest, or for LOWAT_MAX of it, not for every
            // segment that arrives; never for more than is still to come
            // (the client may send nothing after this payload).
            if len - moved < lowat {
                lowat = (len - moved).min(LOWAT_MAX);
                set_lowat(socket, lowat);
            }
            // SAFETY: null offsets (both ends are streams) and two open
            // descriptors; splice touches no memory of ours.
            let n = unsafe {
                libc::splice(
                    socket.as_raw_fd(),
                    std::ptr::null_mut(),
                    self.wr.as_raw_fd(),
                    std::ptr::null_mut(),
                    len - moved,
                    libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
                )
            };
            match cvt(n) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                Ok(n) => moved += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Either the pipe is full, or (a kernel that applies
                    // the flag to the socket too) the socket has nothing
                    // yet: wait for the socket in that case only.
                    if !poll(self.wr.as_fd(), libc::POLLOUT, 0)? {
                        return Ok(Fill::Full(moved));
                    }
                    poll(socket, libc::POLLIN, -1)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Fill::Done)
    }

    /// Writes the next `len` bytes of the pipe into `file` at `offset`.
    /// The pipe must hold them (a short pipe is `UnexpectedEof`).
    pub fn drain_to(&self, file: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<()> {
        let mut off = libc::loff_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset out of range"))?;
        let mut left = len;
        while left > 0 {
            // SAFETY: `off` is a valid loff_t the call updates; the pipe
            // end has no offset; both descriptors are open.
            let n = unsafe {
                libc::splice(
                    self.rd.as_raw_fd(),
                    std::ptr::null_mut(),
                    file.as_raw_fd(),
                    &mut off,
                    left,
                    libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
                )
            };
            left -= taken(n)?;
        }
        Ok(())
    }

    /// Takes exactly `buf.len()` bytes out of the pipe, which must hold
    /// them (else `UnexpectedEof`).
    pub fn read_exact(&self, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: `rest` is valid for writes of its length.
            let n =
                unsafe { libc::read(self.rd.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len()) };
            done += taken(n)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::os::unix::fs::FileExt as _;
    use std::os::unix::net::UnixStream;

    #[test]
    fn bytes_go_from_a_socket_through_the_pipe_into_a_file_at_an_offset() {
        let pipe = Pipe::new().expect("pipe");
        assert!(pipe.size() >= 1 << 20);
        let (mut tx, rx) = UnixStream::pair().expect("socket pair");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        // The first 1000 bytes were read ahead (a reader's buffer held
        // them); the socket carries the rest.
        let sent = data[1000..].to_vec();
        let writer = std::thread::spawn(move || tx.write_all(&sent).expect("send"));
        pipe.push(&data[..1000]).expect("push");
        assert_eq!(
            pipe.fill_from(rx.as_fd(), data.len() - 1000).expect("fill"),
            Fill::Done
        );
        writer.join().expect("writer");
        assert_eq!(pipe.len().expect("len"), data.len());
        let dir = tempfile::tempdir().expect("tempdir");
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .expect("file");
        pipe.drain_to(file.as_fd(), 4096, 100_000).expect("drain");
        let mut head = vec![0u8; 100_000];
        file.read_exact_at(&mut head, 4096).expect("read back");
        assert_eq!(head, data[..100_000]);
        let mut rest = vec![0u8; data.len() - 100_000];
        pipe.read_exact(&mut rest).expect("read rest");
        assert_eq!(rest, data[100_000..]);
        assert!(pipe.is_empty().expect("len"));
        // Nothing left: asking for more is an error, not a wait.
        let err = pipe.drain_to(file.as_fd(), 0, 1).expect_err("empty pipe");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_full_pipe_stops_the_fill_and_a_closed_socket_is_an_error() {
        let pipe = Pipe::new().expect("pipe");
        let (mut tx, rx) = UnixStream::pair().expect("socket pair");
        // Far more than any pipe slot count can hold, whatever the
        // socket's page sizes.
        let want = 256 << 20;
        let writer = std::thread::spawn(move || {
            let block = vec![7u8; 1 << 20];
            for _ in 0..256 {
                if tx.write_all(&block).is_err() {
                    break;
                }
            }
        });
        match pipe.fill_from(rx.as_fd(), want).expect("fill") {
            Fill::Full(n) => {
                assert!(n > 0 && n < want, "{n}");
                assert_eq!(pipe.len().expect("len"), n);
            }
            Fill::Done => panic!("a pipe of {} bytes took {want}", pipe.size()),
        }
        drop(rx);
        writer.join().expect("writer");

        let pipe = Pipe::new().expect("pipe");
        let (tx, rx) = UnixStream::pair().expect("socket pair");
        drop(tx);
        let err = pipe.fill_from(rx.as_fd(), 10).expect_err("closed socket");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
