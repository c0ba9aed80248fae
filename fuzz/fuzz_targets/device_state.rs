//! Device-state sections from a peer, decoded and checked as a restore would.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livemig_engine::protocol::Message;
use livemig_engine::vm::kvm::check_sections;

/// Frame kind of DeviceState (see engine/src/protocol.rs).
const T_DEVICE_STATE: u16 = 7;

fuzz_target!(|data: &[u8]| {
    if let Ok(Message::DeviceState { sections, .. }) = Message::decode(T_DEVICE_STATE, data) {
        for vcpus in [1, 2] {
            let _ = check_sections(&sections, vcpus, 4096);
        }
    }
});
