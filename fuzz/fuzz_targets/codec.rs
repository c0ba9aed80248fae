//! Compressed and delta page bodies from a peer, decoded into a page-sized buffer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livemig_transport::codec::{decompress_into, delta_apply, Encoding, PAGE};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else { return };
    let mut out = vec![0u8; PAGE * (1 + usize::from(sel >> 4) % 4)];
    match sel % 3 {
        0 => {
            let _ = decompress_into(Encoding::Lz4, body, &mut out);
        }
        1 => {
            let _ = decompress_into(Encoding::Zstd, body, &mut out);
        }
        _ => {
            let _ = delta_apply(body, &mut out[..PAGE]);
        }
    }
});
