//! Basalt's NBD server driven by clients no one here wrote: qemu-img,
//! qemu-io, nbdinfo, nbdcopy and fio's nbd engine, over TCP and a Unix
//! socket. Every test ends with the pool verifying clean.

mod support;

use support::{MIB, TestServer, clients_present, run, status, stdout};

#[test]
fn qemu_img_info_convert_compare_map() {
    if !clients_present(&["qemu-img"]) {
        return;
    }
    let srv = TestServer::start(256 * MIB, &[("disk", 64 * MIB)]);
    let uri = srv.uri("disk");
    let info = stdout(&run("qemu-img", &["info", "--output=json", &uri]));
    assert!(info.contains("\"virtual-size\": 67108864"), "{info}");

    let src = srv.path("src.raw");
    support::sample_image(&src, 64 * MIB);
    let src = src.to_str().expect("path");
    run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src, &uri],
    );
    let cmp = stdout(&run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src, &uri],
    ));
    assert!(cmp.contains("identical"), "{cmp}");

    // The zeros of the source stayed holes: only the data is allocated.
    let map = stdout(&run(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &uri],
    ));
    let data_bytes: u64 = map
        .lines()
        .filter(|l| l.contains("\"data\": true"))
        .filter_map(|l| {
            let len = l.split("\"length\": ").nth(1)?.split(',').next()?;
            len.trim().parse::<u64>().ok()
        })
        .sum();
    assert_eq!(
        data_bytes,
        5 * MIB,
        "allocated bytes per qemu-img map:\n{map}"
    );
    let mapped = srv.pool.volume_info("disk").expect("info").mapped_bytes;
    assert_eq!(mapped, 5 * MIB);
    srv.pool.verify().expect("verify");
}

#[test]
fn qemu_io_patterns_over_tcp_and_unix() {
    if !clients_present(&["qemu-io"]) {
        return;
    }
    let srv = TestServer::start(128 * MIB, &[("disk", 32 * MIB)]);
    for (uri, pat, at) in [
        (srv.uri("disk"), "0xab", 0),
        (srv.unix_uri("disk"), "0xcd", 3 * MIB),
    ] {
        let write = format!("write -P {pat} {at} 1M");
        let read = format!("read -P {pat} {at} 1M");
        let out = run("qemu-io", &["-f", "raw", "-c", &write, "-c", &read, &uri]);
        let text = stdout(&out);
        assert!(!text.contains("verification failed"), "{text}");
        assert!(text.contains("read 1048576/1048576"), "{text}");
        // Overwrites of allocated chunks (their payload goes through a
        // pipe, see basalt_sds::pipe), off the chunk grid, around the
        // first write's bytes.
        let over = format!("write -P 0x5a {} 1000k", at + 4096);
        let checks = [
            format!("read -P {pat} {at} 4k"),
            format!("read -P 0x5a {} 1000k", at + 4096),
            format!("read -P {pat} {} 20480", at + 1_028_096),
        ];
        let mut args = vec!["-f", "raw", "-c", &over];
        for c in &checks {
            args.extend(["-c", c]);
        }
        args.push(&uri);
        let text = stdout(&run("qemu-io", &args));
        assert!(!text.contains("verification failed"), "{text}");
        assert_eq!(text.matches("read ").count(), 3, "{text}");
    }
    // A wrong pattern is caught (the read really checks).
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x11 0 4k", &srv.uri("disk")])
        .output()
        .expect("qemu-io");
    assert!(stdout(&out).contains("verification failed"));
    // The bytes are in the pool.
    let v = srv.pool.open_volume("disk").expect("open");
    let mut buf = vec![0u8; 4096];
    v.read(3 * MIB, &mut buf).expect("read");
    assert!(buf.iter().all(|&b| b == 0xcd));
    v.read(3 * MIB + 4096, &mut buf).expect("read");
    assert!(buf.iter().all(|&b| b == 0x5a));
    // FUA writes, write-zeroes and discard through qemu-io.
    let uri = srv.uri("disk");
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -f -P 0x77 8M 64k",
            "-c",
            "write -z 8M 64k",
            "-c",
            "read -P 0 8M 64k",
            "-c",
            "discard 0 1M",
            "-c",
            "read -P 0 0 1M",
            &uri,
        ],
    );
    srv.pool.verify().expect("verify");
}

#[test]
fn nbdinfo_map_can_and_list() {
    if !clients_present(&["nbdinfo"]) {
        return;
    }
    let srv = TestServer::start(128 * MIB, &[("disk", 16 * MIB)]);
    let v = srv.pool.open_volume("disk").expect("open");
    v.write(MIB, &vec![1u8; MIB as usize], false)
        .expect("write");
    srv.pool.snapshot("disk", "disk-snap").expect("snapshot");
    let uri = srv.uri("disk");
    let map = stdout(&run("nbdinfo", &["--map", &uri]));
    let lines: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines.len(), 3, "{map}");
    assert_eq!(&lines[0][..3], ["0", "1048576", "3"], "{map}");
    assert_eq!(&lines[1][..3], ["1048576", "1048576", "0"], "{map}");
    assert_eq!(&lines[2][..3], ["2097152", "14680064", "3"], "{map}");
    for can in [
        "flush",
        "fua",
        "trim",
        "zero",
        "fast-zero",
        "multi-conn",
        "cache",
        "df",
    ] {
        assert_eq!(status("nbdinfo", &["--can", can, &uri]), 0, "--can {can}");
    }
    assert_ne!(status("nbdinfo", &["--is", "readonly", &uri]), 0);
    assert_eq!(
        status("nbdinfo", &["--is", "readonly", &srv.uri("disk-snap")]),
        0
    );
    let list = stdout(&run(
        "nbdinfo",
        &["--list", &format!("nbd://127.0.0.1:{}", srv.port)],
    ));
    assert!(
        list.contains("disk") && list.contains("disk-snap"),
        "{list}"
    );
    // An unknown export is refused.
    assert_ne!(status("nbdinfo", &[&srv.uri("nope")]), 0);
    srv.pool.verify().expect("verify");
}

#[test]
fn nbdcopy_in_and_out_with_several_connections() {
    if !clients_present(&["nbdcopy"]) {
        return;
    }
    let srv = TestServer::start(256 * MIB, &[("disk", 64 * MIB)]);
    let src = srv.path("src.raw");
    support::sample_image(&src, 64 * MIB);
    let out = srv.path("out.raw");
    let (src, out) = (src.to_str().expect("p"), out.to_str().expect("p"));
    run("nbdcopy", &["--connections=4", src, &srv.uri("disk")]);
    run("nbdcopy", &["--connections=4", &srv.unix_uri("disk"), out]);
    let a = std::fs::read(src).expect("read src");
    let b = std::fs::read(out).expect("read out");
    assert!(a == b, "copied image differs");
    srv.pool.verify().expect("verify");
}

#[test]
fn fio_nbd_engine_with_crc32c_verify() {
    if !clients_present(&["fio"]) {
        return;
    }
    let srv = TestServer::start(256 * MIB, &[("disk", 64 * MIB)]);
    fio_verify(&srv.uri("disk"), &["--bs=4k", "--size=32M", "--iodepth=16"]);
    // Big writes over written chunks, several in flight, on TCP and Unix
    // sockets: each pass after the first overwrites (through a pipe).
    for uri in [srv.uri("disk"), srv.unix_uri("disk")] {
        fio_verify(&uri, &["--bs=1M", "--size=16M", "--iodepth=8", "--loops=3"]);
    }
    srv.pool.verify().expect("verify");
}

/// Runs fio's nbd engine on `uri`: random writes with a crc32c verify
/// read back, with `args` added; fails the test on any verify problem.
fn fio_verify(uri: &str, args: &[&str]) {
    let uri = format!("--uri={uri}");
    let mut all = vec![
        "--name=basalt",
        "--ioengine=nbd",
        &uri,
        "--rw=randwrite",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=terse",
    ];
    all.extend_from_slice(args);
    let text = stdout(&run("fio", &all));
    assert!(
        !text.contains("verify"),
        "fio reported a verify problem: {text}"
    );
}

/// Big reads and writes on many connections at once: one nbdcopy writes
/// volume `b` from `a` (1 MiB reads and writes, 4 connections each side)
/// while another reads `a` out, then fio writes and verifies 1 MiB blocks
/// on two connections at queue depth 8; every byte is compared.
#[test]
fn big_reads_and_writes_at_once_on_many_connections() {
    if !clients_present(&["nbdcopy", "fio"]) {
        return;
    }
    let srv = TestServer::start(
        512 * MIB,
        &[("a", 64 * MIB), ("b", 64 * MIB), ("c", 64 * MIB)],
    );
    let src = srv.path("src.raw");
    support::random_image(&src, 64 * MIB);
    let src = src.to_str().expect("p").to_owned();
    let big = ["--connections=4", "--requests=16", "--request-size=1048576"];
    let copy = |from: &str, to: &str| {
        let mut args = big.to_vec();
        args.extend([from, to]);
        run("nbdcopy", &args);
    };
    copy(&src, &srv.uri("a"));
    let out_a = srv.path("a.raw");
    let out_b = srv.path("b.raw");
    let (out_a, out_b) = (
        out_a.to_str().expect("p").to_owned(),
        out_b.to_str().expect("p").to_owned(),
    );
    std::thread::scope(|s| {
        let (a, b) = (srv.uri("a"), srv.uri("b"));
        let copy = &copy;
        let both = s.spawn(move || copy(&a, &b));
        copy(&srv.unix_uri("a"), &out_a);
        both.join().expect("nbdcopy a -> b");
    });
    copy(&srv.uri("b"), &out_b);
    let want = std::fs::read(&src).expect("read src");
    for out in [&out_a, &out_b] {
        let got = std::fs::read(out).expect("read copy");
        assert!(got == want, "{out} differs from the source");
    }
    fio_verify(
        &srv.uri("c"),
        &[
            "--bs=1M",
            "--size=32M",
            "--numjobs=2",
            "--offset_increment=32M",
            "--iodepth=8",
        ],
    );
    srv.pool.verify().expect("verify");
}
