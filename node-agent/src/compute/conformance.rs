//! The one suite every [`Compute`] implementation passes: the simulated
//! one in unit tests, libvirt against a private libvirtd in integration
//! tests. It drives a domain through its whole life and checks what the
//! reconciler relies on, idempotence first.

use std::path::PathBuf;
use std::time::Duration;

use uuid::Uuid;

use crate::compute::domain::{Accel, Boot, DomainSpec};
use crate::compute::{Compute, ComputeError, PowerState};

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
