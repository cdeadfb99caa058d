//! Fixtures for the datapath tests: "VMs" are network namespaces whose
//! `eth0` is one end of a veth; the other end, in a node's namespace,
//! plays the VM's tap. Everything is named after the test's prefix, so a
//! killed test's leftovers are swept; the node's bpffs pins are removed by
//! [`NodeDatapath`]'s drop.

#![allow(dead_code, unreachable_pub)]

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use basalt_sdn::abi::DropReason;
use basalt_sdn::loader::{self, Loader};
use basalt_sdn::sync::ApplyReport;
use basalt_sdn::{Datapath, Endpoint, Hook, Netlink, Network, NodeConfig, Policy, Routing};
use basalt_testkit::{Node, Prefix};
use nix::sched::CloneFlags;

/// The VM network every test uses.
pub fn network() -> Network {
    Network {
        name: "blue".into(),
        vni: 4242,
        cidr: "10.77.0.0/16".parse().unwrap(),
        routing: None,
    }
}

/// Runs `cmd`, panicking with its stderr if it fails; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip ARGS...`.
pub fn ip(args: &[&str]) -> String {
    run(Command::new("ip").args(args))
}

/// Runs `f` on a thread inside the namespace at `path`.
pub fn in_netns<T: Send>(path: &PathBuf, f: impl FnOnce() -> T + Send) -> T {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Spawns a detached thread inside the namespace at `path`.
pub fn spawn_in(path: &PathBuf, f: impl FnOnce() + Send + 'static) {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    std::thread::spawn(move || {
        nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
        f();
    });
}

/// A "VM": a namespace with `eth0` (a /32, default route via the gateway),
/// whose veth peer `tap` lives in the node's namespace.
#[derive(Debug, Clone)]
pub struct Vm {
    pub netns: String,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    pub tap: String,
}

pub fn mac_str(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Vm {
    /// Creates VM number `n` with address `addr` (a /32 and a default
    /// route via the gateway), its tap in `node`.
    pub fn create(prefix: &Prefix, node: &Node, n: u8, addr: Ipv4Addr) -> Vm {
        let vm = Vm::create_bare(prefix, node, n, addr);
        vm.ip(&["link", "set", "eth0", "mtu", "1450"]);
        vm.ip(&["addr", "add", &format!("{addr}/32"), "dev", "eth0"]);
        vm.ip(&[
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
            "onlink",
        ]);
        vm
    }

    /// Creates VM number `n` whose `eth0` is up with no address (for DHCP);
    /// `addr` is the address it should lease.
    pub fn create_bare(prefix: &Prefix, node: &Node, n: u8, addr: Ipv4Addr) -> Vm {
        let vm = Vm {
            netns: format!("{}-vm{n}", prefix.name()),
            ip: addr,
            mac: [0x02, 0x00, 0x0a, 0x4d, n, n],
            tap: format!("vmtap{n}"),
        };
        let ns = vm.netns.as_str();
        ip(&["netns", "add", ns]);
        vm.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        vm.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
        node.ip(&[
            "link", "add", &vm.tap, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])
        .expect("veth");
        vm.ip(&["link", "set", "lo", "up"]);
        vm.ip(&["link", "set", "eth0", "address", &mac_str(vm.mac), "up"]);
        vm
    }

    /// The endpoint this VM is, owned by `node_addr`.
    pub fn endpoint(&self, node_addr: Ipv4Addr, identity: u32) -> Endpoint {
        Endpoint {
            ip: self.ip,
            mac: self.mac,
            network: network().name,
            node_addr,
            identity,
            tap: self.tap.clone(),
        }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }

    /// `ip -n NETNS ARGS...`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.netns.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A command run inside the VM (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns, program]);
        cmd
    }

    pub fn exec(&self, args: &[&str]) -> String {
        run(self.command(args[0]).args(&args[1..]))
    }

    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.path(), f)
    }

    /// Starts TCP and UDP echo servers on `port` in the VM.
    pub fn start_echo(&self, port: u16) {
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let (tx, rx) = std::sync::mpsc::channel();
        let tx2 = tx.clone();
        spawn_in(&self.path(), move || {
            let listener = TcpListener::bind(addr).expect("bind tcp echo");
            tx.send(()).unwrap();
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    loop {
                        match conn.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if conn.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        spawn_in(&self.path(), move || {
            let socket = UdpSocket::bind(addr).expect("bind udp echo");
            tx2.send(()).unwrap();
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..n], from);
            }
        });
        rx.recv().unwrap();
        rx.recv().unwrap();
    }

    /// Connects to `to` from inside the VM and checks `len` bytes echo.
    pub fn tcp_echo(&self, to: SocketAddr, len: usize) -> Result<(), String> {
        self.run_in(|| {
            let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(3))
                .map_err(|e| format!("connect {to}: {e}"))?;
            echo_on(&mut conn, len)
        })
    }

    /// Whether a new TCP connection to `to` echoes within a short time:
    /// what a policy test asks ("allowed?").
    pub fn reaches(&self, to: SocketAddr) -> bool {
        self.run_in(|| {
            let Ok(mut conn) = TcpStream::connect_timeout(&to, Duration::from_millis(1500)) else {
                return false;
            };
            echo_on(&mut conn, 100).is_ok()
        })
    }

    /// Opens a TCP connection from inside the VM (the socket keeps the VM's
    /// namespace for its life).
    pub fn tcp_connect(&self, to: SocketAddr) -> Result<TcpStream, String> {
        self.run_in(|| {
            TcpStream::connect_timeout(&to, Duration::from_secs(3))
                .map_err(|e| format!("connect {to}: {e}"))
        })
    }

    /// Sends one datagram from `from` (an address of the VM, possibly
    /// spoofed) to `to`; returns the echo if one came back in time.
    pub fn udp_echo(&self, from: Ipv4Addr, to: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
        self.run_in(|| {
            let socket = UdpSocket::bind((from, 0)).expect("bind udp client");
            socket
                .set_read_timeout(Some(Duration::from_millis(700)))
                .unwrap();
            for _ in 0..3 {
                socket.send_to(payload, to).ok()?;
                let mut buf = [0u8; 2048];
                if let Ok((n, _)) = socket.recv_from(&mut buf) {
                    return Some(buf[..n].to_vec());
                }
            }
            None
        })
    }
}

/// Writes `len` patterned bytes and reads them back.
pub fn echo_on(conn: &mut TcpStream, len: usize) -> Result<(), String> {
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let mut writer = conn.try_clone().map_err(|e| e.to_string())?;
    let to_send = data.clone();
    let sender = std::thread::spawn(move || writer.write_all(&to_send));
    let mut back = vec![0u8; len];
    conn.read_exact(&mut back)
        .map_err(|e| format!("read echo: {e}"))?;
    sender.join().unwrap().map_err(|e| format!("write: {e}"))?;
    if back != data {
        return Err("echoed bytes differ".into());
    }
    Ok(())
}

/// One node's loaded datapath; removes the node's pins when dropped.
pub struct NodeDatapath {
    pub node: Node,
    pub dp: Option<Datapath<Loader>>,
    pub netlink: Netlink,
    /// How it reaches other nodes; `None`: it does not (no VXLAN device,
    /// nothing on the uplink).
    pub routing: Option<Routing>,
}

impl std::fmt::Debug for NodeDatapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeDatapath")
            .field("node", &self.node)
            .finish()
    }
}

impl NodeDatapath {
    /// Loads the datapath in `node`, wires and attaches `vms`' taps (and
    /// the VXLAN device and the uplink if `overlay`, sending over the
    /// overlay).
    pub fn start(node: &Node, vms: &[&Vm], overlay: bool) -> NodeDatapath {
        NodeDatapath::start_routed(node, vms, overlay.then_some(Routing::Overlay))
    }

    /// [`NodeDatapath::start`] for a node that reaches the others as
    /// `routing` says (`None`: a node alone).
    pub fn start_routed(node: &Node, vms: &[&Vm], routing: Option<Routing>) -> NodeDatapath {
        let node = node.clone();
        let vms: Vec<Vm> = vms.iter().map(|v| (*v).clone()).collect();
        node.clone()
            .run_in(move || {
                let netlink = Netlink::new().expect("netlink");
                for vm in &vms {
                    netlink.wire_tap(&vm.tap, vm.ip).expect("wire tap");
                }
                let vxlan_ifindex = if routing.is_some() {
                    netlink.ensure_vxlan("basalt-vx", 1500).expect("vxlan")
                } else {
                    0
                };
                let mut this = NodeDatapath {
                    node: node.clone(),
                    dp: None,
                    netlink,
                    routing,
                };
                this.load(&vms, vxlan_ifindex);
                this
            })
            .expect("enter node")
    }

    /// (Re)loads the programs and attaches them — what an agent does at
    /// start. Must run inside the node's namespace.
    fn load(&mut self, vms: &[Vm], vxlan_ifindex: u32) {
        let mut loader = Loader::load(self.node.netns()).expect("load datapath");
        for vm in vms {
            loader.attach(&vm.tap, Hook::Tap).expect("attach tap");
        }
        if vxlan_ifindex != 0 {
            loader
                .attach("basalt-vx", Hook::Overlay)
                .expect("attach vxlan");
            loader.attach("eth0", Hook::Uplink).expect("attach uplink");
        }
        self.dp = Some(Datapath::new(
            loader,
            NodeConfig {
                addr: self.node.addr(),
                vxlan_ifindex,
                routing: self.routing.unwrap_or_default(),
            },
        ));
    }

    /// Drops the loader (as a killed agent would) and loads anew.
    pub fn restart(&mut self, vms: &[&Vm]) {
        drop(self.dp.take());
        let vms: Vec<Vm> = vms.iter().map(|v| (*v).clone()).collect();
        let vxlan = if self.routing.is_some() {
            self.netlink.index("basalt-vx").unwrap()
        } else {
            0
        };
        let node = self.node.clone();
        node.run_in(|| self.load(&vms, vxlan)).expect("enter node");
    }

    pub fn apply(&mut self, endpoints: &[Endpoint], policies: &[Policy]) -> ApplyReport {
        self.apply_standby(endpoints, policies, &[])
    }

    /// [`NodeDatapath::apply`] with networks of the test's choosing.
    pub fn apply_networks(
        &mut self,
        endpoints: &[Endpoint],
        networks: &[Network],
        policies: &[Policy],
    ) -> ApplyReport {
        let netlink = &self.netlink;
        self.dp
            .as_mut()
            .unwrap()
            .apply(endpoints, networks, policies, &[], &|name| {
                netlink.tap_link(name).ok()
            })
            .expect("apply")
    }

    pub fn apply_standby(
        &mut self,
        endpoints: &[Endpoint],
        policies: &[Policy],
        standby: &[(String, Ipv4Addr)],
    ) -> ApplyReport {
        let netlink = &self.netlink;
        self.dp
            .as_mut()
            .unwrap()
            .apply(endpoints, &[network()], policies, standby, &|name| {
                netlink.tap_link(name).ok()
            })
            .expect("apply")
    }

    /// Wires and attaches a tap that appeared in the node later (a VM
    /// arriving by migration).
    pub fn attach_tap(&mut self, vm: &Vm) {
        let node = self.node.clone();
        node.run_in(|| {
            self.netlink.wire_tap(&vm.tap, vm.ip).expect("wire tap");
            self.loader()
                .attach(&vm.tap, Hook::Tap)
                .expect("attach tap");
        })
        .expect("enter node");
    }

    pub fn loader(&mut self) -> &mut Loader {
        self.dp.as_mut().unwrap().store_mut()
    }

    pub fn drops(&mut self, reason: DropReason) -> u64 {
        self.loader().drop_counts().unwrap()[&reason]
    }
}

impl Drop for NodeDatapath {
    fn drop(&mut self) {
        drop(self.dp.take());
        let _ = loader::remove_pins(self.node.netns());
    }
}

/// Logs to the test's output when `RUST_LOG` is set.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
