//! livemig transport: moves byte extents of registered memory and framed messages.
//!
//! The transport knows nothing of VMs, rounds or dirty logs. It offers:
//! - [`MemoryMap`]: memory registered with the transport (guest RAM on either side), addressed
//!   by a 64-bit address (the guest-physical address for livemig) and bounds-checked;
//! - [`frame`]: length-prefixed control messages with a hard size cap;
//! - [`tcp`]: data channels that send extents of registered memory straight from it
//!   (`writev`, no staging copy) and receive them straight into it (`readv`), interleaved
//!   with opaque markers that the engine uses for round barriers;
//! - [`codec`]: how pages travel on a TCP channel (raw, zero markers, LZ4, zstd, delta, and
//!   `auto`, which picks per chunk);
//! - [`rdma`] (feature `rdma`, on by default): one-sided RDMA WRITEs from registered source
//!   memory into registered destination memory over reliable-connected queue pairs, on the
//!   host's libibverbs.
//!
//! ```
//! use std::sync::Arc;
//! use livemig_transport::{codec, tcp, MappedRegion, MemoryMap};
//!
//! let mut src = vec![7u8; 8192];
//! let mut dst = vec![0u8; 8192];
//! // SAFETY: both buffers outlive the maps and nothing else writes them meanwhile.
//! let (src_map, dst_map) = unsafe {
//!     (
//!         MemoryMap::new(vec![MappedRegion { addr: 0, host: src.as_mut_ptr(), len: 8192 }], Arc::new(())),
//!         MemoryMap::new(vec![MappedRegion { addr: 0, host: dst.as_mut_ptr(), len: 8192 }], Arc::new(())),
//!     )
//! };
//! let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
//! let addr = listener.local_addr().unwrap();
//! let t = std::thread::spawn(move || {
//!     let mut tx = tcp::DataSender::new(std::net::TcpStream::connect(addr).unwrap()).unwrap();
//!     let mut enc = codec::Encoder::new(codec::Mode::None, None);
//!     tx.send_encoded(&src_map, &[(4096, 4096)], &mut enc, 0).unwrap();
//!     tx.send_marker(1).unwrap();
//! });
//! let mut rx = tcp::DataReceiver::new(listener.accept().unwrap().0).unwrap();
//! let mut got = tcp::Landed::default();
//! assert!(matches!(rx.recv(&dst_map, &mut got).unwrap(), tcp::Received::Extents { bytes: 4096 }));
//! assert!(matches!(rx.recv(&dst_map, &mut got).unwrap(), tcp::Received::Marker(1)));
//! t.join().unwrap();
//! assert_eq!(got.data, vec![(4096, 4096)]);
//! drop(dst_map);
//! assert_eq!(&dst[4096..], &src[4096..]);
//! assert!(dst[..4096].iter().all(|&b| b == 0));
//! ```

pub mod codec;
pub mod frame;
mod memory_map;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod seal;
pub mod tcp;

pub use memory_map::{FileBacking, MappedRegion, MemoryMap, Target};

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The socket failed (read, write, connect).
    #[error("{op} on {peer}: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The peer address, when known.
        peer: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The peer closed the connection.
    #[error("peer {peer} closed the connection {during}")]
    Closed {
        /// The peer address.
        peer: String,
        /// What we were doing.
        during: &'static str,
    },
    /// The peer sent bytes that break the framing rules.
    #[error("malformed data from {peer}: {reason}")]
    Malformed {
        /// The peer address.
        peer: String,
        /// What was wrong.
        reason: String,
    },
    /// An extent falls outside registered memory.
    #[error("extent {addr:#x}+{len:#x} is outside registered memory")]
    OutOfBounds {
        /// Start address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The RDMA transport failed.
    #[cfg(feature = "rdma")]
    #[error(transparent)]
    Rdma(#[from] rdma::RdmaError),
}

/// 32 random bits from the kernel (falls back to the clock).
#[cfg(feature = "rdma")]
fn random_u32() -> u32 {
    let mut v = 0u32;
    // SAFETY: getrandom writes at most 4 bytes into `v`, which is valid for 4 bytes.
    let n = unsafe { libc::getrandom((&raw mut v).cast(), 4, 0) };
    if n != 4 {
        v = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0x5eed);
    }
    v
}
