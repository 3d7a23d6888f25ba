//! `codec`: everything `bps_transport::codec` reads from the wire.
//!
//! Input layout (any bytes are valid; short inputs are zero-padded):
//!
//! | bytes | use |
//! | --- | --- |
//! | 0..40 | a frame header for `FrameHeader::decode` |
//! | 40..48 | `max_msg` (u64 LE, as usize) for that decode |
//! | 48 | `k`: number of decoder operations (`k & 31`) |
//! | 49..49+k | one byte per operation (which read, and its bound) |
//! | rest | the body the `Decoder` walks |
//!
//! Checked: nothing panics; a decoded header honours its bounds, re-encodes to the same bytes
//! (the reserved 36..40 aside) and decodes back to itself; an error names the first check that
//! fails; every successful read returns exactly the bytes at the decoder's position, consumes
//! exactly its size, honours its bound, and re-encoding the values read with `Encoder`
//! reproduces the consumed prefix; a failed fixed-size read consumes nothing; `finish` succeeds
//! exactly when nothing is left.
#![no_main]

use bps_transport::codec::{
    DecodeError, Decoder, Encoder, FrameHeader, FrameKind, HEADER_LEN, MAGIC, MAX_HELLO,
    WIRE_VERSION,
};
use libfuzzer_sys::fuzz_target;

/// Bounds the walk uses for `bytes`/`str`/`count`.
const MAXES: [usize; 8] = [0, 1, 4, 32, 4096, 1 << 20, u32::MAX as usize, usize::MAX];
/// Element sizes for `count`.
const ELEMS: [usize; 8] = [0, 1, 2, 4, 8, 25, 1 << 20, usize::MAX];

fn le(b: &[u8]) -> u64 {
    let mut x = [0u8; 8];
    x[..b.len()].copy_from_slice(b);
    u64::from_le_bytes(x)
}

fn check_header(b: &[u8; HEADER_LEN], max_msg: usize) {
    match FrameHeader::decode(b, max_msg) {
        Ok(h) => {
            assert_eq!(b[0..2], MAGIC);
            assert_eq!(b[2], WIRE_VERSION);
            assert_eq!(h.kind as u8, b[3]);
            let bound = match h.kind {
                FrameKind::Hello | FrameKind::Auth => MAX_HELLO as u64,
                FrameKind::Msg => max_msg as u64,
                FrameKind::Write => u64::MAX,
            };
            assert!(h.len <= bound, "{h:?} passed with len over {bound}");
            let e = h.encode();
            assert_eq!(e[..36], b[..36], "re-encoding changed the header");
            assert_eq!(e[36..], [0u8; 4], "reserved bytes not zero");
            assert_eq!(FrameHeader::decode(&e, max_msg), Ok(h), "round trip");
        }
        Err(DecodeError::BadMagic(m)) => {
            assert_ne!(b[0..2], MAGIC);
            assert_eq!(m, [b[0], b[1]]);
        }
        Err(DecodeError::Version { found }) => {
            assert_eq!(b[0..2], MAGIC);
            assert_ne!(found, WIRE_VERSION);
            assert_eq!(found, b[2]);
        }
        Err(DecodeError::Kind(k)) => {
            assert_eq!((b[0..2] == MAGIC, b[2]), (true, WIRE_VERSION));
            assert_eq!(k, b[3]);
            assert!(!(1..=4).contains(&k));
        }
        Err(DecodeError::TooLong { len, max, .. }) => {
            assert_eq!((b[0..2] == MAGIC, b[2]), (true, WIRE_VERSION));
            assert_eq!(len, le(&b[8..16]));
            assert!(len > max);
        }
        Err(e) => panic!("FrameHeader::decode returned an unexpected error: {e:?}"),
    }
}

fn walk(ops: &[u8], body: &[u8]) {
    let mut d = Decoder::new(body);
    let mut re = Encoder::new();
    let mut pos = 0usize;
    for &op in ops {
        let left = body.len() - pos;
        assert_eq!(d.remaining(), left);
        let max = MAXES[(op >> 3) as usize & 7];
        let fixed = |n: usize| (left >= n).then(|| &body[pos..pos + n]);
        match op & 7 {
            0 => match d.u8("u8") {
                Ok(v) => {
                    assert_eq!(Some(&[v][..]), fixed(1));
                    re.u8(v);
                    pos += 1;
                }
                Err(e) => {
                    assert!(left < 1, "{e}");
                    assert!(matches!(e, DecodeError::Truncated { .. }));
                }
            },
            1 => match d.u16("u16") {
                Ok(v) => {
                    assert_eq!(Some(&v.to_le_bytes()[..]), fixed(2));
                    re.u16(v);
                    pos += 2;
                }
                Err(e) => assert!(left < 2 && matches!(e, DecodeError::Truncated { .. })),
            },
            2 => match d.u32("u32") {
                Ok(v) => {
                    assert_eq!(Some(&v.to_le_bytes()[..]), fixed(4));
                    re.u32(v);
                    pos += 4;
                }
                Err(e) => assert!(left < 4 && matches!(e, DecodeError::Truncated { .. })),
            },
            3 => match d.i32("i32") {
                Ok(v) => {
                    assert_eq!(Some(&v.to_le_bytes()[..]), fixed(4));
                    re.i32(v);
                    pos += 4;
                }
                Err(e) => assert!(left < 4 && matches!(e, DecodeError::Truncated { .. })),
            },
            4 => match d.u64("u64") {
                Ok(v) => {
                    assert_eq!(Some(&v.to_le_bytes()[..]), fixed(8));
                    re.u64(v);
                    pos += 8;
                }
                Err(e) => assert!(left < 8 && matches!(e, DecodeError::Truncated { .. })),
            },
            5 | 6 => {
                let is_str = op & 7 == 6;
                let r = if is_str {
                    d.str("str", max).map(str::as_bytes)
                } else {
                    d.bytes("bytes", max)
                };
                let n = (left >= 4).then(|| le(&body[pos..pos + 4]) as usize);
                match (r, n) {
                    (Ok(v), Some(n)) => {
                        assert!(n <= max, "{n} bytes passed a bound of {max}");
                        assert_eq!(v, &body[pos + 4..pos + 4 + n]);
                        if is_str {
                            re.str(std::str::from_utf8(v).expect("str returned non-UTF-8"));
                        } else {
                            re.bytes(v);
                        }
                        pos += 4 + n;
                    }
                    (Ok(_), None) => panic!("a length prefix was read from {left} bytes"),
                    (Err(e), None) => {
                        assert!(matches!(e, DecodeError::Truncated { .. }), "{e:?}");
                        assert_eq!(d.remaining(), left);
                        break;
                    }
                    (Err(e), Some(n)) => {
                        // The length prefix was consumed; the walk ends here.
                        match e {
                            DecodeError::TooLong { len, .. } => {
                                assert!(n > max);
                                assert_eq!(len, n as u64);
                                assert_eq!(d.remaining(), left - 4);
                            }
                            DecodeError::Truncated { .. } => {
                                assert!(n <= max && n > left - 4);
                                assert_eq!(d.remaining(), left - 4);
                            }
                            DecodeError::Utf8 { .. } => {
                                assert!(is_str && n <= max && n <= left - 4);
                                assert!(std::str::from_utf8(&body[pos + 4..pos + 4 + n]).is_err());
                                assert_eq!(d.remaining(), left - 4 - n);
                            }
                            e => panic!("bytes/str returned an unexpected error: {e:?}"),
                        }
                        break;
                    }
                }
            }
            _ => {
                let elem = ELEMS[((op >> 6) as usize & 3) | ((op >> 2) as usize & 4)];
                match d.count("count", elem, max) {
                    Ok(n) => {
                        assert!(left >= 4);
                        assert_eq!(n as u64, le(&body[pos..pos + 4]));
                        assert!(n <= max, "count {n} over its bound {max}");
                        assert!(
                            (n as u128) * (elem.max(1) as u128) <= (left - 4) as u128,
                            "count {n} of {elem}-byte items exceeds the {} bytes left",
                            left - 4
                        );
                        re.u32(n as u32);
                        pos += 4;
                    }
                    Err(DecodeError::Truncated { .. }) => {
                        assert!(left < 4);
                        assert_eq!(d.remaining(), left);
                        break;
                    }
                    Err(DecodeError::TooLong { len, .. }) => {
                        assert!(left >= 4);
                        assert_eq!(len, le(&body[pos..pos + 4]));
                        let fits = (len as u128) * (elem.max(1) as u128) <= (left - 4) as u128;
                        assert!(len as u128 > max as u128 || !fits, "count {len} refused");
                        assert_eq!(d.remaining(), left - 4);
                        break;
                    }
                    Err(e) => panic!("count returned an unexpected error: {e:?}"),
                }
            }
        }
    }
    assert_eq!(re.as_slice(), &body[..pos], "re-encoding differs from the bytes read");
    if d.remaining() != body.len() - pos {
        // The walk stopped after a failed length-prefixed read (checked above).
        return;
    }
    assert_eq!(re.as_slice(), &body[..pos], "re-encoding differs from the bytes read");
    let left = d.remaining();
    match d.finish() {
        Ok(()) => assert_eq!(left, 0),
        Err(e) => assert_eq!(e, DecodeError::Trailing(left)),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut head = [0u8; 49];
    let n = data.len().min(head.len());
    head[..n].copy_from_slice(&data[..n]);
    let rest = &data[n..];

    let mut hb = [0u8; HEADER_LEN];
    hb.copy_from_slice(&head[..HEADER_LEN]);
    let max_msg = le(&head[40..48]) as usize;
    check_header(&hb, max_msg);

    let k = (head[48] & 31) as usize;
    let k = k.min(rest.len());
    let (ops, body) = rest.split_at(k);
    walk(ops, body);
});
