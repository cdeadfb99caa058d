//! Talking to the test guest's TCP services (see the module doc of
//! [`crate::guest`]), from the calling thread's namespace or from inside a
//! node's.
//!
//! A socket belongs to the network namespace it was created in, so only
//! the connect has to happen inside the node: every call connects there
//! (through [`Node::run_in`]) and does its I/O there too. Every connect,
//! read and write has a timeout; only [`GuestClient::wait_ready`] retries.

use std::io::{self, BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::{DIRTY_PORT, ECHO_PORT, READ_PORT, STREAM_PORT, WRITE_PORT};
use crate::netns::{NetnsError, Node};

/// Longest data record the guest's disk block holds (one line of a
/// 512-byte block, with room to spare).
pub const MAX_RECORD: usize = 400;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const IO_TIMEOUT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(50);
/// A booting guest drops SYNs until its address is up, and a SYN that got
/// no answer is only resent a second later: probing with short-lived
/// connects keeps the measured boot time from rounding up to that.
const PROBE_CONNECT_TIMEOUT: Duration = Duration::from_millis(250);
const PROBE_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A request to the guest failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting, writing or reading failed.
    #[error("{op} {addr}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The guest service.
        addr: SocketAddr,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// The guest never answered in time.
    #[error("guest {addr} did not answer echo within {timeout:?} (last error: {last})")]
    NotReady {
        /// The guest's address.
        addr: Ipv4Addr,
        /// How long it was given.
        timeout: Duration,
        /// The last attempt's error.
        last: String,
    },
    /// The guest answered something unexpected.
    #[error("guest service {addr} answered {answer:?}, expected {expected}")]
    Protocol {
        /// The guest service.
        addr: SocketAddr,
        /// What it sent.
        answer: String,
        /// What was expected.
        expected: &'static str,
    },
    /// The node's namespace could not be entered.
    #[error("could not reach the guest from the node")]
    Netns {
        /// Why.
        #[source]
        source: NetnsError,
    },
    /// The data cannot be stored as a record.
    #[error("disk record must be one line of at most {MAX_RECORD} bytes, got {len} bytes")]
    BadRecord {
        /// The rejected data's length.
        len: usize,
    },
    /// The numbered stream ended, or stalled, before enough numbers came.
    #[error("stream {addr} gave {got} of {wanted} numbers within {timeout:?}")]
    StreamShort {
        /// The guest service.
        addr: SocketAddr,
        /// Numbers received.
        got: usize,
        /// Numbers asked for.
        wanted: usize,
        /// The time allowed.
        timeout: Duration,
    },
}

/// What the guest's disk holds: its boot counter and data record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRecord {
    /// How many times the guest has booted from this disk.
    pub boots: u64,
    /// The last line written with [`GuestClient::write_disk`] (empty if none).
    pub data: String,
}

impl DiskRecord {
    /// Parses the read-back line `boots=N data=TEXT`.
    pub fn parse(line: &str) -> Option<DiskRecord> {
        let line = line.trim_end_matches(['\r', '\n']);
        let rest = line.strip_prefix("boots=")?;
        let (boots, data) = rest.split_once(" data=")?;
        Some(DiskRecord {
            boots: boots.parse().ok()?,
            data: data.to_owned(),
        })
    }
}

/// A client of one guest's services.
#[derive(Debug, Clone, Copy)]
pub struct GuestClient<'n> {
    addr: Ipv4Addr,
    node: Option<&'n Node>,
}

impl GuestClient<'static> {
    /// A client that connects from the calling thread's namespace.
    pub fn new(addr: Ipv4Addr) -> GuestClient<'static> {
        GuestClient { addr, node: None }
    }
}

impl<'n> GuestClient<'n> {
    /// A client that connects from inside `node`'s network namespace (or
    /// the calling thread's, with `None`).
    pub fn in_node(addr: Ipv4Addr, node: Option<&'n Node>) -> GuestClient<'n> {
        GuestClient { addr, node }
    }

    /// The guest's address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// Polls echo until it answers, for up to `timeout`; returns how long
    /// that took. A TCG guest under load takes anything from 1.5 s to well
    /// over 10 s to boot: give it minutes.
    pub fn wait_ready(&self, timeout: Duration) -> Result<Duration, ClientError> {
        let addr = self.addr;
        self.in_netns(move || {
            let start = Instant::now();
            let mut last = String::from("no attempt");
            while start.elapsed() < timeout {
                let attempt = Instant::now();
                match echo_at(addr, "ready?", PROBE_CONNECT_TIMEOUT, PROBE_IO_TIMEOUT) {
                    Ok(answer) if answer == "ready?" => return Ok(start.elapsed()),
                    Ok(answer) => last = format!("echo answered {answer:?}"),
                    Err(e) => last = error_chain(&e),
                }
                // Failures can be instant (no route yet): do not spin.
                if let Some(rest) = POLL.checked_sub(attempt.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
            Err(ClientError::NotReady {
                addr,
                timeout,
                last,
            })
        })
    }

    /// Sends `msg` (one line) to the echo service and returns the answer;
    /// any answer but `msg` itself is a [`ClientError::Protocol`].
    pub fn echo(&self, msg: &str) -> Result<String, ClientError> {
        self.in_netns(|| echo_at(self.addr, msg, CONNECT_TIMEOUT, IO_TIMEOUT))
    }

    /// Reads the boot counter and data record from the guest's disk.
    pub fn read_disk(&self) -> Result<DiskRecord, ClientError> {
        let addr = self.addr;
        self.in_netns(move || {
            let service = SocketAddr::from((addr, READ_PORT));
            let answer = request(service, b"")?;
            match DiskRecord::parse(&answer) {
                Some(record) => Ok(record),
                None => Err(ClientError::Protocol {
                    addr: service,
                    answer,
                    expected: "boots=N data=TEXT",
                }),
            }
        })
    }

    /// Stores `data` (one line, at most [`MAX_RECORD`] bytes) as the
    /// disk's data record; returns once the guest has synced it.
    pub fn write_disk(&self, data: &str) -> Result<(), ClientError> {
        if data.len() > MAX_RECORD || data.contains(['\n', '\r', '\0']) {
            return Err(ClientError::BadRecord { len: data.len() });
        }
        let (addr, line) = (self.addr, format!("{data}\n"));
        self.in_netns(|| {
            let service = SocketAddr::from((addr, WRITE_PORT));
            let answer = request(service, line.as_bytes())?;
            if answer.trim_end() == "ok" {
                Ok(())
            } else {
                Err(ClientError::Protocol {
                    addr: service,
                    answer,
                    expected: "ok",
                })
            }
        })
    }

    /// Reads `count` numbers from the numbered stream, within `timeout`.
    pub fn stream(&self, count: usize, timeout: Duration) -> Result<Vec<u64>, ClientError> {
        let mut stream = self.open_stream()?;
        let deadline = Instant::now() + timeout;
        let mut numbers = Vec::with_capacity(count);
        while numbers.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match stream.next_number(left)? {
                Some(n) if !left.is_zero() => numbers.push(n),
                _ => {
                    return Err(ClientError::StreamShort {
                        addr: stream.addr,
                        got: numbers.len(),
                        wanted: count,
                        timeout,
                    });
                }
            }
        }
        Ok(numbers)
    }

    /// Opens the numbered stream; the connection can be read from any
    /// thread (and kept open across, say, a migration).
    pub fn open_stream(&self) -> Result<NumberStream, ClientError> {
        self.open_numbers(STREAM_PORT)
    }

    /// Starts the guest's memory dirtier: it rewrites 8 MiB of its RAM in
    /// a loop for as long as the returned connection stays open, and
    /// numbers its rounds on it (read them to see it work; drop it to stop).
    pub fn dirty_memory(&self) -> Result<NumberStream, ClientError> {
        self.open_numbers(DIRTY_PORT)
    }

    fn open_numbers(&self, port: u16) -> Result<NumberStream, ClientError> {
        let addr = self.addr;
        self.in_netns(move || {
            let service = SocketAddr::from((addr, port));
            let socket = connect(service, CONNECT_TIMEOUT)?;
            Ok(NumberStream {
                addr: service,
                reader: BufReader::new(socket),
            })
        })
    }

    fn in_netns<T: Send>(
        &self,
        f: impl FnOnce() -> Result<T, ClientError> + Send,
    ) -> Result<T, ClientError> {
        match self.node {
            Some(node) => node
                .run_in(f)
                .map_err(|source| ClientError::Netns { source })?,
            None => f(),
        }
    }
}

/// An open connection to the guest's numbered stream (or to its memory
/// dirtier, which numbers its rounds).
#[derive(Debug)]
pub struct NumberStream {
    addr: SocketAddr,
    reader: BufReader<TcpStream>,
}

impl NumberStream {
    /// The next number, waiting up to `timeout`; `None` if the guest
    /// closed the stream or nothing came in time.
    pub fn next_number(&mut self, timeout: Duration) -> Result<Option<u64>, ClientError> {
        let io = |op, source| ClientError::Io {
            op,
            addr: self.addr,
            source,
        };
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .map_err(|e| io("setting a timeout on", e))?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Ok(None),
            Ok(_) => match line.trim().parse() {
                Ok(n) => Ok(Some(n)),
                Err(_) => Err(ClientError::Protocol {
                    addr: self.addr,
                    answer: line,
                    expected: "a number per line",
                }),
            },
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(io("reading", e)),
        }
    }
}

/// The first place where `numbers` does not go up by exactly one:
/// `Err((index, previous, found))`.
pub fn check_consecutive(numbers: &[u64]) -> Result<(), (usize, u64, u64)> {
    for (i, pair) in numbers.windows(2).enumerate() {
        if pair[1] != pair[0].wrapping_add(1) {
            return Err((i + 1, pair[0], pair[1]));
        }
    }
    Ok(())
}

fn connect(service: SocketAddr, timeout: Duration) -> Result<TcpStream, ClientError> {
    let socket =
        TcpStream::connect_timeout(&service, timeout).map_err(|source| ClientError::Io {
            op: "connecting to",
            addr: service,
            source,
        })?;
    let set = |socket: &TcpStream| {
        socket.set_read_timeout(Some(IO_TIMEOUT))?;
        socket.set_write_timeout(Some(IO_TIMEOUT))
    };
    set(&socket).map_err(|source| ClientError::Io {
        op: "setting timeouts on",
        addr: service,
        source,
    })?;
    Ok(socket)
}

/// Connects, sends `input`, half-closes, and reads the answer to EOF.
fn request(service: SocketAddr, input: &[u8]) -> Result<String, ClientError> {
    request_with(service, input, CONNECT_TIMEOUT, IO_TIMEOUT)
}

fn request_with(
    service: SocketAddr,
    input: &[u8],
    connect_timeout: Duration,
    io_timeout: Duration,
) -> Result<String, ClientError> {
    let io = |op| {
        move |source| ClientError::Io {
            op,
            addr: service,
            source,
        }
    };
    let mut socket = connect(service, connect_timeout)?;
    socket
        .set_read_timeout(Some(io_timeout))
        .map_err(io("setting timeouts on"))?;
    socket.write_all(input).map_err(io("writing to"))?;
    socket
        .shutdown(Shutdown::Write)
        .map_err(io("half-closing"))?;
    let mut answer = String::new();
    socket
        .read_to_string(&mut answer)
        .map_err(io("reading from"))?;
    Ok(answer)
}

fn echo_at(
    addr: Ipv4Addr,
    msg: &str,
    connect_timeout: Duration,
    io_timeout: Duration,
) -> Result<String, ClientError> {
    let service = SocketAddr::from((addr, ECHO_PORT));
    let answer = request_with(
        service,
        format!("{msg}\n").as_bytes(),
        connect_timeout,
        io_timeout,
    )?;
    let answer = answer.trim_end_matches(['\r', '\n']);
    // Anything but our own line back is not the guest: outside a
    // namespace, the host's uplink may accept connections to any address.
    if answer != msg {
        return Err(ClientError::Protocol {
            addr: service,
            answer: answer.to_owned(),
            expected: "the line sent",
        });
    }
    Ok(answer.to_owned())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_records_parse() {
        assert_eq!(
            DiskRecord::parse("boots=2 data=hello world\n"),
            Some(DiskRecord {
                boots: 2,
                data: "hello world".to_owned()
            })
        );
        assert_eq!(
            DiskRecord::parse("boots=0 data="),
            Some(DiskRecord {
                boots: 0,
                data: String::new()
            })
        );
        assert_eq!(DiskRecord::parse("boots=x data=y"), None);
        assert_eq!(DiskRecord::parse(""), None);
    }

    #[test]
    fn consecutive_numbers() {
        assert_eq!(check_consecutive(&[]), Ok(()));
        assert_eq!(check_consecutive(&[4, 5, 6]), Ok(()));
        assert_eq!(check_consecutive(&[4, 5, 7, 8]), Err((2, 5, 7)));
        assert_eq!(check_consecutive(&[4, 4]), Err((1, 4, 4)));
    }

    #[test]
    fn records_must_be_one_short_line() {
        let client = GuestClient::new(Ipv4Addr::LOCALHOST);
        assert!(matches!(
            client.write_disk("a\nb"),
            Err(ClientError::BadRecord { .. })
        ));
        let long = "x".repeat(MAX_RECORD + 1);
        assert!(matches!(
            client.write_disk(&long),
            Err(ClientError::BadRecord { .. })
        ));
    }
}
