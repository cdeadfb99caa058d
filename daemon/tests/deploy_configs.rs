//! Every config under `deploy/` and every config the installer writes is
//! parsed by the daemon that reads it: `basaltd control --check-config`
//! for control-plane TOML, `basaltd agent --check-config` for the agent's
//! environment file. The systemd units use only variables their example
//! environment files define, and only programs the package ships.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use basalt_installer::AnswerFile;
use basalt_installer::disks::Disk;
use basalt_installer::plan::{Inventory, NodeFile};

/// The checkout, read when the test runs (cargo sets the package's
/// folder): the one target folder serves every checkout, so a path built
/// into the binary may name another checkout's.
fn repo() -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo test")).join("..")
}

fn basaltd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_basaltd"))
}

/// `KEY=VALUE` lines of a systemd environment file (comments and blank
/// lines skipped).
fn env_file(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not KEY=VALUE: {l}"));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

fn check_control(path: &Path) -> Output {
    basaltd()
        .args(["control", "--check-config", "-c"])
        .arg(path)
        .output()
        .unwrap()
}

fn check_agent(vars: &BTreeMap<String, String>) -> Output {
    let mut cmd = basaltd();
    cmd.env_clear().args(["agent", "--check-config"]);
    cmd.envs(vars);
    if !vars.contains_key("BASALT_JOIN_TOKEN") {
        // The token lives in its own file (join-token.env).
        cmd.env("BASALT_JOIN_TOKEN", "node-n1.placeholder");
    }
    cmd.output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_example_control_config_parses_and_a_broken_one_does_not() {
    let example = repo().join("deploy/etc/basalt/control.toml");
    let out = check_control(&example);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("member n1 (id 1) at 192.168.50.11:7400"),
        "{}",
        text(&out)
    );

    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("control.toml");
    let original = std::fs::read_to_string(&example).unwrap();
    std::fs::write(&broken, original.replace("lease_seconds", "lease_secs")).unwrap();
    let out = check_control(&broken);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("lease_secs"),
        "the error names the field: {}",
        text(&out)
    );
}

#[test]
fn the_example_agent_env_parses_and_a_broken_one_does_not() {
    let vars =
        env_file(&std::fs::read_to_string(repo().join("deploy/etc/basalt/agent.env")).unwrap());
    let out = check_agent(&vars);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("node n1 at 192.168.50.11:7500"),
        "{}",
        text(&out)
    );

    let mut bad = vars.clone();
    bad.insert("BASALT_NODE".into(), "Node_1".into());
    let out = check_agent(&bad);
    assert!(!out.status.success());
    assert!(text(&out).contains("node_name"), "{}", text(&out));
    let mut bad = vars;
    bad.insert("BASALT_ACCEL".into(), "hyperv".into());
    let out = check_agent(&bad);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("BASALT_ACCEL") || text(&out).contains("--accel"),
        "{}",
        text(&out)
    );
}

#[test]
fn the_example_storage_env_names_a_pool_and_an_address() {
    let vars =
        env_file(&std::fs::read_to_string(repo().join("deploy/etc/basalt/storage.env")).unwrap());
    let known = ["BASALT_POOL", "BASALT_NBD_LISTEN", "BASALT_STORAGE_ARGS"];
    for key in vars.keys() {
        assert!(
            known.contains(&key.as_str()),
            "storage.env: unknown variable {key}"
        );
    }
    assert!(vars["BASALT_POOL"].starts_with('/'));
    vars["BASALT_NBD_LISTEN"]
        .parse::<std::net::SocketAddr>()
        .expect("BASALT_NBD_LISTEN is an address");

    // basaltd reads BASALT_POOL from the environment, as the unit relies on.
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool.img");
    let out = basaltd()
        .args(["storage", "pool", "create", "--size", "64M", "--path"])
        .arg(&pool)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = basaltd()
        .args(["storage", "pool", "status", "--json"])
        .env("BASALT_POOL", &pool)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

/// Variables a unit's command lines use: `${NAME}` and `$NAME`.
fn unit_variables(unit: &str) -> Vec<String> {
    let mut vars = Vec::new();
    for line in unit.lines().filter(|l| l.starts_with("Exec")) {
        let mut rest = line;
        while let Some(at) = rest.find('$') {
            rest = &rest[at + 1..];
            let name: String = rest
                .trim_start_matches('{')
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            vars.push(name);
        }
    }
    vars
}

#[test]
fn units_use_only_what_the_package_and_the_example_configs_provide() {
    let dir = repo().join("deploy/systemd");
    let mut units = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let unit = std::fs::read_to_string(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let mut defined = BTreeMap::new();
        for line in unit.lines() {
            if let Some(file) = line.strip_prefix("EnvironmentFile=") {
                let file = file.trim_start_matches('-');
                let example = repo().join("deploy").join(file.trim_start_matches('/'));
                if example.exists() {
                    defined.extend(env_file(&std::fs::read_to_string(&example).unwrap()));
                } else {
                    assert_eq!(
                        file, "/etc/basalt/join-token.env",
                        "{name}: no example for {file}"
                    );
                    defined.insert("BASALT_JOIN_TOKEN".to_owned(), String::new());
                }
            }
            for prefix in ["ExecStart=", "ExecStartPre="] {
                if let Some(command) = line.strip_prefix(prefix) {
                    let program = command.split_whitespace().next().unwrap();
                    match program {
                        "/usr/bin/basaltd" | "/usr/bin/basalt" => {}
                        other => {
                            let shipped = other
                                .strip_prefix("/usr/lib/basalt/")
                                .map(|f| repo().join("deploy/lib").join(f));
                            assert!(
                                shipped.is_some_and(|f| f.exists()),
                                "{name}: {other} is not shipped by the package"
                            );
                        }
                    }
                }
            }
        }
        for var in unit_variables(&unit) {
            // Optional extra flags may be left out of a config.
            if !var.ends_with("_ARGS") {
                assert!(
                    defined.contains_key(&var),
                    "{name} uses ${var}, which no example config sets"
                );
            }
        }
        assert!(
            unit.contains("[Install]\nWantedBy=multi-user.target"),
            "{name}"
        );
        units += 1;
    }
    assert_eq!(units, 4);
}

/// A machine with a system disk and a pool disk.
fn machine() -> Inventory {
    let json = r#"{"blockdevices":[
        {"path":"/dev/vda","size":21474836480,"serial":"sys-1","type":"disk","ro":false},
        {"path":"/dev/vdb","size":107374182400,"model":"Fast SSD","serial":"pool-1","type":"disk","ro":false}]}"#;
    Inventory {
        disks: Disk::parse_lsblk(json).unwrap(),
        links: None,
        exclude: Vec::new(),
        kvm: true,
    }
}

#[test]
fn configs_the_installer_writes_parse_in_the_daemon() {
    let mut answer_files: Vec<PathBuf> = Vec::new();
    for dir in ["deploy/answers", "installer/tests/answers"] {
        for entry in std::fs::read_dir(repo().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if dir == "deploy/answers" || name.starts_with("good-") {
                answer_files.push(path);
            }
        }
    }
    answer_files.sort();
    let mut controls = 0;
    for path in &answer_files {
        let answers = AnswerFile::load(path).unwrap();
        let plan = basalt_installer::plan(&answers, &machine(), &|p| p.to_owned()).unwrap();
        let file = |name: &str| -> Option<&NodeFile> {
            plan.files.iter().find(|f| f.path == Path::new(name))
        };
        if let Some(control) = file("/etc/basalt/control.toml") {
            let dir = tempfile::tempdir().unwrap();
            let toml = dir.path().join("control.toml");
            std::fs::write(&toml, &control.content).unwrap();
            let out = check_control(&toml);
            assert!(out.status.success(), "{}: {}", path.display(), text(&out));
            controls += 1;
        }
        let mut vars = env_file(&file("/etc/basalt/agent.env").unwrap().content);
        if let Some(token) = file("/etc/basalt/join-token.env") {
            vars.extend(env_file(&token.content));
        }
        let out = check_agent(&vars);
        assert!(out.status.success(), "{}: {}", path.display(), text(&out));
        let storage = env_file(&file("/etc/basalt/storage.env").unwrap().content);
        assert!(
            storage["BASALT_NBD_LISTEN"]
                .parse::<std::net::SocketAddr>()
                .is_ok()
        );
    }
    assert!(
        controls >= 2,
        "the create files and the member file write control.toml"
    );
}

#[test]
fn the_vagrantfile_validates() {
    if Command::new("vagrant").arg("--version").output().is_err() {
        eprintln!(
            "SKIPPED: vagrant is not installed (scripts/install-deps installs vagrant and vagrant-libvirt)"
        );
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let dist = scratch.path().join("dist");
    std::fs::create_dir(&dist).unwrap();
    let validate = |vagrantfile: &str| {
        Command::new("vagrant")
            .arg("validate")
            .current_dir(repo().join("deploy/vagrant"))
            .env("VAGRANT_VAGRANTFILE", vagrantfile)
            .env("VAGRANT_HOME", scratch.path().join("home"))
            .env("VAGRANT_DOTFILE_PATH", scratch.path().join("dot"))
            .env("VAGRANT_CHECKPOINT_DISABLE", "1")
            .env("BASALT_DIST", &dist)
            .output()
            .unwrap()
    };
    let out = validate("Vagrantfile");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("validated successfully"),
        "{}",
        text(&out)
    );

    // The check can fail: a misspelt provider setting is refused.
    let original = std::fs::read_to_string(repo().join("deploy/vagrant/Vagrantfile")).unwrap();
    let broken = scratch.path().join("Vagrantfile.broken");
    std::fs::write(&broken, original.replace("libvirt.cpus", "libvirt.cpuz")).unwrap();
    let out = validate(broken.to_str().unwrap());
    assert!(!out.status.success());
    assert!(text(&out).contains("cpuz"), "{}", text(&out));
}
