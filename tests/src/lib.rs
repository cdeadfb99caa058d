//! Test harness: namespaces, processes, private libvirtd, test guest.
//! Being written under the foundation issue.
