//! Every answer file under `tests/answers/` and `deploy/answers/`: the good
//! ones validate and plan on a sample machine; each bad one fails with
//! exactly the errors its `# expect: FIELD: TEXT` lines name (the field
//! exactly, the reason by its beginning or a fragment).

use std::path::{Path, PathBuf};

use basalt_installer::disks::Disk;
use basalt_installer::plan::{Inventory, PoolPlan};
use basalt_installer::{AnswerFile, FieldError};

fn files(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml")
                && p.file_name().unwrap().to_string_lossy().starts_with(prefix)
        })
        .collect();
    files.sort();
    files
}

/// This package's folder, read when the test runs (cargo sets it): the
/// one target folder serves every checkout, so a path built into the
/// binary may name another checkout's.
fn here() -> PathBuf {
    PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo test"))
}

/// A machine with a small system disk, two SSDs and a DVD drive.
fn machine() -> Inventory {
    let json = r#"{"blockdevices":[
        {"path":"/dev/sr0","size":241172480,"model":"QEMU DVD-ROM","serial":"QM00003","type":"rom","ro":false,"rm":true},
        {"path":"/dev/vda","size":21474836480,"model":null,"serial":"sys-1","type":"disk","ro":false,"rm":false},
        {"path":"/dev/vdb","size":107374182400,"model":"Fast SSD","serial":"pool-1","type":"disk","ro":false,"rm":false},
        {"path":"/dev/vdc","size":214748364800,"model":"Fast SSD","serial":"pool-2","type":"disk","ro":false,"rm":false}]}"#;
    Inventory {
        disks: Disk::parse_lsblk(json).unwrap(),
        links: None,
        exclude: vec![(PathBuf::from("/dev/sr0"), "the boot medium".into())],
        kvm: false,
    }
}

#[test]
fn good_answer_files_validate_and_plan() {
    let mut checked = 0;
    for path in files(&here().join("tests/answers"), "good-")
        .into_iter()
        .chain(files(&here().join("../deploy/answers"), ""))
    {
        let answers = AnswerFile::load(&path)
            .unwrap_or_else(|err| panic!("{} should be valid:\n{err}", path.display()));
        let plan = basalt_installer::plan(&answers, &machine(), &|p| p.to_owned())
            .unwrap_or_else(|err| panic!("{} should plan: {err}", path.display()));
        assert_ne!(plan.install_disk.path, Path::new("/dev/sr0"));
        assert_ne!(plan.pool.path(), plan.install_disk.path.as_path());
        assert!(plan.sfdisk_script().starts_with("label: gpt\n"));
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} good files");
}

#[test]
fn the_create_example_plans_what_it_says() {
    let answers = AnswerFile::load(&here().join("tests/answers/good-create-static.yaml")).unwrap();
    let plan = basalt_installer::plan(&answers, &machine(), &|p| p.to_owned()).unwrap();
    assert_eq!(
        plan.install_disk.path,
        Path::new("/dev/vda"),
        "smallest disk of at least 16 GiB"
    );
    assert_eq!(
        plan.pool,
        PoolPlan::Device {
            path: PathBuf::from("/dev/vdc"),
            size_bytes: 200 << 30
        },
        "largest SSD"
    );
    let devices: Vec<String> = plan
        .partitions
        .iter()
        .map(|p| p.device.display().to_string())
        .collect();
    assert_eq!(devices, ["/dev/vda1", "/dev/vda2", "/dev/vda3"]);
    assert!(plan.units.contains(&"basalt-control.service"));
    assert!(plan.units.contains(&"basalt-firstboot.service"));
    let file = |name: &str| {
        plan.files
            .iter()
            .find(|f| f.path == Path::new(name))
            .unwrap_or_else(|| panic!("no {name}"))
    };
    let toml = &file("/etc/basalt/control.toml").content;
    assert!(
        toml.contains("bootstrap = true") && toml.contains("advertise = \"10.0.0.11:7400\""),
        "{toml}"
    );
    let agent = &file("/etc/basalt/agent.env").content;
    assert!(agent.contains("BASALT_SERVER=10.0.0.11:7400\n"), "{agent}");
    assert!(agent.contains("BASALT_ADDRESS=10.0.0.11:7500\n"), "{agent}");
    let network = &file("/etc/systemd/network/10-basalt.network").content;
    assert!(
        network.contains("Name=eno1") && network.contains("Address=10.0.0.11/24"),
        "{network}"
    );
    assert!(
        network.contains("Gateway=10.0.0.1") && network.contains("DNS=9.9.9.9"),
        "{network}"
    );
    assert_eq!(file("/root/.ssh/authorized_keys").mode, 0o600);
    assert!(
        !plan
            .files
            .iter()
            .any(|f| f.path.ends_with("join-token.env")),
        "a create node makes its token at first boot"
    );
    let shown = plan.describe();
    assert!(
        !shown.contains("$y$"),
        "the plan never prints the password hash"
    );
}

#[test]
fn a_join_node_gets_its_token_and_no_control_plane() {
    let answers = AnswerFile::load(&here().join("tests/answers/good-join-dhcp.yaml")).unwrap();
    let plan = basalt_installer::plan(&answers, &machine(), &|p| p.to_owned()).unwrap();
    assert!(!plan.units.contains(&"basalt-control.service"));
    let token = plan
        .files
        .iter()
        .find(|f| f.path.ends_with("join-token.env"))
        .unwrap();
    assert_eq!(token.mode, 0o600);
    assert_eq!(token.content, "BASALT_JOIN_TOKEN=join-n2.4f9c2a7d1e8b\n");
    assert!(
        !plan.describe().contains("4f9c2a7d1e8b"),
        "the plan never prints the token"
    );
    assert_eq!(
        plan.install_disk.path,
        Path::new("/dev/vda"),
        "serial sys-*"
    );
    assert!(matches!(plan.pool, PoolPlan::File { size_gib: 10, .. }));
}

#[test]
fn a_disk_filter_that_matches_nothing_names_the_field_and_every_disk() {
    let mut answers = AnswerFile::load(&here().join("tests/answers/good-join-dhcp.yaml")).unwrap();
    answers.install_disk.serial = None;
    answers.install_disk.min_size_gib = Some(500);
    let err = basalt_installer::plan(&answers, &machine(), &|p| p.to_owned())
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("install_disk: no disk matches"), "{err}");
    assert!(err.contains("/dev/sr0: the boot medium"), "{err}");
    assert!(
        err.contains("/dev/vdc: 200 GiB is below min_size_gib 500"),
        "{err}"
    );
}

#[test]
fn bad_answer_files_name_their_fields() {
    let mut checked = 0;
    for path in files(&here().join("tests/answers"), "bad-") {
        let text = std::fs::read_to_string(&path).unwrap();
        let expected: Vec<(&str, &str)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .map(|l| l.split_once(": ").expect("# expect: FIELD: TEXT"))
            .collect();
        assert!(
            !expected.is_empty(),
            "{} has no # expect line",
            path.display()
        );
        let err = AnswerFile::parse(&text)
            .err()
            .unwrap_or_else(|| panic!("{} should be refused", path.display()));
        let errors: &[FieldError] = err.field_errors();
        for (field, reason) in &expected {
            assert!(
                errors
                    .iter()
                    .any(|e| e.field == *field && e.reason.contains(reason)),
                "{}: expected `{field}: {reason}...`, got:\n{err}",
                path.display()
            );
        }
        assert_eq!(
            errors.len(),
            expected.len(),
            "{}: unexpected extra errors:\n{err}",
            path.display()
        );
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} bad files");
}
