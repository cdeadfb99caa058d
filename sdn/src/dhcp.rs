//! DHCP for VM taps: each tap's guest gets exactly its leased address, as
//! a /32 behind the on-link gateway, with DNS and an MTU that leaves room
//! for VXLAN.
//!
//! The protocol part ([`Lease::answer`]) is pure: bytes in, bytes out. The
//! server ([`DhcpServer`]) is a thread per tap with a UDP socket bound to
//! port 67 on that tap only (`SO_BINDTODEVICE`); the tap's program passes
//! the guest's DHCP packets up to it.
//!
//! Invariants: a server answers only the MAC its lease names (any other
//! client is ignored) and only offers or acknowledges the leased address
//! (a request for another one gets a NAK); malformed packets are dropped,
//! never answered, never a panic.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::abi::GATEWAY_IP;

const BOOTREQUEST: u8 = 1;
const BOOTREPLY: u8 = 2;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
const FIXED_LEN: usize = 236;

const OPT_PAD: u8 = 0;
const OPT_END: u8 = 255;
const OPT_SUBNET_MASK: u8 = 1;
const OPT_ROUTER: u8 = 3;
const OPT_DNS: u8 = 6;
const OPT_MTU: u8 = 26;
const OPT_REQUESTED_IP: u8 = 50;
const OPT_LEASE_TIME: u8 = 51;
const OPT_MSG_TYPE: u8 = 53;
const OPT_SERVER_ID: u8 = 54;
const OPT_CLASSLESS_ROUTES: u8 = 121;

const DISCOVER: u8 = 1;
const OFFER: u8 = 2;
const REQUEST: u8 = 3;
const ACK: u8 = 5;
const NAK: u8 = 6;

/// The guest MTU: 1500 on the underlay minus VXLAN's 50 bytes.
pub const GUEST_MTU: u16 = 1450;

/// What one tap's guest is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The guest NIC's MAC: the only client answered.
    pub mac: [u8; 6],
    /// The leased address.
    pub ip: Ipv4Addr,
    /// DNS servers.
    pub dns: Vec<Ipv4Addr>,
    /// Interface MTU.
    pub mtu: u16,
    /// Lease time in seconds.
    pub lease_secs: u32,
}

/// A parsed client message (only what the server uses).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Request {
    xid: [u8; 4],
    flags: [u8; 2],
    ciaddr: Ipv4Addr,
    chaddr: [u8; 6],
    msg_type: u8,
    requested: Option<Ipv4Addr>,
}

fn parse(packet: &[u8]) -> Option<Request> {
    if packet.len() < FIXED_LEN + 4 || packet[0] != BOOTREQUEST || packet[1] != 1 || packet[2] != 6
    {
        return None;
    }
    if packet[FIXED_LEN..FIXED_LEN + 4] != MAGIC {
        return None;
    }
    let ip_at = |o: usize| Ipv4Addr::new(packet[o], packet[o + 1], packet[o + 2], packet[o + 3]);
    let mut req = Request {
        xid: packet[4..8].try_into().ok()?,
        flags: packet[10..12].try_into().ok()?,
        ciaddr: ip_at(12),
        chaddr: packet[28..34].try_into().ok()?,
        msg_type: 0,
        requested: None,
    };
    let mut i = FIXED_LEN + 4;
    while i < packet.len() {
        let code = packet[i];
        if code == OPT_END {
            break;
        }
        if code == OPT_PAD {
            i += 1;
            continue;
        }
        let len = *packet.get(i + 1)? as usize;
        let value = packet.get(i + 2..i + 2 + len)?;
        match (code, len) {
            (OPT_MSG_TYPE, 1) => req.msg_type = value[0],
            (OPT_REQUESTED_IP, 4) => {
                req.requested = Some(Ipv4Addr::new(value[0], value[1], value[2], value[3]))
            }
            _ => {}
        }
        i += 2 + len;
    }
    (req.msg_type != 0).then_some(req)
}

impl Lease {
    /// The reply to a client's packet, or `None` if it gets none (not a
    /// DHCP request, another client's MAC, a message type the server does
    /// not answer).
    pub fn answer(&self, packet: &[u8]) -> Option<Vec<u8>> {
        let req = parse(packet)?;
        if req.chaddr != self.mac {
            return None;
        }
        let reply_type = match req.msg_type {
            DISCOVER => OFFER,
            REQUEST => {
                let asked = req.requested.unwrap_or(req.ciaddr);
                if asked == self.ip { ACK } else { NAK }
            }
            _ => return None,
        };
        let mut out = vec![0u8; FIXED_LEN];
        out[0] = BOOTREPLY;
        out[1] = 1;
        out[2] = 6;
        out[4..8].copy_from_slice(&req.xid);
        out[10..12].copy_from_slice(&req.flags);
        if reply_type != NAK {
            out[12..16].copy_from_slice(&req.ciaddr.octets());
            out[16..20].copy_from_slice(&self.ip.octets());
        }
        out[20..24].copy_from_slice(&GATEWAY_IP.octets());
        out[28..34].copy_from_slice(&self.mac);
        out.extend_from_slice(&MAGIC);
        let mut opt = |code: u8, value: &[u8]| {
            out.push(code);
            out.push(value.len() as u8);
            out.extend_from_slice(value);
        };
        opt(OPT_MSG_TYPE, &[reply_type]);
        opt(OPT_SERVER_ID, &GATEWAY_IP.octets());
        if reply_type != NAK {
            opt(OPT_LEASE_TIME, &self.lease_secs.to_be_bytes());
            opt(OPT_SUBNET_MASK, &[255, 255, 255, 255]);
            opt(OPT_ROUTER, &GATEWAY_IP.octets());
            // RFC 3442: the gateway on-link, then the default route via it.
            let gw = GATEWAY_IP.octets();
            let mut routes = vec![32];
            routes.extend_from_slice(&gw);
            routes.extend_from_slice(&[0, 0, 0, 0]);
            routes.push(0);
            routes.extend_from_slice(&gw);
            opt(OPT_CLASSLESS_ROUTES, &routes);
            if !self.dns.is_empty() {
                let dns: Vec<u8> = self.dns.iter().take(8).flat_map(|d| d.octets()).collect();
                opt(OPT_DNS, &dns);
            }
            opt(OPT_MTU, &self.mtu.to_be_bytes());
        }
        out.push(OPT_END);
        // Some clients want at least a BOOTP-sized packet.
        if out.len() < 300 {
            out.resize(300, 0);
        }
        Some(out)
    }
}

/// The DHCP server of one tap could not start.
#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    /// The socket could not be made, bound to the tap, or bound to port 67.
    #[error("could not open the DHCP socket on {tap}")]
    Socket {
        /// The tap.
        tap: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A running DHCP server on one tap; stops when dropped.
#[derive(Debug)]
pub struct DhcpServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DhcpServer {
    /// Starts answering `lease`'s guest on `tap` (a tap in the calling
    /// thread's network namespace).
    pub fn start(tap: &str, lease: Lease) -> Result<DhcpServer, DhcpError> {
        let socket = bound_socket(tap).map_err(|source| DhcpError::Socket {
            tap: tap.to_owned(),
            source,
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let tap = tap.to_owned();
        let thread = std::thread::Builder::new()
            .name(format!("dhcp-{tap}"))
            .spawn(move || serve(&socket, &lease, &flag, &tap))
            .map_err(|source| DhcpError::Socket {
                tap: String::new(),
                source,
            })?;
        Ok(DhcpServer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for DhcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn bound_socket(tap: &str) -> io::Result<UdpSocket> {
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrIn, sockopt};
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    socket::setsockopt(&fd, sockopt::Broadcast, &true)?;
    socket::setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from(tap))?;
    socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 67)),
    )?;
    let socket = UdpSocket::from(fd);
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    Ok(socket)
}

fn serve(socket: &UdpSocket, lease: &Lease, stop: &AtomicBool, tap: &str) {
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        let n = match socket.recv_from(&mut buf) {
            Ok((n, _)) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => {
                tracing::warn!(tap, error = %e, "dhcp receive failed");
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        let Some(reply) = lease.answer(&buf[..n]) else {
            continue;
        };
        // The guest has no address yet: broadcast on the tap.
        let to = SocketAddrV4::new(Ipv4Addr::BROADCAST, 68);
        if let Err(e) = socket.send_to(&reply, to) {
            tracing::warn!(tap, error = %e, "dhcp reply failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 7];

    fn lease() -> Lease {
        Lease {
            mac: MAC,
            ip: Ipv4Addr::new(10, 77, 0, 7),
            dns: vec![Ipv4Addr::new(10, 0, 0, 53)],
            mtu: GUEST_MTU,
            lease_secs: 3600,
        }
    }

    fn request(msg_type: u8, mac: [u8; 6], requested: Option<Ipv4Addr>) -> Vec<u8> {
        let mut p = vec![0u8; FIXED_LEN];
        p[0] = BOOTREQUEST;
        p[1] = 1;
        p[2] = 6;
        p[4..8].copy_from_slice(&[1, 2, 3, 4]);
        p[28..34].copy_from_slice(&mac);
        p.extend_from_slice(&MAGIC);
        p.extend_from_slice(&[OPT_MSG_TYPE, 1, msg_type]);
        if let Some(ip) = requested {
            p.extend_from_slice(&[OPT_REQUESTED_IP, 4]);
            p.extend_from_slice(&ip.octets());
        }
        p.push(OPT_END);
        p
    }

    fn option(reply: &[u8], code: u8) -> Option<Vec<u8>> {
        let mut i = FIXED_LEN + 4;
        while i + 1 < reply.len() && reply[i] != OPT_END {
            let len = reply[i + 1] as usize;
            if reply[i] == code {
                return Some(reply[i + 2..i + 2 + len].to_vec());
            }
            i += 2 + len;
        }
        None
    }

    #[test]
    fn discover_gets_an_offer_of_the_lease() {
        let reply = lease().answer(&request(DISCOVER, MAC, None)).unwrap();
        assert_eq!(reply[0], BOOTREPLY);
        assert_eq!(&reply[4..8], &[1, 2, 3, 4]);
        assert_eq!(&reply[16..20], &[10, 77, 0, 7]);
        assert_eq!(option(&reply, OPT_MSG_TYPE), Some(vec![OFFER]));
        assert_eq!(option(&reply, OPT_SUBNET_MASK), Some(vec![255; 4]));
        assert_eq!(option(&reply, OPT_ROUTER), Some(vec![169, 254, 1, 1]));
        assert_eq!(
            option(&reply, OPT_MTU),
            Some(1450u16.to_be_bytes().to_vec())
        );
        assert_eq!(option(&reply, OPT_DNS), Some(vec![10, 0, 0, 53]));
    }

    #[test]
    fn request_for_the_lease_is_acked_and_others_naked() {
        let ack = lease()
            .answer(&request(REQUEST, MAC, Some(Ipv4Addr::new(10, 77, 0, 7))))
            .unwrap();
        assert_eq!(option(&ack, OPT_MSG_TYPE), Some(vec![ACK]));
        let nak = lease()
            .answer(&request(REQUEST, MAC, Some(Ipv4Addr::new(10, 77, 0, 8))))
            .unwrap();
        assert_eq!(option(&nak, OPT_MSG_TYPE), Some(vec![NAK]));
        assert_eq!(&nak[16..20], &[0; 4]);
    }

    #[test]
    fn other_clients_and_garbage_get_nothing() {
        assert_eq!(
            lease().answer(&request(DISCOVER, [2, 0, 0, 0, 0, 8], None)),
            None
        );
        assert_eq!(lease().answer(&[]), None);
        assert_eq!(lease().answer(&[1; 100]), None);
        let mut truncated = request(DISCOVER, MAC, None);
        truncated.truncate(FIXED_LEN + 6);
        truncated.extend_from_slice(&[OPT_REQUESTED_IP, 200]);
        assert_eq!(lease().answer(&truncated), None);
    }
}
