//! Connection tracking ages (root, CI), on real interfaces with short
//! configured timeouts: a flow's entry appears with its first packets and
//! is removed by a sweep once idle for longer than its protocol's and
//! state's timeout; a flow that keeps sending is never expired, with or
//! without a policy over it; once a selected flow's entry has expired, a
//! policy that refuses new flows refuses it too; a closed TCP flow goes
//! after the short closing timeout. TCP flows go through SYN_SENT,
//! SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT and
//! CLOSE, each aging by its own timeout; a SYN from a closed flow's ports
//! is a new connection that policy judges. And a conntrack map pinned by
//! the datapath before entries aged is carried over on load.

mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use basalt_sdn::abi::{
    CT_CLOSING, CT_REPLY, CT_TCP_CLOSE, CT_TCP_CLOSE_WAIT, CT_TCP_ESTABLISHED, CT_TCP_FIN_WAIT,
    CT_TCP_LAST_ACK, CT_TCP_SYN_RECV, CT_TCP_SYN_SENT, CT_TCP_TIME_WAIT, CtKey, CtValue,
    DropReason, ip_key, tcp_state_name,
};
use basalt_sdn::conntrack::Timeouts;
use basalt_sdn::loader::{self, Loader};
use basalt_sdn::{Action, Peer, Policy, Protocol, Rule};
use basalt_testkit::{Fabric, Prefix};
use common::{NodeDatapath, Vm, echo_on, init_logs, run};

const CLIENT: u32 = 10;
const SERVER: u32 = 20;
/// Short timeouts: established TCP 4 s, closing (every state after a
/// FIN) 1 s, UDP 2 s.
const TIMEOUTS: &str = "tcp=4,tcp-opening=2,tcp-closing=1,tcp-close-wait=1,tcp-last-ack=1,\
                        tcp-time-wait=1,udp=2,udp-stream=2,icmp=2,other=2";

/// The entries of flows between `client` (port `port`, 0 = any) and
/// `server` of protocol `proto`, either direction.
fn entries(
    dp: &mut NodeDatapath,
    proto: u8,
    client: Ipv4Addr,
    port: u16,
    server: Ipv4Addr,
) -> Vec<(CtKey, CtValue)> {
    let (c, s) = (ip_key(client), ip_key(server));
    dp.loader()
        .conntrack_entries()
        .into_iter()
        .filter(|(k, _)| {
            k.proto == proto
                && ((k.saddr == c && k.daddr == s && (port == 0 || k.sport == port))
                    || (k.saddr == s && k.daddr == c && (port == 0 || k.dport == port)))
        })
        .collect()
}

/// The namespaces of a [`pair`], held only to be removed when dropped
/// (the fabric's first).
struct Namespaces {
    _fabric: Fabric,
    _prefix: Prefix,
}

/// A client VM (identity [`CLIENT`], address `cip`) and a server VM
/// ([`SERVER`], `sip`) on one node's datapath, their endpoints, no
/// policy: `(namespaces, client, server, endpoints, datapath, (cip,
/// sip))`. Bound in that order, the datapath goes before the VMs and the
/// namespaces last.
fn pair() -> (
    Namespaces,
    Vm,
    Vm,
    [basalt_sdn::Endpoint; 2],
    NodeDatapath,
    (Ipv4Addr, Ipv4Addr),
) {
    let prefix = Prefix::for_test().unwrap();
    let mut fabric = Fabric::new(&prefix).unwrap();
    let node = fabric.add_node("a").unwrap();
    let (cip, sip) = (Ipv4Addr::new(10, 77, 0, 1), Ipv4Addr::new(10, 77, 0, 2));
    let client = Vm::create(&prefix, &node, 1, cip);
    let server = Vm::create(&prefix, &node, 2, sip);
    let dp = NodeDatapath::start(&node, &[&client, &server], false);
    let eps = [
        client.endpoint(node.addr(), CLIENT),
        server.endpoint(node.addr(), SERVER),
    ];
    (
        Namespaces {
            _fabric: fabric,
            _prefix: prefix,
        },
        client,
        server,
        eps,
        dp,
        (cip, sip),
    )
}

fn ingress(subject: u32, rules: Vec<Rule>) -> Policy {
    Policy {
        name: "server-ingress".into(),
        selector: BTreeSet::from([subject]),
        ingress: Some(rules),
        egress: None,
    }
}

/// Sends on `conn` every 300 ms for `span`, sweeping after each send;
/// after every sweep the flow must still be tracked.
fn keep_sending(
    dp: &mut NodeDatapath,
    timeouts: &Timeouts,
    conn: &mut std::net::TcpStream,
    flow: (Ipv4Addr, u16, Ipv4Addr),
    span: Duration,
) {
    let start = Instant::now();
    while start.elapsed() < span {
        echo_on(conn, 100).expect("the flow keeps flowing");
        dp.loader().expire_conntrack(timeouts).unwrap();
        assert!(
            !entries(dp, 6, flow.0, flow.1, flow.2).is_empty(),
            "a flow that keeps sending was expired after {:?}",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn entries_expire_unless_their_flow_keeps_sending() {
    init_logs();
    let (_namespaces, client, server, eps, mut dp, (cip, sip)) = pair();
    server.start_echo(7000);
    let srv = SocketAddr::from((sip, 7000));
    let timeouts: Timeouts = TIMEOUTS.parse().unwrap();
    dp.apply(&eps, &[]);

    // UDP: an exchange leaves entries; a sweep within the timeout keeps
    // them, one after it removes them.
    assert_eq!(
        client.udp_echo(cip, srv, b"ping").as_deref(),
        Some(&b"ping"[..])
    );
    let udp = entries(&mut dp, 17, cip, 0, sip);
    assert!(!udp.is_empty(), "the exchange is tracked");
    let sweep = dp.loader().expire_conntrack(&timeouts).unwrap();
    assert!(sweep.seen >= udp.len());
    assert_eq!(entries(&mut dp, 17, cip, 0, sip).len(), udp.len());
    std::thread::sleep(Duration::from_millis(2_600));
    let sweep = dp.loader().expire_conntrack(&timeouts).unwrap();
    assert!(sweep.expired >= udp.len(), "{sweep:?}");
    assert!(
        entries(&mut dp, 17, cip, 0, sip).is_empty(),
        "idle UDP expires"
    );

    // TCP with no policy: answered once the SYN-ACK passes, refreshed by
    // every packet, so it outlives its 4 s timeout while it sends; idle,
    // it goes.
    let mut conn = client.tcp_connect(srv).unwrap();
    let port = conn.local_addr().unwrap().port();
    echo_on(&mut conn, 1_000).unwrap();
    let tcp = entries(&mut dp, 6, cip, port, sip);
    assert_eq!(tcp.len(), 1, "one entry per TCP flow: {tcp:?}");
    assert_eq!(tcp[0].1.flags, CT_REPLY, "answered, not closing");
    keep_sending(
        &mut dp,
        &timeouts,
        &mut conn,
        (cip, port, sip),
        Duration::from_secs(7),
    );
    std::thread::sleep(Duration::from_millis(4_600));
    dp.loader().expire_conntrack(&timeouts).unwrap();
    assert!(
        entries(&mut dp, 6, cip, port, sip).is_empty(),
        "an idle TCP flow expires"
    );
    drop(conn);

    // Under a policy: the same, and expiry is what a policy then sees.
    let allow = Rule {
        action: Action::Allow,
        peer: Peer::Identity(CLIENT),
        protocol: Protocol::Tcp,
        ports: (7000, 7000),
    };
    dp.apply(&eps, &[ingress(SERVER, vec![allow])]);
    let mut conn = client.tcp_connect(srv).unwrap();
    let port = conn.local_addr().unwrap().port();
    echo_on(&mut conn, 1_000).unwrap();
    let tracked = entries(&mut dp, 6, cip, port, sip);
    assert!(
        tracked.len() == 1 && tracked[0].1.packets > 0,
        "{tracked:?}"
    );
    // Locked down: the tracked flow goes on as long as it keeps sending...
    dp.apply(&eps, &[ingress(SERVER, vec![])]);
    assert!(!client.reaches(srv), "new flows are refused");
    keep_sending(
        &mut dp,
        &timeouts,
        &mut conn,
        (cip, port, sip),
        Duration::from_secs(6),
    );
    // ...but once idle past its timeout it is a new flow, and refused.
    std::thread::sleep(Duration::from_millis(4_600));
    dp.loader().expire_conntrack(&timeouts).unwrap();
    assert!(entries(&mut dp, 6, cip, port, sip).is_empty());
    let denied = dp.drops(DropReason::Policy);
    assert!(
        echo_on(&mut conn, 100).is_err(),
        "an expired flow is judged anew"
    );
    assert!(dp.drops(DropReason::Policy) > denied);
    drop(conn);

    // A closed flow: closing after the FINs, gone after the closing
    // timeout (1 s), long before the established one (4 s).
    dp.apply(&eps, &[]);
    let mut conn = client.tcp_connect(srv).unwrap();
    let port = conn.local_addr().unwrap().port();
    echo_on(&mut conn, 1_000).unwrap();
    conn.shutdown(std::net::Shutdown::Both).unwrap();
    drop(conn);
    std::thread::sleep(Duration::from_millis(300));
    let closing = entries(&mut dp, 6, cip, port, sip);
    assert!(
        closing.len() == 1 && closing[0].1.flags & CT_CLOSING != 0,
        "{closing:?}"
    );
    std::thread::sleep(Duration::from_millis(1_500));
    dp.loader().expire_conntrack(&timeouts).unwrap();
    assert!(
        entries(&mut dp, 6, cip, port, sip).is_empty(),
        "a closed flow goes after the closing timeout"
    );
}

/// A node whose conntrack map was pinned by the datapath before entries
/// aged (16-byte values): the new loader replaces the map and keeps its
/// flows, as answered flows seen now.
#[test]
fn a_map_of_the_older_layout_is_carried_over() {
    init_logs();
    let prefix = Prefix::for_test().unwrap();
    let node = prefix.name().to_owned();
    let _ = loader::remove_pins(&node);
    // The pin is made here before any loader runs: on a machine where no
    // datapath has mounted bpffs yet, this test mounts it as they would.
    loader::ensure_bpffs().unwrap();
    let dir = loader::pin_dir(&node).join("maps");
    std::fs::create_dir_all(&dir).unwrap();
    let pin = dir.join("conntrack");
    let pin_str = pin.to_str().unwrap();
    run(Command::new("bpftool").args([
        "map",
        "create",
        pin_str,
        "type",
        "lru_hash",
        "key",
        "16",
        "value",
        "16",
        "entries",
        "262144",
        "name",
        "conntrack",
    ]));
    // 10.77.0.2:7000 -> 10.77.0.1:40000, TCP (ports in host order): as
    // the old map kept a flow, in the direction of its first packet, here
    // the higher end's.
    let key = CtKey {
        saddr: ip_key(Ipv4Addr::new(10, 77, 0, 2)),
        daddr: ip_key(Ipv4Addr::new(10, 77, 0, 1)),
        sport: 7000,
        dport: 40000,
        proto: 6,
        pad: [0; 3],
    };
    let mut key_bytes = Vec::new();
    key_bytes.extend_from_slice(&key.saddr.to_ne_bytes());
    key_bytes.extend_from_slice(&key.daddr.to_ne_bytes());
    key_bytes.extend_from_slice(&key.sport.to_ne_bytes());
    key_bytes.extend_from_slice(&key.dport.to_ne_bytes());
    key_bytes.extend_from_slice(&[6, 0, 0, 0]);
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b}")).collect::<Vec<_>>();
    let mut cmd = Command::new("bpftool");
    cmd.args(["map", "update", "pinned", pin_str, "key"])
        .args(hex(&key_bytes))
        .arg("value")
        .args(hex(&[1u8; 16]));
    run(&mut cmd);

    let before = basalt_sdn::conntrack::now_ns();
    let loaded = Loader::load(&node);
    let entries = loaded
        .as_ref()
        .map(Loader::conntrack_entries)
        .map_err(|e| format!("{e:?}"));
    drop(loaded);
    let _ = loader::remove_pins(&node);
    let entries = entries.expect("the datapath loads over an older map");
    assert_eq!(entries.len(), 1, "{entries:?}");
    let (k, v) = entries[0];
    assert_eq!(k, key.canonical(), "kept in the programs' order");
    assert_eq!(k.saddr, ip_key(Ipv4Addr::new(10, 77, 0, 1)));
    assert_eq!((k.sport, k.dport), (40000, 7000));
    assert_eq!(v.flags, CT_REPLY);
    assert!(v.last_seen_ns >= before, "{v:?}");
}

/// The TCP state of the one entry between `client:port` and `server`.
fn tcp_state(dp: &mut NodeDatapath, client: Ipv4Addr, port: u16, server: Ipv4Addr) -> Option<u8> {
    let found = entries(dp, 6, client, port, server);
    assert!(found.len() <= 1, "one entry per flow: {found:?}");
    found.first().map(|(_, v)| v.tcp_state)
}

/// Closes `conn` with a RST (`SO_LINGER` with a zero timeout): the flow
/// is CLOSE, and the client keeps no TIME_WAIT.
fn reset(conn: std::net::TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized linger struct.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&conn),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    drop(conn);
}

/// A TCP connection from `vm`'s source port `port` to `to` (given up
/// after 1.5 s).
fn connect_from(vm: &Vm, port: u16, to: SocketAddr) -> Result<std::net::TcpStream, String> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket, sockopt,
    };
    use std::os::fd::AsRawFd as _;
    let SocketAddr::V4(to) = to else {
        return Err(format!("{to}: not IPv4"));
    };
    vm.run_in(|| {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| format!("socket: {e}"))?;
        setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| format!("SO_REUSEADDR: {e}"))?;
        // Linux bounds a blocking connect by the send timeout.
        setsockopt(
            &fd,
            sockopt::SendTimeout,
            &nix::sys::time::TimeVal::new(1, 500_000),
        )
        .map_err(|e| format!("SO_SNDTIMEO: {e}"))?;
        bind(fd.as_raw_fd(), &SockaddrIn::new(0, 0, 0, 0, port))
            .map_err(|e| format!("bind port {port}: {e}"))?;
        connect(fd.as_raw_fd(), &SockaddrIn::from(to))
            .map_err(|e| format!("connect {to} from port {port}: {e}"))?;
        Ok(std::net::TcpStream::from(fd))
    })
}

/// A SYN from the ports of a closed flow whose entry is still kept (a
/// client that binds its port, or ports that came round) opens a new
/// connection, and policy judges it as one: refused, the entry stays as
/// it was; allowed, the SYN restarts the entry.
#[test]
fn a_new_connection_on_a_closed_flows_ports_is_judged_as_new() {
    init_logs();
    let (_namespaces, client, server, eps, mut dp, (cip, sip)) = pair();
    server.start_echo(7000);
    let srv = SocketAddr::from((sip, 7000));
    dp.apply(&eps, &[]);
    const PORT: u16 = 40_777;

    let mut conn = connect_from(&client, PORT, srv).expect("no policy yet");
    echo_on(&mut conn, 1_000).unwrap();
    reset(conn);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(tcp_state(&mut dp, cip, PORT, sip), Some(CT_TCP_CLOSE));

    // Nothing may open a flow to the server now.
    dp.apply(&eps, &[ingress(SERVER, Vec::new())]);
    let again = connect_from(&client, PORT, srv);
    assert!(
        again.is_err(),
        "a new connection on a closed flow's ports passed a policy that refuses new flows"
    );
    assert_eq!(
        tcp_state(&mut dp, cip, PORT, sip),
        Some(CT_TCP_CLOSE),
        "the refused SYN left the entry as it was"
    );

    // Allowed from the client: the same ports open a flow again.
    let allow = Rule {
        action: Action::Allow,
        peer: Peer::Identity(CLIENT),
        protocol: Protocol::Tcp,
        ports: (7000, 7000),
    };
    dp.apply(&eps, &[ingress(SERVER, vec![allow])]);
    let mut conn = connect_from(&client, PORT, srv).expect("allowed");
    echo_on(&mut conn, 1_000).unwrap();
    assert_eq!(tcp_state(&mut dp, cip, PORT, sip), Some(CT_TCP_ESTABLISHED));
}

/// TCP flows go through the kernel's states, each with its timeout: an
/// unanswered SYN is SYN_SENT (tcp-opening), a SYN+ACK not acknowledged
/// SYN_RECV, a completed handshake ESTABLISHED, a close from both ends
/// TIME_WAIT (tcp-time-wait), a RST CLOSE (tcp-close, the shortest). The
/// steps of a close in between: `a_tcp_close_goes_through_its_states`.
#[test]
fn tcp_flows_go_through_their_states() {
    init_logs();
    let (_namespaces, client, server, eps, mut dp, (cip, sip)) = pair();
    server.start_echo(7000);
    let srv = SocketAddr::from((sip, 7000));
    dp.apply(&eps, &[]);
    let timeouts: Timeouts = "tcp=60,tcp-opening=30,tcp-time-wait=20,tcp-close=1"
        .parse()
        .unwrap();

    // Established by the handshake; TIME_WAIT once both ends closed (the
    // echo server closes on the client's FIN, the client acknowledges).
    let mut conn = client.tcp_connect(srv).unwrap();
    let port = conn.local_addr().unwrap().port();
    echo_on(&mut conn, 1_000).unwrap();
    assert_eq!(tcp_state(&mut dp, cip, port, sip), Some(CT_TCP_ESTABLISHED));
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(tcp_state(&mut dp, cip, port, sip), Some(CT_TCP_TIME_WAIT));
    drop(conn);

    // A RST: CLOSE, and gone after the 1 s close timeout while a TIME_WAIT
    // flow (20 s) stays.
    let mut conn = client.tcp_connect(srv).unwrap();
    let reset_port = conn.local_addr().unwrap().port();
    echo_on(&mut conn, 1_000).unwrap();
    reset(conn);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(tcp_state(&mut dp, cip, reset_port, sip), Some(CT_TCP_CLOSE));
    std::thread::sleep(Duration::from_millis(1_600));
    dp.loader().expire_conntrack(&timeouts).unwrap();
    assert_eq!(
        tcp_state(&mut dp, cip, reset_port, sip),
        None,
        "CLOSE expired"
    );
    assert_eq!(
        tcp_state(&mut dp, cip, port, sip),
        Some(CT_TCP_TIME_WAIT),
        "TIME_WAIT has a longer timeout"
    );

    // A handshake whose last ACK is lost (the client's pure ACKs are
    // dropped on their way out): SYN_RECV.
    client.exec(&["nft", "add", "table", "ip", "lossy"]);
    client.exec(&[
        "nft",
        "add chain ip lossy out { type filter hook output priority 0 ; }",
    ]);
    client.exec(&[
        "nft",
        "add rule ip lossy out tcp dport 7000 tcp flags & (syn | ack | fin | rst | psh) == ack drop",
    ]);
    let half = client.tcp_connect(srv).unwrap();
    let half_port = half.local_addr().unwrap().port();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        tcp_state(&mut dp, cip, half_port, sip),
        Some(CT_TCP_SYN_RECV)
    );
    client.exec(&["nft", "delete", "table", "ip", "lossy"]);
    drop(half);

    // An unanswered SYN: SYN_SENT (the server's link is down).
    server.ip(&["link", "set", "eth0", "down"]);
    let attempt = client.run_in(|| {
        let socket = std::net::TcpStream::connect_timeout(&srv, Duration::from_millis(1_500));
        socket.err()
    });
    assert!(attempt.is_some(), "no answer with the link down");
    let syn = entries(&mut dp, 6, cip, 0, sip)
        .into_iter()
        .filter(|(_, v)| v.tcp_state == CT_TCP_SYN_SENT)
        .count();
    assert_eq!(syn, 1, "the unanswered SYN's flow is SYN_SENT");
    server.ip(&["link", "set", "eth0", "up"]);
}

/// Polls the flow's state until it is `want` (the kernel's retransmission
/// timers drive some steps), for up to 5 s; returns the last seen.
fn wait_state(
    dp: &mut NodeDatapath,
    client: Ipv4Addr,
    port: u16,
    server: Ipv4Addr,
    want: u8,
) -> Option<u8> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let state = tcp_state(dp, client, port, server);
        if state == Some(want) || Instant::now() > deadline {
            return state;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Drops the pure ACKs `vm` sends on `port` (`sport` or `dport`), with an
/// nftables table in its namespace named `name`.
fn drop_pure_acks(vm: &Vm, name: &str, dir: &str, port: u16) {
    vm.exec(&["nft", "add", "table", "ip", name]);
    vm.exec(&[
        "nft",
        &format!("add chain ip {name} out {{ type filter hook output priority 0 ; }}"),
    ]);
    vm.exec(&[
        "nft",
        &format!(
            "add rule ip {name} out tcp {dir} {port} tcp flags & (syn | ack | fin | rst | psh) == ack drop"
        ),
    ]);
}

/// A close, step by step, from real traffic: the client's FIN while the
/// server's acknowledgement is lost is FIN_WAIT; once acknowledged,
/// CLOSE_WAIT (the server has not closed); the server's FIN while the
/// client's acknowledgement is lost, LAST_ACK; acknowledged, TIME_WAIT.
/// Each ages by its own timeout, and goes once idle past it.
#[test]
fn a_tcp_close_goes_through_its_states() {
    init_logs();
    let (_namespaces, client, server, eps, mut dp, (cip, sip)) = pair();
    dp.apply(&eps, &[]);
    const PORT: u16 = 7100;
    // A server that closes only when told: the listener lives in the
    // server's namespace, the test holds the accepted socket.
    let listener = server
        .run_in(|| std::net::TcpListener::bind((sip, PORT)))
        .unwrap();
    let mut conn = client.tcp_connect(SocketAddr::from((sip, PORT))).unwrap();
    let port = conn.local_addr().unwrap().port();
    let (mut accepted, _) = listener.accept().unwrap();
    std::io::Write::write_all(&mut conn, b"hello").unwrap();
    let mut buf = [0u8; 5];
    std::io::Read::read_exact(&mut accepted, &mut buf).unwrap();
    assert_eq!(
        wait_state(&mut dp, cip, port, sip, CT_TCP_ESTABLISHED),
        Some(CT_TCP_ESTABLISHED)
    );
    let name = |s: Option<u8>| s.map_or("none", tcp_state_name);

    // The client's FIN; the server's acknowledgement dropped: FIN_WAIT.
    drop_pure_acks(&server, "lossy", "sport", PORT);
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let state = tcp_state(&mut dp, cip, port, sip);
    assert_eq!(state, Some(CT_TCP_FIN_WAIT), "{}", name(state));
    // Let it through: the client retransmits its FIN, the server
    // acknowledges, and has not closed: CLOSE_WAIT.
    server.exec(&["nft", "delete", "table", "ip", "lossy"]);
    let state = wait_state(&mut dp, cip, port, sip, CT_TCP_CLOSE_WAIT);
    assert_eq!(state, Some(CT_TCP_CLOSE_WAIT), "{}", name(state));
    // Data the other way still flows, and keeps it CLOSE_WAIT.
    std::io::Write::write_all(&mut accepted, b"late").unwrap();
    let mut late = [0u8; 4];
    std::io::Read::read_exact(&mut conn, &mut late).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let state = tcp_state(&mut dp, cip, port, sip);
    assert_eq!(state, Some(CT_TCP_CLOSE_WAIT), "{}", name(state));

    // The server closes; the client's acknowledgement dropped: LAST_ACK.
    drop_pure_acks(&client, "lossy", "dport", PORT);
    drop(accepted);
    std::thread::sleep(Duration::from_millis(300));
    let state = tcp_state(&mut dp, cip, port, sip);
    assert_eq!(state, Some(CT_TCP_LAST_ACK), "{}", name(state));
    // The timeouts of the three: each its own.
    let timeouts: Timeouts = "tcp-closing=30,tcp-close-wait=20,tcp-last-ack=1,tcp-time-wait=10"
        .parse()
        .unwrap();
    let (key, value) = entries(&mut dp, 6, cip, port, sip).remove(0);
    assert_eq!(timeouts.timeout(&key, &value), Duration::from_secs(1));
    for (state, secs) in [
        (CT_TCP_FIN_WAIT, 30),
        (CT_TCP_CLOSE_WAIT, 20),
        (CT_TCP_LAST_ACK, 1),
        (CT_TCP_TIME_WAIT, 10),
    ] {
        let v = CtValue {
            tcp_state: state,
            ..value
        };
        assert_eq!(timeouts.timeout(&key, &v), Duration::from_secs(secs));
    }
    // Acknowledged at last (the server retransmits its FIN): TIME_WAIT,
    // which outlives LAST_ACK's second.
    client.exec(&["nft", "delete", "table", "ip", "lossy"]);
    let state = wait_state(&mut dp, cip, port, sip, CT_TCP_TIME_WAIT);
    assert_eq!(state, Some(CT_TCP_TIME_WAIT), "{}", name(state));
    std::thread::sleep(Duration::from_millis(1_600));
    dp.loader().expire_conntrack(&timeouts).unwrap();
    assert_eq!(
        tcp_state(&mut dp, cip, port, sip),
        Some(CT_TCP_TIME_WAIT),
        "TIME_WAIT (10 s) stays past LAST_ACK's timeout"
    );
    let short: Timeouts = "tcp-time-wait=1".parse().unwrap();
    dp.loader().expire_conntrack(&short).unwrap();
    assert_eq!(
        tcp_state(&mut dp, cip, port, sip),
        None,
        "TIME_WAIT expired"
    );
    drop(conn);
}
