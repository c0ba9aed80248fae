//! Control-connection bytes from a peer: frames, then messages (handshake, config, switchover).
#![no_main]

use libfuzzer_sys::fuzz_target;
use livemig_engine::protocol::{Message, MAX_CONTROL_FRAME};
use livemig_transport::frame;

fuzz_target!(|data: &[u8]| {
    // As a stream of frames.
    let mut r = data;
    while let Ok((kind, payload)) = frame::read_frame(&mut r, MAX_CONTROL_FRAME, "fuzz") {
        if let Ok(m) = Message::decode(kind, &payload) {
            // What decodes must encode back to the same message.
            let (k, p) = m.encode();
            assert_eq!(Message::decode(k, &p).as_ref(), Ok(&m));
        }
    }
    // As one message body of every type.
    if let Some((&k, rest)) = data.split_first() {
        let _ = Message::decode(u16::from(k % 32), rest);
    }
});
