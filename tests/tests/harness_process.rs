//! Supervised processes: started in a namespace, logged, killed, restarted,
//! detached and adopted, and never left running by a dropped handle.
//! Needs root.

use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt as _;
use std::time::{Duration, Instant};

use basalt_testkit::process::{Exit, ProcessError, probe_tcp};
use basalt_testkit::{Fabric, Prefix, Process, ProcessSpec, sweep};

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("basalt_testkit=debug")
        .try_init();
}

fn is_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let rest = stat.get(stat.rfind(')')? + 2..)?.to_owned();
            Some(!rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

fn signal_of(exit: Exit) -> Option<i32> {
    match exit {
        Exit::Status(status) => status.signal(),
        Exit::Unobserved => None,
    }
}

const SHORT: Duration = Duration::from_millis(300);

#[test]
fn process_in_a_namespace_is_reachable_only_there_and_restarts() {
    init_tracing();
    let prefix = Prefix::for_test().expect("prefix");
    let mut fabric = Fabric::new(&prefix).expect("fabric");
    let node = fabric.add_node("a").expect("node");

    // Loopback inside the node: nobody else can reach it.
    let port = 47_013;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let spec = ProcessSpec::new("web", "sh")
        .arg("-c")
        .arg(format!(
            "echo serving on $MARK; exec busybox httpd -f -p 127.0.0.1:{port} -h /"
        ))
        .env("MARK", port.to_string())
        .netns(&node);
    let mut web = Process::start(&prefix, spec).expect("start");
    web.wait_for_tcp(addr, Some(&node), Duration::from_secs(30))
        .expect("listening");
    assert!(
        !probe_tcp(addr, None, SHORT),
        "reachable from the root namespace"
    );

    // Pid file, log and prefix marker.
    let pid = web.pid();
    assert_eq!(
        std::fs::read_to_string(web.pid_path())
            .expect("pid file")
            .trim(),
        pid.to_string()
    );
    assert!(
        web.logs().contains(&format!("serving on {port}")),
        "{}",
        web.logs()
    );
    assert!(sweep::objects(prefix.name()).processes.contains(&pid));
    assert!(matches!(
        Process::start(&prefix, ProcessSpec::new("web", "true")),
        Err(ProcessError::AlreadyRunning { .. })
    ));

    let exit = web.kill9().expect("kill9");
    assert_eq!(signal_of(exit), Some(9), "{exit:?}");
    assert!(!web.is_running());
    assert!(!is_alive(pid));
    assert!(
        !probe_tcp(addr, Some(&node), SHORT),
        "still reachable after kill9"
    );

    web.restart().expect("restart");
    assert_ne!(web.pid(), pid);
    web.wait_for_tcp(addr, Some(&node), Duration::from_secs(30))
        .expect("listening again");
    let served = web
        .logs()
        .lines()
        .filter(|l| l.starts_with("serving on"))
        .count();
    assert_eq!(served, 2, "{}", web.logs());

    let exit = web.stop(Duration::from_secs(10)).expect("stop");
    assert_eq!(signal_of(exit), Some(15), "{exit:?}");
    assert!(!probe_tcp(addr, Some(&node), SHORT));
    let pid_file = web.pid_path();
    drop(web);
    assert!(!pid_file.exists());
}

#[test]
fn waiting_for_a_dead_process_fails_with_its_log() {
    init_tracing();
    let prefix = Prefix::for_test().expect("prefix");
    let spec = ProcessSpec::new("doomed", "sh").args(["-c", "echo 'boom: no port' >&2; exit 3"]);
    let mut doomed = Process::start(&prefix, spec).expect("start");
    let started = Instant::now();
    let err = doomed
        .wait_for_tcp(([127, 0, 0, 1], 1).into(), None, Duration::from_secs(60))
        .expect_err("must fail");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "did not notice the exit"
    );
    match &err {
        ProcessError::Died { exit, log_tail, .. } => {
            assert!(
                matches!(exit, Exit::Status(s) if s.code() == Some(3)),
                "{exit:?}"
            );
            assert!(log_tail.contains("boom: no port"), "{log_tail}");
        }
        other => panic!("unexpected error: {other}"),
    }
    assert!(err.to_string().contains("boom: no port"));
}

#[test]
fn detached_process_survives_its_handle_and_is_adopted() {
    init_tracing();
    let prefix = Prefix::for_test().expect("prefix");
    let sleeper =
        Process::start(&prefix, ProcessSpec::new("sleeper", "sleep").arg("1000")).expect("start");
    let pid = sleeper.detach();
    std::thread::sleep(SHORT);
    assert!(is_alive(pid), "a detached process must outlive its handle");

    let mut adopted = Process::from_pid_file(&prefix, "sleeper").expect("adopt");
    assert_eq!(adopted.pid(), pid);
    assert!(adopted.is_running());
    // Adopted with its spec: it can be restarted.
    adopted.restart().expect("restart");
    let second = adopted.pid();
    assert_ne!(second, pid);
    assert!(!is_alive(pid));

    let pid_file = adopted.pid_path();
    drop(adopted);
    assert!(!is_alive(second));
    assert!(!pid_file.exists());
    assert!(matches!(
        Process::from_pid_file(&prefix, "sleeper"),
        Err(ProcessError::NotRunning { .. })
    ));
}

#[test]
fn dropping_a_process_kills_its_whole_group() {
    init_tracing();
    let prefix = Prefix::for_test().expect("prefix");
    let spec = ProcessSpec::new("parent", "sh").args(["-c", "sleep 1000 & echo child=$!; wait"]);
    let parent = Process::start(&prefix, spec).expect("start");
    let deadline = Instant::now() + Duration::from_secs(10);
    let child = loop {
        let logs = parent.logs();
        if let Some(pid) = logs
            .lines()
            .find_map(|l| l.strip_prefix("child="))
            .and_then(|p| p.trim().parse::<u32>().ok())
        {
            break pid;
        }
        assert!(Instant::now() < deadline, "no child pid in {logs}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let parent_pid = parent.pid();
    assert!(is_alive(child));
    drop(parent);
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_alive(child) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!is_alive(child), "the group's other member survived");
    assert!(!is_alive(parent_pid));
}
