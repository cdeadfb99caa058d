//! The storage-local API end to end: a real `basaltd storage serve
//! --local-socket` process, driven through `basalt_api::StorageClient` as
//! the agent drives it, with the volumes it makes read and written by NBD
//! clients (Basalt's test client and `qemu-img`, which no one here wrote).

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use basalt_api::{ApiError, EnsureVolume, StorageClient};
use basalt_testkit::Prefix;
use basalt_testkit::nbd_client::NbdClient;
use basalt_testkit::process::{Process, ProcessSpec};

const BASALTD: &str = env!("CARGO_BIN_EXE_basaltd");

fn ensure(name: &str, size: u64, source: Option<&str>) -> EnsureVolume {
    EnsureVolume {
        name: name.into(),
        size_bytes: size,
        source: source.map(Into::into),
    }
}

#[test]
fn the_agent_manages_volumes_through_the_local_socket() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: needs root (test prefix and process harness)");
        return;
    }
    let prefix = Prefix::for_test().expect("prefix");
    let pool = prefix.dir().join("pool.img");
    let socket = prefix.dir().join("storage.sock");
    let out = Command::new(BASALTD)
        .args(["storage", "pool", "create", "--size", "256M", "--path"])
        .arg(&pool)
        .output()
        .expect("basaltd runs");
    assert!(out.status.success(), "{out:?}");
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, basalt_testkit::free_port()));
    let spec = ProcessSpec::new("basalt-storage", BASALTD)
        .args(["storage", "serve", "--listen", &addr.to_string(), "--pool"])
        .arg(&pool)
        .arg("--local-socket")
        .arg(&socket);
    let mut server = Process::start(&prefix, spec).expect("start server");
    server
        .wait_for_tcp(addr, None, Duration::from_secs(30))
        .expect("server listening");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "no local socket: {}",
            server.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let storage = StorageClient::connect_unix(&socket).expect("client");
        // An empty volume, created once.
        let base = storage
            .ensure_volume(ensure("base", 8 << 20, None))
            .await
            .expect("ensure base");
        assert_eq!((base.size_bytes, base.allocated_bytes), (8 << 20, 0));
        let again = storage
            .ensure_volume(ensure("base", 8 << 20, None))
            .await
            .unwrap();
        assert_eq!(again.uid, base.uid, "ensure is idempotent");

        // Data written over NBD at the export the API names.
        let export = storage.export_address("base").await.unwrap();
        assert_eq!(export.port, addr.port());
        let nbd_addr: SocketAddr = format!("{}:{}", export.host, export.port).parse().unwrap();
        let mut disk = NbdClient::connect(nbd_addr, &export.export_name).expect("nbd");
        disk.write(4096, b"image bytes").unwrap();
        disk.flush().unwrap();
        let st = storage.status().await.unwrap();
        assert_eq!(st.volumes, 1);
        assert!(st.free_chunks < st.data_chunks, "{st:?}");
        let listed = storage.list_volumes().await.unwrap();
        assert!(listed[0].allocated_bytes > 0, "{listed:?}");

        // Snapshot, then a larger clone of it: shares the data.
        let snap = storage.snapshot_volume("base", "base-snap").await.unwrap();
        assert!(snap.read_only);
        let clone = storage
            .ensure_volume(ensure("vm-disk", 16 << 20, Some("base-snap")))
            .await
            .unwrap();
        assert_eq!(clone.size_bytes, 16 << 20);
        let mut c = NbdClient::connect(nbd_addr, "vm-disk").expect("nbd clone");
        let mut buf = [0u8; 11];
        c.read(4096, &mut buf).unwrap();
        assert_eq!(&buf, b"image bytes");
        drop(c);

        // A second client (an agent restart) changes nothing for an open
        // NBD session: it keeps working.
        drop(storage);
        let storage = StorageClient::connect_unix(&socket).expect("client again");
        disk.write(0, b"still here").unwrap();
        disk.flush().unwrap();
        let grown = storage.resize_volume("vm-disk", 32 << 20).await.unwrap();
        assert_eq!(grown.size_bytes, 32 << 20);

        // qemu-img sees the sizes through the export address.
        let info = Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "raw"])
            .arg(storage.export_address("vm-disk").await.unwrap().uri())
            .output()
            .expect("qemu-img runs");
        assert!(info.status.success(), "{info:?}");
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["virtual-size"], 32 << 20);

        // Bad requests name their field; a missing volume is a
        // precondition; delete is idempotent.
        assert!(matches!(
            storage.ensure_volume(ensure("../etc", 4096, None)).await,
            Err(ApiError::InvalidArgument { field, .. }) if field == "name"
        ));
        assert!(matches!(
            storage.resize_volume("vm-disk", 1 << 20).await,
            Err(ApiError::InvalidArgument { field, .. }) if field == "size_bytes"
        ));
        assert!(matches!(
            storage.export_address("nope").await,
            Err(ApiError::FailedPrecondition { .. })
        ));
        assert!(storage.delete_volume("vm-disk").await.unwrap());
        assert!(!storage.delete_volume("vm-disk").await.unwrap());
        let names: Vec<_> = storage
            .list_volumes()
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(names, ["base", "base-snap"]);
    });
    server.stop(Duration::from_secs(10)).expect("stop");
    assert!(!socket.exists(), "the socket is removed on shutdown");
}
