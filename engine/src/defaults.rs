//! Defaults and limits, defined once: the CLI, the control socket, the protocol and the
//! engine all take them from here.

use std::time::Duration;

/// Size of a guest page, in bytes.
pub const PAGE_SIZE: u64 = 4096;
/// Stop-and-copy once the predicted downtime is at most this many milliseconds.
pub const DOWNTIME_LIMIT_MS: u64 = 300;
/// Stop-and-copy after at most this many pre-copy rounds.
pub const MAX_ROUNDS: u32 = 30;
/// Consecutive pre-copy rounds that do not shrink the dirty set (with no throttle left to
/// add) before the source decides: stop within the downtime cap, or give up.
pub const STALL_ROUNDS: u32 = 2;
/// How long `migrate --plan` watches the guest's writes, ms.
pub const PLAN_WINDOW_MS: u64 = 2000;
/// Unless given, the hard cap on the predicted downtime is this many times the limit.
pub const MAX_DOWNTIME_FACTOR: u64 = 10;
/// TCP data connections of a migration unless asked otherwise.
pub const CHANNELS: u16 = 1;
/// RDMA queue pairs per rail (NIC or port) unless asked otherwise: two, as SMB Multichannel
/// opens two SMB Direct connections per RDMA interface — one queue pair leaves a NIC's (or
/// soft-RoCE's) second processing context idle.
pub const RDMA_QPS_PER_RAIL: u16 = 2;
/// Most data channels (TCP connections or RDMA queue pairs) of one migration.
pub const MAX_CHANNELS: u16 = 64;
/// Most vCPUs a VM configuration may declare.
pub const MAX_VCPUS: u32 = 256;
/// Largest total RAM a VM may declare (1 TiB): a bound on what a peer can make us allocate.
pub const MAX_RAM_BYTES: u64 = 1 << 40;
/// Cache of last-sent pages for delta encoding, in MiB.
pub const DELTA_CACHE_MIB: u64 = 64;
/// Longest wait for any single answer of the peer.
pub const TIMEOUT: Duration = Duration::from_secs(60);
