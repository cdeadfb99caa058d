//! VM taps through `/dev/net/tun` (rtnetlink cannot create them).
//!
//! A [`Tap`] holds the queue's file descriptor: frames written to it arrive
//! on the tap's host side (where the datapath's program runs), frames the
//! host sends out of the tap are read from it. Made persistent, the device
//! outlives the descriptor and QEMU (or libvirt) can open it later.
//!
//! Invariant: all `unsafe` of this crate's tap handling is in this module.

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::time::Duration;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// A tap could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty, too long or not representable.
    #[error("invalid tap name {0:?}")]
    Name(String),
    /// Opening `/dev/net/tun` or an ioctl failed.
    #[error("could not {what} tap {name}")]
    Io {
        /// The step, e.g. `create`.
        what: &'static str,
        /// The tap.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Whether an interface named `name` exists in the calling thread's
/// network namespace (asked by ifindex: `/sys/class/net` shows the
/// namespace sysfs was mounted in, which need not be ours).
pub fn exists(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

/// `struct ifreq` as `TUNSETIFF` reads it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap queue.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates (or attaches to) the tap `name` in the calling thread's
    /// network namespace, without packet information headers.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(TapError::Name(name.to_owned()));
        }
        let io_err = |what| {
            move |source| TapError::Io {
                what,
                name: name.to_owned(),
                source,
            }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(io_err("open /dev/net/tun for"))?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is a
        // properly sized, initialised `#[repr(C)]` twin that lives across
        // the call, and the fd is open.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            return Err(io_err("create")(io::Error::last_os_error()));
        }
        Ok(Tap {
            file,
            name: name.to_owned(),
        })
    }

    /// The tap's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Keeps the device after the descriptor closes (for QEMU to open it),
    /// or lets it go with the descriptor.
    pub fn set_persistent(&self, persistent: bool) -> Result<(), TapError> {
        // SAFETY: TUNSETPERSIST takes an integer argument by value; the fd
        // is an open tun queue.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETPERSIST,
                libc::c_ulong::from(persistent),
            )
        };
        if rc < 0 {
            return Err(TapError::Io {
                what: "set persistence of",
                name: self.name.clone(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// A second handle on the same queue (a duplicated descriptor): one
    /// thread may read while another writes, as a guest's two directions.
    pub fn try_clone(&self) -> Result<Tap, TapError> {
        let file = self.file.try_clone().map_err(|source| TapError::Io {
            what: "duplicate the queue of",
            name: self.name.clone(),
            source,
        })?;
        Ok(Tap {
            file,
            name: self.name.clone(),
        })
    }

    /// Sends one Ethernet frame into the host side (as a guest would).
    pub fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.file.write_all(frame)
    }

    /// Receives one frame the host sent to the guest, waiting at most
    /// `timeout`; `None` on timeout.
    pub fn recv(&mut self, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
        let mut pfd = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `pfd` is one valid pollfd for an open fd, and the count
        // passed is 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        if rc == 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; 65536];
        let n = self.file.read(&mut buf)?;
        buf.truncate(n);
        Ok(Some(buf))
    }
}

/// Two tap queues joined frame by frame, each direction on its own
/// thread: what QEMU does between a guest's NIC and its tap, so a tap in
/// a namespace can stand in for a guest on another node's tap. Relaying
/// stops (within the 100 ms a thread waits for a frame) when the
/// `Relay` is dropped; a frame that cannot be delivered is dropped, as a
/// full tap queue would drop it.
#[derive(Debug)]
pub struct Relay {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    /// Starts relaying between `a` and `b` (each handle is duplicated, so
    /// the caller may close its own).
    pub fn start(a: &Tap, b: &Tap) -> Result<Relay, TapError> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        for (from, to) in [(a, b), (b, a)] {
            let (mut rx, mut tx) = (from.try_clone()?, to.try_clone()?);
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(Some(frame)) = rx.recv(Duration::from_millis(100)) {
                        let _ = tx.send(&frame);
                    }
                }
            });
        }
        Ok(Relay { stop })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
