//! How long connection-tracking entries live: timeouts by protocol and
//! state, and the decision a sweep makes for each entry
//! ([`crate::Loader::expire_conntrack`] applies it to the map).
//!
//! The programs stamp every entry with its flow's latest packet
//! (`last_seen_ns`, the kernel's coarse `CLOCK_MONOTONIC`) and its state
//! (`CT_REPLY` once answered, `CT_CLOSING` after a TCP FIN or RST, and a
//! TCP flow's `CT_TCP_*` state: SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT,
//! CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE); user space removes entries idle for longer than their timeout.
//! The defaults are the Linux kernel's netfilter ones.
//!
//! Invariants: an entry whose flow sent a packet within its timeout is
//! never expired (the sweep takes an entry out and reads it in one step,
//! and puts it back if it turns out alive); every timeout is at least one
//! second.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::abi::{
    CT_CLOSING, CT_REPLY, CT_TCP_CLOSE, CT_TCP_CLOSE_WAIT, CT_TCP_ESTABLISHED, CT_TCP_FIN_WAIT,
    CT_TCP_LAST_ACK, CT_TCP_SYN_RECV, CT_TCP_SYN_SENT, CT_TCP_TIME_WAIT, CtKey, CtValue,
};

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;

/// Idle timeouts of connection-tracking entries, by protocol and state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP, opening: a SYN not yet answered, SYN_SENT (`tcp-opening`).
    pub tcp_opening: Duration,
    /// TCP, SYN+ACK sent, not yet acknowledged: SYN_RECV (`tcp-syn-recv`).
    pub tcp_syn_recv: Duration,
    /// TCP, established (`tcp`).
    pub tcp_established: Duration,
    /// TCP after a first FIN: FIN_WAIT (`tcp-closing`); an entry without a
    /// TCP state, after a FIN or RST.
    pub tcp_closing: Duration,
    /// TCP, the first FIN acknowledged: CLOSE_WAIT (`tcp-close-wait`).
    pub tcp_close_wait: Duration,
    /// TCP, both ends' FINs, the last not acknowledged: LAST_ACK
    /// (`tcp-last-ack`).
    pub tcp_last_ack: Duration,
    /// TCP, closed both ways: TIME_WAIT (`tcp-time-wait`).
    pub tcp_time_wait: Duration,
    /// TCP after a RST: CLOSE (`tcp-close`).
    pub tcp_close: Duration,
    /// UDP, one direction only so far (`udp`).
    pub udp: Duration,
    /// UDP, answered (`udp-stream`).
    pub udp_stream: Duration,
    /// ICMP (`icmp`).
    pub icmp: Duration,
    /// Any other protocol (`other`).
    pub other: Duration,
}

impl Default for Timeouts {
    /// The kernel's: TCP established 5 days, SYN_SENT 120 s, SYN_RECV
    /// 60 s, FIN_WAIT 120 s, CLOSE_WAIT 60 s, LAST_ACK 30 s, TIME_WAIT
    /// 120 s, CLOSE 10 s; UDP 30 s and 120 s once answered, ICMP 30 s,
    /// anything else 600 s.
    fn default() -> Timeouts {
        Timeouts {
            tcp_opening: Duration::from_secs(120),
            tcp_syn_recv: Duration::from_secs(60),
            tcp_established: Duration::from_secs(432_000),
            tcp_closing: Duration::from_secs(120),
            tcp_close_wait: Duration::from_secs(60),
            tcp_last_ack: Duration::from_secs(30),
            tcp_time_wait: Duration::from_secs(120),
            tcp_close: Duration::from_secs(10),
            udp: Duration::from_secs(30),
            udp_stream: Duration::from_secs(120),
            icmp: Duration::from_secs(30),
            other: Duration::from_secs(600),
        }
    }
}

/// A timeouts string (`tcp=432000,udp=30,...`) could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeoutsError {
    /// An item is not `name=seconds`.
    #[error("conntrack timeouts: {item:?} is not NAME=SECONDS")]
    Item {
        /// The item.
        item: String,
    },
    /// An unknown timeout name.
    #[error(
        "conntrack timeouts: unknown name {name:?} (known: tcp, tcp-opening, tcp-syn-recv, tcp-closing, tcp-close-wait, tcp-last-ack, tcp-time-wait, tcp-close, udp, udp-stream, icmp, other)"
    )]
    Name {
        /// The name.
        name: String,
    },
    /// Seconds that are not a whole number of at least 1.
    #[error("conntrack timeouts: {name}={value:?} is not a whole number of seconds >= 1")]
    Seconds {
        /// The timeout's name.
        name: String,
        /// What was given.
        value: String,
    },
}

impl Timeouts {
    /// The names of the timeouts, as the string form uses them.
    const NAMES: [&'static str; 12] = [
        "tcp",
        "tcp-opening",
        "tcp-syn-recv",
        "tcp-closing",
        "tcp-close-wait",
        "tcp-last-ack",
        "tcp-time-wait",
        "tcp-close",
        "udp",
        "udp-stream",
        "icmp",
        "other",
    ];

    fn slot(&mut self, name: &str) -> Option<&mut Duration> {
        Some(match name {
            "tcp" => &mut self.tcp_established,
            "tcp-opening" => &mut self.tcp_opening,
            "tcp-syn-recv" => &mut self.tcp_syn_recv,
            "tcp-closing" => &mut self.tcp_closing,
            "tcp-close-wait" => &mut self.tcp_close_wait,
            "tcp-last-ack" => &mut self.tcp_last_ack,
            "tcp-time-wait" => &mut self.tcp_time_wait,
            "tcp-close" => &mut self.tcp_close,
            "udp" => &mut self.udp,
            "udp-stream" => &mut self.udp_stream,
            "icmp" => &mut self.icmp,
            "other" => &mut self.other,
            _ => return None,
        })
    }

    /// How long the entry `key`/`value` may stay idle.
    pub fn timeout(&self, key: &CtKey, value: &CtValue) -> Duration {
        let answered = value.flags & CT_REPLY != 0;
        if key.proto == TCP {
            match value.tcp_state {
                CT_TCP_SYN_SENT => return self.tcp_opening,
                CT_TCP_SYN_RECV => return self.tcp_syn_recv,
                CT_TCP_ESTABLISHED => return self.tcp_established,
                CT_TCP_FIN_WAIT => return self.tcp_closing,
                CT_TCP_CLOSE_WAIT => return self.tcp_close_wait,
                CT_TCP_LAST_ACK => return self.tcp_last_ack,
                CT_TCP_TIME_WAIT => return self.tcp_time_wait,
                CT_TCP_CLOSE => return self.tcp_close,
                // No state kept: by the flags, as before states were.
                _ => {}
            }
        }
        match key.proto {
            TCP if value.flags & CT_CLOSING != 0 => self.tcp_closing,
            TCP if answered => self.tcp_established,
            TCP => self.tcp_opening,
            UDP if answered => self.udp_stream,
            UDP => self.udp,
            ICMP => self.icmp,
            _ => self.other,
        }
    }

    /// Whether the entry has been idle for longer than its timeout at
    /// `now_ns` (see [`now_ns`]).
    pub fn expired(&self, key: &CtKey, value: &CtValue, now_ns: u64) -> bool {
        let idle = now_ns.saturating_sub(value.last_seen_ns);
        u128::from(idle) > self.timeout(key, value).as_nanos()
    }
}

impl FromStr for Timeouts {
    type Err = TimeoutsError;

    /// Reads `name=seconds` items separated by commas (any subset; the
    /// rest keep their defaults), e.g. `tcp=3600,udp=10`.
    fn from_str(s: &str) -> Result<Timeouts, TimeoutsError> {
        let mut out = Timeouts::default();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let Some((name, value)) = item.split_once('=') else {
                return Err(TimeoutsError::Item { item: item.into() });
            };
            let (name, value) = (name.trim(), value.trim());
            let secs = value
                .parse::<u64>()
                .ok()
                .filter(|s| *s >= 1)
                .ok_or_else(|| TimeoutsError::Seconds {
                    name: name.into(),
                    value: value.into(),
                })?;
            let slot = out
                .slot(name)
                .ok_or_else(|| TimeoutsError::Name { name: name.into() })?;
            *slot = Duration::from_secs(secs);
        }
        Ok(out)
    }
}

impl fmt::Display for Timeouts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut copy = *self;
        for (i, name) in Timeouts::NAMES.iter().enumerate() {
            let secs = copy.slot(name).map_or(0, |d| d.as_secs());
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{name}={secs}")?;
        }
        Ok(())
    }
}

/// Now on the clock the programs stamp entries with (`CLOCK_MONOTONIC`;
/// the programs read its coarse variant, which is never ahead of it).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration;
    // CLOCK_MONOTONIC always exists on Linux (on failure `ts` stays 0).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(proto: u8) -> CtKey {
        CtKey {
            proto,
            ..CtKey::default()
        }
    }

    fn value(flags: u32, last_seen_ns: u64) -> CtValue {
        CtValue {
            last_seen_ns,
            flags,
            ..CtValue::default()
        }
    }

    #[test]
    fn timeouts_follow_protocol_and_state() {
        let t = Timeouts::default();
        assert_eq!(t.timeout(&key(TCP), &value(0, 0)), t.tcp_opening);
        assert_eq!(t.timeout(&key(TCP), &value(CT_REPLY, 0)), t.tcp_established);
        assert_eq!(
            t.timeout(&key(TCP), &value(CT_REPLY | CT_CLOSING, 0)),
            t.tcp_closing
        );
        assert_eq!(t.timeout(&key(TCP), &value(CT_CLOSING, 0)), t.tcp_closing);
        assert_eq!(t.timeout(&key(UDP), &value(0, 0)), t.udp);
        assert_eq!(t.timeout(&key(UDP), &value(CT_REPLY, 0)), t.udp_stream);
        assert_eq!(t.timeout(&key(ICMP), &value(CT_REPLY, 0)), t.icmp);
        assert_eq!(t.timeout(&key(47), &value(0, 0)), t.other);
    }

    #[test]
    fn tcp_states_have_their_own_timeouts() {
        let t = Timeouts::default();
        let state = |tcp_state, flags| CtValue {
            tcp_state,
            flags,
            ..CtValue::default()
        };
        for (s, want, secs) in [
            (CT_TCP_SYN_SENT, t.tcp_opening, 120),
            (CT_TCP_SYN_RECV, t.tcp_syn_recv, 60),
            (CT_TCP_ESTABLISHED, t.tcp_established, 432_000),
            (CT_TCP_FIN_WAIT, t.tcp_closing, 120),
            (CT_TCP_CLOSE_WAIT, t.tcp_close_wait, 60),
            (CT_TCP_LAST_ACK, t.tcp_last_ack, 30),
            (CT_TCP_TIME_WAIT, t.tcp_time_wait, 120),
            (CT_TCP_CLOSE, t.tcp_close, 10),
        ] {
            // The state decides, whatever the flags say.
            assert_eq!(t.timeout(&key(TCP), &state(s, CT_REPLY)), want);
            assert_eq!(want, Duration::from_secs(secs), "the kernel's default");
        }
        // A state is TCP's only.
        assert_eq!(t.timeout(&key(UDP), &state(CT_TCP_CLOSE, 0)), t.udp);
        let custom: Timeouts = "tcp-syn-recv=7,tcp-close=3,tcp-time-wait=2,tcp-last-ack=4"
            .parse()
            .unwrap();
        assert_eq!(custom.tcp_syn_recv, Duration::from_secs(7));
        assert_eq!(custom.tcp_time_wait, Duration::from_secs(2));
        assert_eq!(custom.tcp_last_ack, Duration::from_secs(4));
        assert_eq!(custom.tcp_close, Duration::from_secs(3));
        assert_eq!(custom.to_string().parse::<Timeouts>().unwrap(), custom);
    }

    #[test]
    fn expiry_is_strictly_after_the_timeout() {
        let t: Timeouts = "udp=2".parse().unwrap();
        let v = value(0, 5_000_000_000);
        assert!(!t.expired(&key(UDP), &v, 5_000_000_000));
        assert!(!t.expired(&key(UDP), &v, 7_000_000_000));
        assert!(t.expired(&key(UDP), &v, 7_000_000_001));
        // A stamp from the future (a coarse clock) is not idle.
        assert!(!t.expired(&key(UDP), &v, 1));
    }

    #[test]
    fn string_form_round_trips_and_names_bad_items() {
        let t: Timeouts = " tcp=3600, udp=10 ,icmp=5".parse().unwrap();
        assert_eq!(t.tcp_established, Duration::from_secs(3600));
        assert_eq!(t.udp, Duration::from_secs(10));
        assert_eq!(t.icmp, Duration::from_secs(5));
        assert_eq!(t.tcp_opening, Timeouts::default().tcp_opening);
        assert_eq!(t.to_string().parse::<Timeouts>().unwrap(), t);
        assert_eq!("".parse::<Timeouts>().unwrap(), Timeouts::default());
        assert!(matches!(
            "tcp".parse::<Timeouts>(),
            Err(TimeoutsError::Item { .. })
        ));
        assert!(matches!(
            "sctp=4".parse::<Timeouts>(),
            Err(TimeoutsError::Name { name }) if name == "sctp"
        ));
        assert!(matches!(
            "udp=0".parse::<Timeouts>(),
            Err(TimeoutsError::Seconds { name, .. }) if name == "udp"
        ));
        assert!(matches!(
            "udp=1.5".parse::<Timeouts>(),
            Err(TimeoutsError::Seconds { .. })
        ));
    }
}
