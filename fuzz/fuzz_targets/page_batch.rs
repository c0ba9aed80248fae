//! Data-channel bytes from a peer: page batches (raw, encoded, zero) and markers, received
//! into 1 MiB of registered memory through a real socket.
#![no_main]

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use livemig_transport::tcp::{DataReceiver, Landed};
use livemig_transport::{MappedRegion, MemoryMap};

struct Mem(Vec<u8>);

fn listener() -> &'static TcpListener {
    static L: OnceLock<TcpListener> = OnceLock::new();
    L.get_or_init(|| TcpListener::bind("127.0.0.1:0").expect("bind"))
}

fuzz_target!(|data: &[u8]| {
    let l = listener();
    let mut tx = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (rx, _) = l.accept().expect("accept");
    let _ = tx.write_all(data);
    drop(tx);
    let mut mem = Box::new(Mem(vec![0u8; 1 << 20]));
    let host = mem.0.as_mut_ptr();
    // SAFETY: `mem` lives until the end of this input, after the map is dropped.
    let map = unsafe {
        MemoryMap::new(vec![MappedRegion { addr: 0x10_0000, host, len: 1 << 20 }], Arc::new(()))
    };
    let mut rx = DataReceiver::new(rx).expect("receiver");
    let mut landed = Landed::default();
    for _ in 0..64 {
        landed.clear();
        if rx.recv(&map, &mut landed).is_err() {
            break;
        }
        for &(a, len) in landed.data.iter().chain(&landed.zero) {
            assert!(a >= 0x10_0000 && a + len <= 0x20_0000, "landed outside memory");
        }
    }
    drop(map);
    drop(mem);
});
