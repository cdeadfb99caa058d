//! IP address management for VM networks: a pure library. Lands with the
//! control-plane or network issue.
