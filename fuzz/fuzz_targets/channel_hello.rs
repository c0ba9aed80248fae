//! The first bytes of a connection to a destination's data port: a ChannelHello and, in a
//! sealed session, the sealed record proving the session token. Only the session's own
//! channels may be accepted: in clear, one showing the token; sealed, none a fuzzer can make
//! (it would need the channel's key).
#![no_main]

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use livemig_engine::auth::{Key, SessionKeys};
use livemig_engine::session::channel_hello;

const TOKEN: u64 = 0x1234_5678_9abc_def0;

fn listener() -> &'static TcpListener {
    static L: OnceLock<TcpListener> = OnceLock::new();
    L.get_or_init(|| TcpListener::bind("127.0.0.1:0").expect("bind"))
}

fn keys() -> &'static SessionKeys {
    static K: OnceLock<SessionKeys> = OnceLock::new();
    K.get_or_init(|| {
        Key::new("5a".repeat(32).as_bytes())
            .expect("key")
            .session_keys(&[1; 32], &[2; 32], &[3; 32])
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let sealed = mode & 1 == 1;
    let l = listener();
    let mut tx = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (rx, _) = l.accept().expect("accept");
    let _ = tx.write_all(bytes);
    drop(tx);
    let accepted = channel_hello(
        rx,
        Duration::from_millis(200),
        TOKEN,
        sealed.then(keys),
    );
    if let Some((index, _)) = accepted {
        assert!(!sealed, "a forged sealed channel {index} was accepted");
        assert!(
            bytes.windows(8).any(|w| w == TOKEN.to_le_bytes()),
            "channel {index} accepted without the token"
        );
    }
});
