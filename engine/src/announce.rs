//! The network follows the VM: as it resumes on a new host, every NIC is announced so
//! switches learn its MAC behind the new port (the mission's stage 6). A destination sends
//! the first round once its decision to resume is recorded, just before the vCPUs start (as
//! QEMU does), and the later rounds while the guest runs.
//!
//! An announcement round sends, for every NIC, a RARP frame from the VM's MAC into its tap
//! (QEMU's announce-self) and asks the guest to announce itself where virtio allows it
//! (`VIRTIO_NET_F_GUEST_ANNOUNCE`: Linux sends gratuitous ARPs and unsolicited neighbour
//! advertisements). Rounds repeat with growing gaps — by default QEMU's: 5 rounds, the first
//! at once, then after 50, 150, 250 and 350 ms — so a frame lost to a switch that was still
//! busy is sent again.

use std::sync::Arc;
use std::time::Duration;

use crate::vm::{MigratableVm, VmError};

/// How a VM is announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnounceSettings {
    /// Rounds (0: none).
    pub count: u32,
    /// The first gap, ms.
    pub initial_ms: u64,
    /// How much each gap grows, ms.
    pub step_ms: u64,
    /// The largest gap, ms.
    pub max_ms: u64,
}

impl Default for AnnounceSettings {
    /// QEMU's announce-self parameters.
    fn default() -> Self {
        AnnounceSettings {
            count: 5,
            initial_ms: 50,
            step_ms: 100,
            max_ms: 550,
        }
    }
}

impl AnnounceSettings {
    /// The gap after round `i` (0-based).
    pub fn gap(&self, i: u32) -> Duration {
        Duration::from_millis(
            self.initial_ms
                .saturating_add(self.step_ms.saturating_mul(u64::from(i)))
                .min(self.max_ms),
        )
    }
}

/// Announces `vm`'s NICs: the first round now, the others in a background thread (which ends
/// after the last round or when the VM stops announcing). Returns how many NICs the first
/// round announced.
pub fn announce(vm: Arc<dyn MigratableVm>, s: AnnounceSettings) -> Result<usize, VmError> {
    let n = first_round(&*vm, s)?;
    if n > 0 {
        repeat(vm, s);
    }
    Ok(n)
}

/// The first round of [`announce`] alone: how many NICs it announced. A destination sends it
/// just before the vCPUs start and the others with [`repeat`] once they run.
pub fn first_round(vm: &dyn MigratableVm, s: AnnounceSettings) -> Result<usize, VmError> {
    if s.count == 0 {
        return Ok(0);
    }
    let n = vm.announce()?;
    tracing::info!(round = 0, nics = n, "announced");
    Ok(n)
}

/// The rounds after the first, each after its gap, in a background thread.
pub fn repeat(vm: Arc<dyn MigratableVm>, s: AnnounceSettings) {
    if s.count <= 1 {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("livemig-announce".into())
        .spawn(move || {
            for i in 1..s.count {
                std::thread::sleep(s.gap(i - 1));
                match vm.announce() {
                    Ok(0) => return,
                    Ok(n) => tracing::info!(round = i, nics = n, "announced"),
                    Err(e) => {
                        tracing::warn!("announcing the VM's NICs: {e}");
                        return;
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the announcement rounds: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_grow_like_qemus() {
        let s = AnnounceSettings::default();
        let gaps: Vec<u64> = (0..5).map(|i| s.gap(i).as_millis() as u64).collect();
        assert_eq!(gaps, [50, 150, 250, 350, 450]);
        assert_eq!(s.gap(100).as_millis(), 550);
    }
}
