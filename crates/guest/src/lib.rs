//! Warren's guest side of a VM workspace. The binary (`warren-guest`, `main.rs`) is the VM's
//! PID 1; this library holds what the host shares with it: the vsock protocol ([`proto`]) and
//! how a workspace's users are read ([`accounts`]), interfaces set by ioctl ([`netif`]).

pub mod accounts;
pub mod modules;
pub mod netif;
pub mod proto;
