//! The replication protocol's parsers on arbitrary bytes, as a replica
//! reads a peer's stream (a hello, then frames) and a primary reads its
//! replica's (a hello reply, then acks). They must never panic, and what
//! they accept encodes back to what they read.

#![no_main]

use basalt_sds::replication::wire::{Ack, Frame, Hello, HelloReply};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut peer = data;
    if let Ok(hello) = Hello::read(&mut peer) {
        assert_eq!(Hello::read(&mut hello.encode().as_slice()).ok(), Some(hello));
        while let Ok(frame) = Frame::read(&mut peer) {
            let mut again = Vec::new();
            frame.write_to(&mut again).expect("encode into memory");
            assert_eq!(Frame::read(&mut again.as_slice()).ok(), Some(frame));
        }
    }
    let mut replica = data;
    if HelloReply::read(&mut replica).is_ok() {
        while let Ok(ack) = Ack::read(&mut replica) {
            assert_eq!(Ack::read(&mut ack.encode().as_slice()).ok(), Some(ack));
        }
    }
});
