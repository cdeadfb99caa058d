//! `endpoint-move`: an endpoint moves between two nodes while a peer on a
//! third holds one TCP connection to it, ping-ponging a byte every
//! millisecond.
//!
//! Each move does what a live migration does to the network: the source
//! detaches its tap, the guest's NIC reappears on the target (the veth's
//! host end moves namespace), whose tap waits in standby; the guest
//! announces itself (a frame from its MAC, as QEMU's announce at resume); the
//! target's datapath reports the activation on its ring buffer; the
//! endpoint moves and all three nodes apply it.
//!
//! Measured: activation (the event read from the ring buffer) to every
//! node's maps forwarding to the new owner — the datapath's share; the
//! control plane's compare-and-swap and watch fan-out are not in this
//! figure — and the peer's longest gap between two answers per move.
//! Goals (issue 5): the first < 50 ms p99, the second < 300 ms p50.
//! `BASALT_ENDPOINT_MOVE_ROUTING=native` runs the nodes with native
//! routing instead of the overlay.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use basalt_sdn::Routing;
use basalt_sdn::abi::EVENT_ACTIVATION;
use basalt_testkit::{Fabric, Node, Prefix};

use super::Options;
use super::datapath::{NodeDp, Vm, in_netns};
use crate::report::{Better, Goal, Report};
use crate::stats::Samples;

const DEFAULT_RUNS: usize = 10;
const CASE: &str = "move between two nodes, peer on a third";

/// The nodes' routing mode (`BASALT_ENDPOINT_MOVE_ROUTING`, overlay by
/// default) and the system's name in the report.
fn routing() -> anyhow::Result<(Routing, &'static str)> {
    let routing = match std::env::var("BASALT_ENDPOINT_MOVE_ROUTING") {
        Ok(mode) => mode
            .parse()
            .with_context(|| format!("BASALT_ENDPOINT_MOVE_ROUTING={mode}"))?,
        Err(_) => Routing::Overlay,
    };
    Ok(match routing {
        Routing::Overlay => (routing, "basalt (eBPF + VXLAN)"),
        Routing::Native => (routing, "basalt (eBPF, native routing)"),
    })
}

pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let runs = opts.runs.unwrap_or(DEFAULT_RUNS);
    ensure!(runs > 0, "--runs must be at least 1");
    ensure!(
        nix::unistd::geteuid().is_root(),
        "endpoint-move needs root (namespaces, bpf)"
    );
    let (routing, system) = routing()?;
    let prefix = Prefix::for_test()?;
    let mut fabric = Fabric::new(&prefix)?;
    let nodes = [
        fabric.add_node("a")?,
        fabric.add_node("b")?,
        fabric.add_node("c")?,
    ];
    let mover = Vm::create(
        &prefix,
        &nodes[0],
        "mv",
        Ipv4Addr::new(10, 77, 2, 1),
        [2, 0, 0, 0x77, 2, 1],
    )?;
    let peer = Vm::create(
        &prefix,
        &nodes[2],
        "pe",
        Ipv4Addr::new(10, 77, 3, 1),
        [2, 0, 0, 0x77, 3, 1],
    )?;
    let mut dps = [
        NodeDp::start_routed(&nodes[0], &[&mover], routing)?,
        NodeDp::start_routed(&nodes[1], &[], routing)?,
        NodeDp::start_routed(&nodes[2], &[&peer], routing)?,
    ];
    for (i, dp) in dps.iter().enumerate() {
        let others: Vec<&Node> = (0..nodes.len())
            .filter(|j| *j != i)
            .map(|j| &nodes[j])
            .collect();
        dp.keep_resolved(&others)?;
    }
    let eps = |owner: usize| {
        [
            peer.endpoint(&nodes[2], 3),
            mover.endpoint(&nodes[owner], 2),
        ]
    };
    for dp in &mut dps {
        dp.apply(&eps(0), &[])?;
    }

    // The mover echoes; the peer ping-pongs and timestamps every answer.
    let addr = SocketAddr::from((mover.ip, 7000));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mover_path = mover.path();
    std::thread::spawn(move || {
        let _ = in_netns(&mover_path, || -> anyhow::Result<()> {
            let listener = TcpListener::bind(addr)?;
            ready_tx.send(()).ok();
            let (mut conn, _) = listener.accept()?;
            conn.set_nodelay(true)?;
            let mut b = [0u8; 1];
            while conn.read_exact(&mut b).is_ok() {
                conn.write_all(&b)?;
            }
            Ok(())
        });
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("echo server start")?;
    let answers: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut conn = in_netns(&peer.path(), || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(5))
    })??;
    conn.set_nodelay(true)?;
    let client = {
        let (answers, stop) = (answers.clone(), stop.clone());
        std::thread::spawn(move || -> anyhow::Result<()> {
            let mut b = [1u8; 1];
            while !stop.load(Ordering::Relaxed) {
                conn.write_all(&b)?;
                conn.read_exact(&mut b)?;
                answers.lock().expect("answers lock").push(Instant::now());
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        })
    };
    std::thread::sleep(Duration::from_millis(500));

    // The guest's announce at resume: any frame from its MAC, sent at once
    // by a thread already inside the guest (as QEMU sends it at resume).
    let (announce, announce_rx) = std::sync::mpsc::channel::<()>();
    let mover_path = mover.path();
    std::thread::spawn(move || {
        let _ = in_netns(&mover_path, move || -> anyhow::Result<()> {
            let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            while announce_rx.recv().is_ok() {
                socket.send_to(b"announce", (Ipv4Addr::new(169, 254, 1, 1), 9))?;
            }
            Ok(())
        });
    });

    let mut to_all = Samples::new();
    let mut switchover = Samples::new();
    let mut gaps = Samples::new();
    let mut owner = 0;
    for _ in 0..runs {
        let target = 1 - owner;
        let started = Instant::now();
        let target_ns = dps[target].node.netns().to_owned();
        dps[owner].dp.store_mut().detach(&mover.tap)?;
        dps[owner]
            .node
            .ip(&["link", "set", &mover.tap, "netns", &target_ns])?;
        dps[target].attach_tap(&mover)?;
        dps[target].apply_standby(&eps(owner), &[], &[(mover.tap.clone(), mover.ip)])?;
        dps[target].dp.store_mut().drain_events();
        announce.send(()).context("announcer")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let activated = loop {
            let events = dps[target].dp.store_mut().drain_events();
            if events.iter().any(|e| e.kind == EVENT_ACTIVATION) {
                break Instant::now();
            }
            ensure!(Instant::now() < deadline, "no activation event within 10 s");
            std::thread::sleep(Duration::from_micros(200));
        };
        for dp in &mut dps {
            dp.apply(&eps(target), &[])?;
        }
        to_all.record(activated.elapsed());
        switchover.record(activated - started);
        owner = target;

        // Let the connection recover, then find the longest silence.
        std::thread::sleep(Duration::from_millis(1500));
        let times = answers.lock().expect("answers lock").clone();
        let window: Vec<Instant> = times
            .into_iter()
            .filter(|t| *t + Duration::from_millis(100) >= started)
            .collect();
        ensure!(
            window.len() > 2,
            "the connection did not recover after a move"
        );
        let longest = window
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        gaps.record(longest);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = client.join();

    let mut report = Report::new("endpoint-move");
    report.row(
        CASE,
        system,
        "detach to activation p50 (simulated switchover)",
        "ms",
        switchover.quantile_ms(0.5),
    );
    report.row(
        CASE,
        system,
        "activation to all nodes forwarding p50",
        "ms",
        to_all.quantile_ms(0.5),
    );
    report.row(
        CASE,
        system,
        "activation to all nodes forwarding p99",
        "ms",
        to_all.quantile_ms(0.99),
    );
    report.row(
        CASE,
        system,
        "peer's longest gap p50",
        "ms",
        gaps.quantile_ms(0.5),
    );
    report.row(
        CASE,
        system,
        "peer's longest gap max",
        "ms",
        gaps.quantile_ms(1.0),
    );
    report.goal(Goal::new(
        "activation to all nodes forwarding p99 (ms)",
        50.0,
        to_all.quantile_ms(0.99),
        Better::Lower,
    ));
    report.goal(Goal::new(
        "peer's longest gap p50 (ms)",
        300.0,
        gaps.quantile_ms(0.5),
        Better::Lower,
    ));
    Ok(report)
}
