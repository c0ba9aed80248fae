//! RoundProgress reports of an RDMA source, in any order and with any values: rounds complete
//! one after another from 0, an out-of-sequence report is an error (never a panic), and the
//! page count never wraps.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livemig_engine::protocol::RoundSequence;

fuzz_target!(|data: &[u8]| {
    let mut seq = RoundSequence::default();
    for report in data.chunks_exact(17) {
        let round = u64::from_le_bytes(report[0..8].try_into().expect("8 bytes"));
        let pages = u64::from_le_bytes(report[8..16].try_into().expect("8 bytes"));
        let complete = report[16] & 1 == 1;
        let before = seq;
        match seq.progress(round, pages, complete) {
            Ok(()) => {
                assert_eq!(Some(round), before.completed().map_or(Some(0), |c| c.checked_add(1)));
                if complete {
                    assert_eq!(seq.completed(), Some(round));
                    assert!(seq.pages() >= before.pages());
                } else {
                    assert_eq!(seq, before);
                }
            }
            Err(_) => assert_eq!(seq, before, "a refused report changed the sequence"),
        }
    }
});
