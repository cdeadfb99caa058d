//! From a cluster VM object to the domain this node defines for it.
//!
//! Everything node-specific is fixed here, the same on every node, so a
//! VM defined on one node migrates to any other without rewriting its
//! XML: disks are NBD exports of the node's storage process at
//! [`NBD_HOST`]:[`NBD_PORT`], named after the VM's uid and the disk
//! ([`crate::storage::disk_volume`]) and made by the volume reconciler; NICs are taps whose
//! names and MACs derive from the VM's uid and the NIC's index, made
//! before the domain starts by the agent's network reconciler
//! ([`crate::network`]) when it runs ([`DomainPolicy::agent_taps`]); the
//! cloud-init seed, when the spec has one, is a read-only CD-ROM on the
//! seed volume ([`crate::storage::seed::seed_volume`]). A VM with a
//! kernel boots it directly; one without boots from its first disk.

use std::path::Path;

use basalt_api::{KernelBoot, Vm};
use uuid::Uuid;

use crate::compute::domain::{Accel, Boot, DomainSpec, EthernetNic, MacAddr, NbdCdrom, NbdDisk};

/// Where QEMU finds the node's storage process (inside the node).
pub const NBD_HOST: &str = "127.0.0.1";
/// The storage process's NBD port.
pub const NBD_PORT: u16 = 10809;

/// How this node turns VMs into domains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainPolicy {
    /// Prefix of every Basalt domain name on this hypervisor.
    pub prefix: String,
    /// TCG or KVM.
    pub accel: Accel,
    /// The cluster-wide CPU model, so any VM can migrate anywhere.
    pub cpu_model: Option<String>,
    /// The agent's network reconciler makes the NICs' taps
    /// ([`crate::network`], `basaltd agent --network`): domains use them
    /// as they are (`managed='no'`). `false`: libvirt makes the taps.
    pub agent_taps: bool,
}

/// A VM cannot be run as it is declared.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("vm {vm}: {field}: {reason}")]
pub struct MappingError {
    /// The VM.
    pub vm: String,
    /// The field of its spec.
    pub field: String,
    /// Why.
    pub reason: String,
}

/// The domain for `vm`, its serial console written under `console_dir`.
pub fn domain_spec(
    vm: &Vm,
    policy: &DomainPolicy,
    console_dir: &Path,
) -> Result<DomainSpec, MappingError> {
    let name = &vm.meta.name;
    let err = |field: &str, reason: &str| MappingError {
        vm: name.clone(),
        field: field.into(),
        reason: reason.into(),
    };
    let boot = match &vm.spec.kernel {
        Some(KernelBoot {
            kernel,
            initrd,
            cmdline,
        }) => Boot::Kernel {
            kernel: kernel.into(),
            initrd: initrd.into(),
            cmdline: cmdline.clone(),
        },
        None if vm.spec.disks.is_empty() => {
            return Err(err(
                "spec.kernel",
                "the VM has neither a kernel nor a disk to boot from",
            ));
        }
        None => Boot::Disk,
    };
    let uuid = vm_uuid(&vm.meta.uid);
    let disks = vm
        .spec
        .disks
        .iter()
        .enumerate()
        .map(|(i, disk)| {
            Ok(NbdDisk {
                target_dev: disk_dev(i).ok_or_else(|| err("spec.disks", "at most 26 disks"))?,
                host: NBD_HOST.to_owned(),
                port: NBD_PORT,
                export_name: disk.storage_name(&vm.meta.uid),
            })
        })
        .collect::<Result<_, MappingError>>()?;
    let nics = vm
        .spec
        .nics
        .iter()
        .enumerate()
        .map(|(i, nic)| {
            let mac = match &nic.mac {
                Some(mac) => mac
                    .parse()
                    .map_err(|_| err(&format!("spec.nics[{i}].mac"), "not a MAC address"))?,
                None => derived_mac(uuid, i),
            };
            Ok(EthernetNic {
                tap: tap_name(uuid, i),
                mac,
                precreated: policy.agent_taps,
            })
        })
        .collect::<Result<_, MappingError>>()?;
    Ok(DomainSpec {
        name: domain_name(policy, name),
        uuid,
        accel: policy.accel,
        memory_mib: vm.spec.memory_mib,
        vcpus: vm.spec.cpus,
        cpu_model: policy.cpu_model.clone(),
        boot,
        disks,
        seed: crate::storage::seed::seed_volume(vm).map(|export_name| NbdCdrom {
            host: NBD_HOST.to_owned(),
            port: NBD_PORT,
            export_name,
        }),
        nics,
        serial_log: console_dir.join(format!("{name}.log")),
    })
}

/// The domain UUID of a VM: its uid when that is a UUID (the control
/// plane's are), else one derived from it, stable everywhere.
pub fn vm_uuid(uid: &str) -> Uuid {
    Uuid::parse_str(uid).unwrap_or_else(|_| Uuid::new_v5(&Uuid::NAMESPACE_OID, uid.as_bytes()))
}

/// The domain name of VM `vm` under `policy`.
pub fn domain_name(policy: &DomainPolicy, vm: &str) -> String {
    format!("{}{vm}", policy.prefix)
}

/// The guest device of the VM's disk number `index` (`vda`, `vdb`, …),
/// `None` past the 26th.
pub fn disk_dev(index: usize) -> Option<String> {
    let letter = u8::try_from(index).ok().filter(|i| *i < 26)?;
    Some(format!("vd{}", char::from(b'a' + letter)))
}

/// The tap of NIC `index`: `vm` + 8 hex digits of the VM's UUID + `-` +
/// index, at most 15 bytes; the same on every node.
pub fn tap_name(uuid: Uuid, index: usize) -> String {
    format!("vm{}-{index}", &uuid.simple().to_string()[..8])
}

/// The MAC of NIC `index` when the spec names none, from the VM's UUID:
/// [`basalt_api::Nic::default_mac`], the same the control plane's IPAM
/// writes into the NIC's endpoint.
pub fn derived_mac(uuid: Uuid, index: usize) -> MacAddr {
    MacAddr(basalt_api::Nic::default_mac(&uuid.to_string(), index))
}

#[cfg(test)]
mod tests {
    use basalt_api::{Disk, Nic, ObjectMeta, VmSpec};

    use super::*;

    fn policy() -> DomainPolicy {
        DomainPolicy {
            prefix: "basalt-".into(),
            accel: Accel::Tcg,
            cpu_model: Some("qemu64".into()),
            agent_taps: true,
        }
    }

    fn vm() -> Vm {
        let mut meta = ObjectMeta::named("web-1");
        meta.uid = "5f0c6a3e-8d4b-4b8e-9a77-0d2c1f3e4a5b".into();
        Vm {
            meta,
            spec: VmSpec {
                cpus: 2,
                memory_mib: 256,
                running: true,
                disks: vec![Disk {
                    name: "root".into(),
                    size_bytes: 1 << 30,
                    image: None,
                    replicas: 2,
                    source_volume: None,
                    attach: None,
                    attached_storage_name: None,
                    added_at_epoch: None,
                    protocol: Default::default(),
                }],
                nics: vec![
                    Nic {
                        network: "default".into(),
                        mac: None,
                        ip: None,
                    },
                    Nic {
                        network: "default".into(),
                        mac: Some("52:54:00:aa:bb:cc".into()),
                        ip: None,
                    },
                ],
                kernel: Some(KernelBoot {
                    kernel: "/boot/vmlinuz".into(),
                    initrd: "/boot/initrd.img".into(),
                    cmdline: "console=ttyS0".into(),
                }),
                ..VmSpec::default()
            },
            ..Vm::default()
        }
    }

    #[test]
    fn the_domain_is_the_same_on_every_node_and_valid() {
        let spec = domain_spec(&vm(), &policy(), Path::new("/var/log/basalt")).unwrap();
        assert_eq!(spec.name, "basalt-web-1");
        assert_eq!(
            spec.uuid.to_string(),
            "5f0c6a3e-8d4b-4b8e-9a77-0d2c1f3e4a5b"
        );
        assert_eq!((spec.vcpus, spec.memory_mib), (2, 256));
        assert_eq!(
            spec.disks[0].export_name,
            crate::storage::disk_volume("5f0c6a3e-8d4b-4b8e-9a77-0d2c1f3e4a5b", "root")
        );
        assert_eq!(
            (spec.disks[0].host.as_str(), spec.disks[0].port),
            (NBD_HOST, NBD_PORT)
        );
        assert_eq!(spec.nics[0].tap, "vm5f0c6a3e-0");
        assert_eq!(spec.nics[1].tap, "vm5f0c6a3e-1");
        assert_eq!(spec.nics[1].mac.to_string(), "52:54:00:aa:bb:cc");
        assert_ne!(spec.nics[0].mac, derived_mac(spec.uuid, 1));
        assert!(!spec.nics[0].mac.is_multicast());
        // The MAC the control plane's IPAM writes into the NIC's endpoint.
        assert_eq!(
            spec.nics[0].mac.0,
            basalt_api::Nic::default_mac(&vm().meta.uid, 0)
        );
        spec.validate().unwrap();
        assert_eq!(
            spec,
            domain_spec(&vm(), &policy(), Path::new("/var/log/basalt")).unwrap()
        );
    }

    #[test]
    fn without_a_kernel_the_first_disk_boots() {
        let mut v = vm();
        v.spec.kernel = None;
        let spec = domain_spec(&v, &policy(), Path::new("/l")).unwrap();
        assert_eq!(spec.boot, Boot::Disk);
        let xml = spec.to_xml().unwrap();
        assert!(xml.contains("<boot dev=\"hd\"/>"), "{xml}");
        assert!(!xml.contains("<kernel>"), "{xml}");
    }

    #[test]
    fn a_cloud_init_section_attaches_its_seed() {
        let mut v = vm();
        assert_eq!(
            domain_spec(&v, &policy(), Path::new("/l")).unwrap().seed,
            None
        );
        v.spec.cloud_init = Some(basalt_api::CloudInit {
            user_data: "#cloud-config\n".into(),
            ..Default::default()
        });
        let spec = domain_spec(&v, &policy(), Path::new("/l")).unwrap();
        let seed = spec.seed.clone().expect("a seed");
        assert_eq!(
            Some(seed.export_name.clone()),
            crate::storage::seed::seed_volume(&v)
        );
        assert_eq!((seed.host.as_str(), seed.port), (NBD_HOST, NBD_PORT));
        let xml = spec.to_xml().unwrap();
        assert!(xml.contains("device=\"cdrom\""), "{xml}");
        assert!(xml.contains(&seed.export_name), "{xml}");
    }

    #[test]
    fn what_cannot_run_is_named() {
        let mut v = vm();
        v.spec.kernel = None;
        v.spec.disks.clear();
        assert_eq!(
            domain_spec(&v, &policy(), Path::new("/l"))
                .unwrap_err()
                .field,
            "spec.kernel"
        );
        let mut v = vm();
        v.spec.nics[1].mac = Some("zz".into());
        assert_eq!(
            domain_spec(&v, &policy(), Path::new("/l"))
                .unwrap_err()
                .field,
            "spec.nics[1].mac"
        );
    }

    #[test]
    fn a_uid_that_is_not_a_uuid_still_maps_stably() {
        assert_eq!(vm_uuid("uid-7"), vm_uuid("uid-7"));
        assert_ne!(vm_uuid("uid-7"), vm_uuid("uid-8"));
    }
}
