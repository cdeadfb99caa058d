//! The one suite every [`Compute`] implementation passes: the simulated
//! one in unit tests, libvirt against a private libvirtd in integration
//! tests. It drives a domain through its whole life and checks what the
//! reconciler relies on, idempotence first. [`run_migration`] moves a
//! guest between two hypervisors of one backend: refused, aborted,
//! pre-copy there and post-copy back, one running copy at every step.

use std::path::PathBuf;
use std::time::Duration;

use uuid::Uuid;

use crate::compute::domain::{Accel, Boot, DomainSpec, NbdDisk};
use crate::compute::{
    Compute, ComputeError, MigrateRequest, MigrationControl, MigrationProgress, PowerState,
};

/// A small valid spec named `name` with no disks or NICs and placeholder
/// boot files: enough for a simulated hypervisor, not for a real one.
pub fn spec(name: &str) -> DomainSpec {
    DomainSpec {
        name: name.to_owned(),
        uuid: Uuid::new_v4(),
        accel: Accel::Tcg,
        memory_mib: 64,
        vcpus: 1,
        cpu_model: None,
        boot: Boot::Kernel {
            kernel: PathBuf::from("/boot/vmlinuz"),
            initrd: PathBuf::from("/boot/initrd.img"),
            cmdline: "console=ttyS0".to_owned(),
        },
        disks: Vec::new(),
        seed: None,
        nics: Vec::new(),
        serial_log: PathBuf::from("/dev/null"),
    }
}

fn state(compute: &dyn Compute, name: &str) -> Option<PowerState> {
    compute.status(name).expect("status").map(|s| s.state)
}

/// Runs the suite on `compute` with `spec` (which must be startable on
/// it); `grace` bounds the graceful stop. Panics with what failed.
pub fn run(compute: &dyn Compute, spec: DomainSpec, grace: Duration) {
    let name = spec.name.clone();

    // Nothing there yet; cleaning up nothing is fine.
    assert_eq!(
        state(compute, &name),
        None,
        "{name} exists before the suite"
    );
    compute
        .undefine(&name)
        .expect("undefining a missing domain is not an error");
    assert!(matches!(
        compute.start(&name),
        Err(ComputeError::NotDefined { .. })
    ));

    // Define, twice: the second is a no-op.
    compute.define(&spec).expect("define");
    compute.define(&spec).expect("defining the same spec again");
    let status = compute.status(&name).expect("status").expect("defined");
    assert_eq!(
        (status.uuid, status.state),
        (spec.uuid, PowerState::ShutOff)
    );
    assert!(
        compute
            .list()
            .expect("list")
            .iter()
            .any(|d| d.name == name && d.uuid == spec.uuid)
    );

    // Another domain may not take the name.
    let mut impostor = spec.clone();
    impostor.uuid = Uuid::new_v4();
    assert!(
        matches!(
            compute.define(&impostor),
            Err(ComputeError::UuidMismatch { .. })
        ),
        "a second UUID under the same name must be refused"
    );

    // An invalid spec is refused, naming the field.
    let mut bad = spec.clone();
    bad.memory_mib = 0;
    match compute.define(&bad) {
        Err(err @ ComputeError::Spec { .. }) => {
            let text = format!(
                "{err}: {}",
                std::error::Error::source(&err)
                    .map(ToString::to_string)
                    .unwrap_or_default()
            );
            assert!(text.contains("memory_mib"), "{text}");
        }
        other => panic!("an invalid spec must be refused, got {other:?}"),
    }

    // Start, twice.
    compute.start(&name).expect("start");
    compute.start(&name).expect("starting a running domain");
    assert_eq!(state(compute, &name), Some(PowerState::Running));

    // Graceful-then-forced stop ends with the domain stopped either way.
    compute.stop(&name, grace).expect("stop");
    assert!(!state(compute, &name).expect("still defined").is_active());

    // Start again, then destroy, twice.
    compute.start(&name).expect("restart");
    assert_eq!(state(compute, &name), Some(PowerState::Running));
    compute.destroy(&name).expect("destroy");
    compute.destroy(&name).expect("destroying a stopped domain");
    assert_eq!(state(compute, &name), Some(PowerState::ShutOff));

    // Gone, twice.
    compute.undefine(&name).expect("undefine");
    compute.undefine(&name).expect("undefining again");
    assert_eq!(state(compute, &name), None);
    assert!(!compute.list().expect("list").iter().any(|d| d.name == name));
}

/// A hypervisor in a migration suite: the backend and the URI the other
/// one reaches it at.
#[derive(Clone, Copy)]
pub struct Peer<'a> {
    /// The backend.
    pub compute: &'a dyn Compute,
    /// Its URI as the other hypervisor sees it.
    pub uri: &'a str,
}

impl std::fmt::Debug for Peer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("uri", &self.uri)
            .finish_non_exhaustive()
    }
}

/// Runs the migration suite: `spec` (startable on both) is started on
/// `a`; a migration to an unreachable hypervisor and an aborted one leave
/// it running on `a` only; a pre-copy migration moves it to `b`, and a
/// post-copy one (started while the copy is slowed down) back to `a`,
/// each leaving exactly one running copy with the same UUID. Panics with
/// what failed; removes the domain at the end.
pub fn run_migration(a: Peer<'_>, b: Peer<'_>, spec: DomainSpec) {
    let name = spec.name.clone();
    let only_on = |here: &dyn Compute, there: &dyn Compute, what: &str| {
        let status = here
            .status(&name)
            .expect("status")
            .unwrap_or_else(|| panic!("{what}: the domain is gone"));
        assert_eq!(
            (status.uuid, status.state),
            (spec.uuid, PowerState::Running),
            "{what}"
        );
        assert_eq!(
            there.status(&name).expect("status"),
            None,
            "{what}: the other hypervisor holds nothing"
        );
    };
    a.compute.define(&spec).expect("define");
    a.compute.start(&name).expect("start");

    let request = |uri: &str| MigrateRequest {
        target_uri: uri.to_owned(),
        allow_post_copy: false,
        bandwidth_mib_s: None,
        copy_disks: Vec::new(),
    };
    let mut go_on = |_: &MigrationProgress| MigrationControl::Continue;
    assert!(matches!(
        a.compute
            .migrate("no-such-domain", &request(b.uri), &mut go_on),
        Err(ComputeError::NotDefined { .. })
    ));
    let nowhere = request("qemu+tcp://127.0.0.1:1/system");
    assert!(
        a.compute.migrate(&name, &nowhere, &mut go_on).is_err(),
        "a migration to an unreachable hypervisor fails"
    );
    only_on(a.compute, b.compute, "after a refused migration");

    // Slowed down, then aborted once the copy is under way.
    let slow = MigrateRequest {
        bandwidth_mib_s: Some(1),
        ..request(b.uri)
    };
    let mut asked = 0;
    let aborted = a.compute.migrate(&name, &slow, &mut |p| {
        if p.data_total > 0 && p.data_remaining > 0 {
            asked += 1;
            MigrationControl::Abort
        } else {
            MigrationControl::Continue
        }
    });
    assert!(
        matches!(aborted, Err(ComputeError::MigrationAborted { .. })),
        "an aborted migration says so: {aborted:?}"
    );
    assert!(asked > 0, "progress was reported before the abort");
    only_on(a.compute, b.compute, "after an aborted migration");

    // Pre-copy to b.
    let mut reports = 0;
    a.compute
        .migrate(&name, &request(b.uri), &mut |_| {
            reports += 1;
            MigrationControl::Continue
        })
        .expect("a live migration to b");
    only_on(b.compute, a.compute, "after migrating to b");

    // Post-copy back to a: slowed so that pre-copy cannot finish first.
    let post_copy = MigrateRequest {
        allow_post_copy: true,
        bandwidth_mib_s: Some(1),
        ..request(a.uri)
    };
    let mut switched = false;
    b.compute
        .migrate(&name, &post_copy, &mut |p| {
            switched |= p.post_copy;
            if p.data_total > 0 {
                MigrationControl::PostCopy
            } else {
                MigrationControl::Continue
            }
        })
        .expect("a post-copy migration back to a");
    assert!(switched, "the migration switched to post-copy");
    only_on(a.compute, b.compute, "after migrating back in post-copy");

    a.compute.destroy(&name).expect("destroy");
    a.compute.undefine(&name).expect("undefine");
    assert_eq!(a.compute.status(&name).expect("status"), None);
}

/// Runs the disk-plugging suite: `spec` (startable, without disks) runs
/// with `disks[0]` as `vda`; `ready` returns once the guest can take and
/// give back devices (a real one has booted). A definition adding
/// `disks[1]` plugs it in at once as `vdb`; defining it again changes
/// nothing; one dropping `disks[0]` (so that `disks[1]` is first in the
/// spec, `vda` there) unplugs it within `grace`, and `disks[1]` keeps the
/// device it runs as. Once stopped, the domain shows its definition's
/// disks. Both disks' exports must be served. Panics with what failed;
/// removes the domain at the end.
pub fn run_disk_plugging(
    compute: &dyn Compute,
    mut spec: DomainSpec,
    disks: [NbdDisk; 2],
    ready: &dyn Fn(),
    grace: Duration,
) {
    let name = spec.name.clone();
    let [first, second] = disks;
    let at = |disk: &NbdDisk, dev: &str| NbdDisk {
        target_dev: dev.to_owned(),
        ..disk.clone()
    };
    let sorted = |mut disks: Vec<NbdDisk>| {
        disks.sort_by(|a, b| a.target_dev.cmp(&b.target_dev));
        disks
    };
    let now = || sorted(compute.disks(&name).expect("disks"));

    spec.disks = vec![at(&first, "vda")];
    compute.define(&spec).expect("define");
    compute.start(&name).expect("start");
    ready();
    assert_eq!(now(), vec![at(&first, "vda")], "the running guest's disks");

    spec.disks.push(at(&second, "vdb"));
    compute.define(&spec).expect("a definition adding a disk");
    let both = vec![at(&first, "vda"), at(&second, "vdb")];
    assert_eq!(now(), both, "the added disk is plugged in at once");
    compute.define(&spec).expect("the same definition again");
    assert_eq!(now(), both, "defining the same disks changes nothing");

    spec.disks = vec![at(&second, "vda")];
    compute.define(&spec).expect("a definition dropping a disk");
    let deadline = std::time::Instant::now() + grace;
    while now() != vec![at(&second, "vdb")] {
        assert!(
            std::time::Instant::now() < deadline,
            "the dropped disk is unplugged within {grace:?}: the guest has {:?}",
            now()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        compute.status(&name).expect("status").map(|s| s.state),
        Some(PowerState::Running),
        "the guest runs on"
    );

    compute.destroy(&name).expect("destroy");
    assert_eq!(
        now(),
        vec![at(&second, "vda")],
        "a stopped domain shows its definition's disks"
    );
    compute.undefine(&name).expect("undefine");
}
