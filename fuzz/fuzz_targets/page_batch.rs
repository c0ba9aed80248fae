//! Data-channel bytes from a peer: page batches (raw, encoded, zero) and markers, received
//! into 1 MiB of registered memory through a real socket, in clear or on a sealed channel
//! (first byte). What lands is bookkept as the destination does — per-page hashes updated for
//! data, zero ranges cleared where a page was not zero — and the hashes must then describe
//! the memory exactly.
#![no_main]

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use livemig_engine::digest::PageHashes;
use livemig_engine::memory::{RamLayout, RamRegionSpec};
use livemig_transport::seal::Opener;
use livemig_transport::tcp::{DataReceiver, Landed};
use livemig_transport::{MappedRegion, MemoryMap};

const BASE: u64 = 0x10_0000;
const LEN: u64 = 1 << 20;

struct Mem(Vec<u8>);

fn listener() -> &'static TcpListener {
    static L: OnceLock<TcpListener> = OnceLock::new();
    L.get_or_init(|| TcpListener::bind("127.0.0.1:0").expect("bind"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let l = listener();
    let mut tx = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (rx, _) = l.accept().expect("accept");
    let _ = tx.write_all(bytes);
    drop(tx);
    let mut mem = Box::new(Mem(vec![0u8; LEN as usize]));
    let host = mem.0.as_mut_ptr();
    // SAFETY: `mem` lives until the end of this input, after the map is dropped.
    let map = unsafe {
        MemoryMap::new(vec![MappedRegion { addr: BASE, host, len: LEN }], Arc::new(()))
    };
    let layout = RamLayout { regions: vec![RamRegionSpec { gpa: BASE, size: LEN }] };
    let hashes = PageHashes::new_zeroed(&layout);
    let mut rx = DataReceiver::new(rx).expect("receiver");
    if mode & 1 == 1 {
        rx.open_with(Opener::new(&[mode; 32]));
    }
    let mut landed = Landed::default();
    let mut any = false;
    for _ in 0..64 {
        landed.clear();
        if rx.recv(&map, &mut landed).is_err() {
            break;
        }
        for &(a, len) in landed.data.iter().chain(&landed.zero) {
            assert!(a >= BASE && a + len <= BASE + LEN, "landed outside memory");
            any = true;
        }
        for &(a, len) in &landed.data {
            // SAFETY: in bounds (checked above); nothing writes `mem` meanwhile.
            unsafe { hashes.update(a, len, host.add((a - BASE) as usize)) };
        }
        for &(a, len) in &landed.zero {
            hashes.clear_nonzero(a, len, |start, n| {
                // SAFETY: a sub-range of the zero range, in bounds (checked above).
                unsafe { std::ptr::write_bytes(host.add((start - BASE) as usize), 0, n as usize) };
            });
        }
    }
    drop(map);
    if any {
        let fresh = PageHashes::new_zeroed(&layout);
        // SAFETY: `mem` is live and not written meanwhile.
        unsafe { fresh.update(BASE, LEN, host) };
        assert_eq!(hashes.digest(), fresh.digest(), "hashes do not describe the memory");
    }
    drop(mem);
});
