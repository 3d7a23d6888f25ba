//! `proto`: `bps_runtime::proto::Msg::decode` on arbitrary bytes (rendezvous and key set-up
//! messages, as a scheduler, server or worker receives them).
//!
//! Checked: nothing panics; whatever decodes re-encodes to exactly the input (the encoding is
//! canonical: fixed-size fields, length-prefixed strings, no trailing bytes allowed) and decodes
//! again to an equal message.
#![no_main]

use bps_runtime::proto::Msg;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Msg::decode(data) else {
        return;
    };
    let e = m.encode();
    assert_eq!(Msg::decode(&e).as_ref(), Ok(&m), "decode(encode(m)) != m");
    assert_eq!(e, data, "{m:?} re-encodes to other bytes than it was decoded from");
});
