//! Three `basaltd control` members on loopback — the first bootstraps,
//! the others join through it — for tests of what clients see when a
//! member dies. The members' data lives under the test's prefix.

use basalt_api::{AdminClient, Kind, Object};
use basalt_testkit::{Prefix, Process, ProcessSpec};

const BASALTD: &str = env!("CARGO_BIN_EXE_basaltd");

/// The members' admin addresses and processes, member `i + 1` at index
/// `i`.
pub struct Trio {
    pub addresses: Vec<String>,
    pub processes: Vec<Process>,
}

fn start_member(prefix: &Prefix, id: u64, seed: Option<&str>) -> (String, Process) {
    let address = format!("127.0.0.1:{}", basalt_testkit::free_port());
    let mut spec = ProcessSpec::new(format!("control-{id}"), BASALTD)
        .args([
            "control",
            "--node-id",
            &id.to_string(),
            "--listen",
            &address,
            "--data-dir",
        ])
        .arg(prefix.dir().join(format!("control-{id}")))
        .env("RUST_LOG", "info");
    spec = match seed {
        None => spec.arg("--bootstrap"),
        Some(seed) => spec.args(["--join", seed]),
    };
    let process = Process::start(prefix, spec).expect("start basaltd control");
    (address, process)
}

/// Starts the three members; they are voters once [`members`] counts 3.
pub fn start(prefix: &Prefix) -> Trio {
    let (seed, first) = start_member(prefix, 1, None);
    let mut trio = Trio {
        addresses: vec![seed.clone()],
        processes: vec![first],
    };
    for id in 2..=3 {
        let (address, process) = start_member(prefix, id, Some(&seed));
        trio.addresses.push(address);
        trio.processes.push(process);
    }
    trio
}

/// How many members a list through `client` marks as voters, and which
/// one as leader; `None` when the list fails.
pub async fn members(client: &AdminClient) -> Option<(usize, Option<u64>)> {
    let list = client.list(Kind::Member).await.ok()?;
    let mut voters = 0;
    let mut leader = None;
    for object in &list.objects {
        if let Object::Member(m) = object {
            voters += usize::from(m.voter);
            if m.leader {
                leader = Some(m.id);
            }
        }
    }
    Some((voters, leader))
}
