//! Control-connection bytes from a peer: frames, then messages (handshake, config, switchover)
//! in every protocol version a destination accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livemig_engine::protocol::{Message, MAX_CONTROL_FRAME, MIN_VERSION, VERSION};
use livemig_transport::frame;

fuzz_target!(|data: &[u8]| {
    // As a stream of frames.
    let mut r = data;
    while let Ok((kind, payload)) = frame::read_frame(&mut r, MAX_CONTROL_FRAME, "fuzz") {
        for version in MIN_VERSION..=VERSION {
            if let Ok(m) = Message::decode_version(kind, &payload, version) {
                // Decoding may normalise (invalid UTF-8 replaced, long strings cut when
                // re-encoded); once normalised, a message encodes and decodes to itself.
                let (k, p) = m.encode();
                let again = Message::decode(k, &p).expect("an encoded message decodes");
                assert_eq!(again.encode(), (k, p));
            }
        }
    }
    // As one message body of every type.
    if let Some((&k, rest)) = data.split_first() {
        for version in MIN_VERSION..=VERSION {
            let _ = Message::decode_version(u16::from(k % 32), rest, version);
        }
    }
});
