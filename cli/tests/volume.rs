//! `basalt volume`, run as a user runs it, against a storage-local socket
//! served in this process over two in-memory pools replicating on
//! loopback: `get` shows a primary's peer connected, and a split brain as
//! such; `verify` finds the chunk corrupted behind replication's back on
//! the peer and fails, `--repair` fixes it, and a last verify passes.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_sds::backend::MemBackend;
use basalt_sds::local::{ExportConfig, LocalService};
use basalt_sds::pool::{Pool, PoolOptions};
use basalt_sds::replication::attach::{AttachOptions, AttachSpec, Attachments, Role};
use basalt_sds::replication::book::ReplicaBook;
use basalt_sds::replication::fence::AgentFencer;
use basalt_sds::replication::replica::ReplicaServer;
use basalt_sds::replication::{Op, PeerState};

const BASALT: &str = env!("CARGO_BIN_EXE_basalt");
const VOL: u64 = 8 << 20;
const CHUNK: u64 = 64 << 10;

fn pool() -> Pool {
    let pool =
        Pool::create(Arc::new(MemBackend::new(64 << 20)), &PoolOptions::default()).expect("pool");
    pool.create_volume("vol", VOL).expect("vol");
    pool.create_volume("other", VOL).expect("other");
    pool
}

fn attachments(pool: &Pool) -> Arc<Attachments> {
    Arc::new(Attachments::new(
        pool.clone(),
        Arc::new(ReplicaBook::in_memory(0)),
        AttachOptions {
            retry: Duration::from_millis(50),
            ..AttachOptions::default()
        },
    ))
}

fn spec(role: Role, peers: &[SocketAddr]) -> AttachSpec {
    AttachSpec {
        role,
        epoch: 1,
        peers: peers.iter().map(ToString::to_string).collect(),
        allow_outdate: true,
        protocol: Default::default(),
    }
}

fn write(att: &Attachments, pool: &Pool, name: &str, offset: u64, data: &[u8]) {
    let vol = pool.open_volume(name).expect("open");
    att.slot(name)
        .submit(
            Op::Write {
                offset,
                data,
                fua: false,
            },
            || vol.write(offset, data, false),
        )
        .expect("write");
}

fn basalt(socket: &Path, args: &[&str]) -> Output {
    Command::new(BASALT)
        .arg("volume")
        .arg("--storage-socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run basalt")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn wait(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn get_shows_peers_and_split_brain_and_verify_finds_and_repairs_a_bad_chunk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("local.sock");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let (pa, pb) = (pool(), pool());
    let (att_a, att_b) = (attachments(&pa), attachments(&pb));
    let sa = ReplicaServer::serve(att_a.clone(), any).expect("replica server A");
    let sb = ReplicaServer::serve(att_b.clone(), any).expect("replica server B");

    // A serves its storage-local API on the socket.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let local = LocalService::new(
        att_a.clone(),
        ExportConfig {
            tcp: any,
            unix: None,
            replication: Some(sa.addr()),
        },
        AgentFencer::default(),
    );
    let served = socket.clone();
    rt.spawn(async move { local.serve_unix(&served, std::future::pending()).await });
    wait("the socket never appeared", || socket.exists());

    // "vol": A primary, B its secondary.
    att_b
        .attach("vol", spec(Role::Secondary, &[]))
        .expect("B secondary");
    att_a
        .attach("vol", spec(Role::Primary, &[sb.addr()]))
        .expect("A primary");
    wait("vol never connected", || {
        att_a.view("vol").peers[0].1.state == PeerState::Connected
    });
    for i in 0..VOL / CHUNK {
        write(
            &att_a,
            &pa,
            "vol",
            i * CHUNK,
            &vec![i as u8 + 1; CHUNK as usize],
        );
    }
    let out = basalt(&socket, &["get", "vol"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("connected"), "{}", text(&out));

    // "other": written apart on each side, then each a primary with the
    // other as its peer: a split brain, shown as such.
    write(&att_a, &pa, "other", 0, &[0xaa; 4096]);
    write(&att_b, &pb, "other", 0, &[0xbb; 4096]);
    att_a
        .attach("other", spec(Role::Standalone, &[]))
        .expect("A standalone");
    att_b
        .attach("other", spec(Role::Standalone, &[]))
        .expect("B standalone");
    att_a
        .attach("other", spec(Role::Primary, &[sb.addr()]))
        .expect("A primary");
    att_b
        .attach("other", spec(Role::Primary, &[sa.addr()]))
        .expect("B primary");
    wait("no split brain", || {
        att_a.view("other").peers[0].1.state == PeerState::SplitBrain
    });
    let out = basalt(&socket, &["get", "other"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("split-brain"), "{}", text(&out));
    let out = basalt(&socket, &["-o", "json", "get", "other"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["peers"][0]["state"], "splitbrain", "{json}");

    // A chunk of B's copy of "vol" changed behind replication's back.
    let bad = 37;
    pb.open_volume("vol")
        .expect("open B")
        .write(bad * CHUNK + 512, &[0xee; 512], false)
        .expect("corrupt B");
    let out = basalt(&socket, &["-o", "json", "verify", "vol"]);
    assert!(!out.status.success(), "verify passed: {}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        json["peers"][0]["out_of_sync_chunks"],
        serde_json::json!([bad]),
        "{json}"
    );
    let out = basalt(&socket, &["verify", "vol", "--repair"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("differs"), "{}", text(&out));
    let out = basalt(&socket, &["verify", "vol"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("in sync"), "{}", text(&out));

    // A volume that is not a primary here.
    let out = basalt(&socket, &["verify", "nosuch"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("not a primary"), "{}", text(&out));
}
