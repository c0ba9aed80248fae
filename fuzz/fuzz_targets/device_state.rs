//! Device-state sections from a peer, decoded and checked as a KVM VM's restore would.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livemig_engine::protocol::{Message, MessageType};
use livemig_engine::vm::kvm::check_sections;

fuzz_target!(|data: &[u8]| {
    if let Ok(Message::DeviceState { sections, .. }) =
        Message::decode(MessageType::DeviceState as u16, data)
    {
        for vcpus in [1, 2] {
            let _ = check_sections(&sections, vcpus, 4096);
        }
    }
});
