//! What RDMA peers say to each other: the QP handshake (inside tcp `Hello` frames) and the small
//! headers of the messages on the queue pair. Pure encoding, no verbs: compiled and tested with
//! or without feature `rdma`.

// Without feature `rdma` only the decline path and the tests use this module.
#![cfg_attr(not(feature = "rdma"), allow(dead_code))]

use std::net::Ipv6Addr;

/// Prefix of every handshake string: the protocol and its version. Version 2 names a write's
/// destination by a slot of a per-link table in the immediate (`Define`), where version 1 sent a
/// descriptor before every write.
pub(crate) const PREFIX: &str = "bps-rdma/2";
/// What every version's handshake starts with.
const FAMILY: &str = "bps-rdma/";

/// One side's queue pair, as the other side needs it to connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Queue pair number.
    pub qpn: u32,
    /// First packet sequence number it sends.
    pub psn: u32,
    /// LID of its port (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// Its GID.
    pub gid: Ipv6Addr,
    /// Its port's active MTU in bytes.
    pub mtu: u32,
}

/// A handshake string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Handshake {
    /// The dialler's QP (lane 0 Hello).
    Offer(Endpoint),
    /// The acceptor's QP (its answering Hello).
    Accept(Endpoint),
    /// The acceptor keeps tcp, and why.
    Decline(String),
}

impl Handshake {
    pub(crate) fn encode(&self) -> String {
        let ep = |verb: &str, e: &Endpoint| {
            format!(
                "{PREFIX} {verb} qpn={} psn={} lid={} gid={} mtu={}",
                e.qpn,
                e.psn,
                e.lid,
                hex16(&e.gid.octets()),
                e.mtu
            )
        };
        match self {
            Handshake::Offer(e) => ep("offer", e),
            Handshake::Accept(e) => ep("accept", e),
            Handshake::Decline(r) => {
                // Keep it one line and short enough for a Hello (the field holds 1024 bytes).
                let r: String = r.chars().map(|c| if c == '\n' { ' ' } else { c }).collect();
                let r: String = r.chars().take(900).collect();
                format!("{PREFIX} decline {r}")
            }
        }
    }

    /// Whether `s` is meant for this protocol, of any version (an ordinary tcp Hello has an
    /// empty field).
    pub(crate) fn is_handshake(s: &str) -> bool {
        s.starts_with(FAMILY)
    }

    pub(crate) fn parse(s: &str) -> Result<Handshake, String> {
        let rest = s
            .strip_prefix(PREFIX)
            .and_then(|r| r.strip_prefix(' '))
            .ok_or_else(|| match s.strip_prefix(FAMILY) {
                Some(v) => format!(
                    "RDMA protocol version mismatch: the peer speaks bps-rdma/{}, this build \
                     {PREFIX} (run the same bps version everywhere)",
                    v.split(' ').next().unwrap_or("")
                ),
                None => format!("not an RDMA handshake: {s:?}"),
            })?;
        let (verb, args) = rest.split_once(' ').unwrap_or((rest, ""));
        match verb {
            "decline" => Ok(Handshake::Decline(args.to_string())),
            "offer" | "accept" => {
                let mut e = Endpoint {
                    qpn: 0,
                    psn: 0,
                    lid: 0,
                    gid: Ipv6Addr::UNSPECIFIED,
                    mtu: 0,
                };
                let mut seen = 0u8;
                for kv in args.split_ascii_whitespace() {
                    let (k, v) = kv
                        .split_once('=')
                        .ok_or_else(|| format!("bad RDMA handshake field {kv:?}"))?;
                    let bad = || format!("bad RDMA handshake value {kv:?}");
                    match k {
                        "qpn" => (e.qpn, seen) = (v.parse().map_err(|_| bad())?, seen | 1),
                        "psn" => (e.psn, seen) = (v.parse().map_err(|_| bad())?, seen | 2),
                        "lid" => (e.lid, seen) = (v.parse().map_err(|_| bad())?, seen | 4),
                        "gid" => {
                            (e.gid, seen) = (Ipv6Addr::from(unhex16(v).ok_or_else(bad)?), seen | 8)
                        }
                        "mtu" => (e.mtu, seen) = (v.parse().map_err(|_| bad())?, seen | 16),
                        _ => {} // later versions may add fields
                    }
                }
                if seen != 31 || e.qpn == 0 || e.qpn >= 1 << 24 || e.psn >= 1 << 24 {
                    return Err(format!("incomplete RDMA handshake {s:?}"));
                }
                if !matches!(e.mtu, 256 | 512 | 1024 | 2048 | 4096) {
                    return Err(format!("RDMA handshake with MTU {} (not 256..4096)", e.mtu));
                }
                Ok(if verb == "offer" {
                    Handshake::Offer(e)
                } else {
                    Handshake::Accept(e)
                })
            }
            _ => Err(format!("unknown RDMA handshake {verb:?}")),
        }
    }
}

fn hex16(b: &[u8; 16]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex16(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

// ------------------------------------------------------------------------------------------------
// Messages on the queue pair. Every SEND starts with an 8-byte header: kind, flags, 2 reserved
// bytes, lane (little-endian u32).

/// Header length of a SEND.
pub(crate) const HDR: usize = 8;

/// Kind byte of a SEND.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    /// A fragment of an application message; flag `LAST` ends it.
    Msg = 1,
    /// Defines slot `index` of the link's destination table: the region token, offset, length and
    /// the caller's immediate of the writes whose WRITE_WITH_IMM carries `index` as immediate.
    Define = 6,
    /// "Where is token T?" (u64).
    Resolve = 3,
    /// Answer: token, addr, len (u64), rkey (u32), status (u8: 0 ok, 1 deregistered).
    Announce = 4,
    /// The dialler's QP is in RTS (first message on a new QP).
    Ready = 5,
}

/// Flag of a `Msg` fragment: the message ends here.
pub(crate) const F_LAST: u8 = 1;
/// Flag of a `Define`: no write follows; the writer found the destination out of bounds (the
/// receiver closes the link, as it would on tcp).
pub(crate) const F_NO_DATA: u8 = 1;

/// Status byte of an `Announce`.
pub(crate) const ANN_OK: u8 = 0;
/// The token was deregistered: writes to it are dropped.
pub(crate) const ANN_RETIRED: u8 = 1;

pub(crate) const DEFINE_LEN: usize = HDR + 32;
pub(crate) const RESOLVE_LEN: usize = HDR + 8;
pub(crate) const ANNOUNCE_LEN: usize = HDR + 29;

pub(crate) fn header(kind: Kind, flags: u8, lane: u32) -> [u8; HDR] {
    let mut h = [0u8; HDR];
    h[0] = kind as u8;
    h[1] = flags;
    h[4..8].copy_from_slice(&lane.to_le_bytes());
    h
}

/// A decoded SEND.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Send<'a> {
    Msg {
        lane: u32,
        last: bool,
        data: &'a [u8],
    },
    Define {
        index: u32,
        imm: u32,
        token: u64,
        offset: u64,
        len: u64,
        no_data: bool,
    },
    Resolve {
        token: u64,
    },
    Announce {
        token: u64,
        addr: u64,
        len: u64,
        rkey: u32,
        status: u8,
    },
    Ready,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// A destination-table entry: the write's region token, offset, length and immediate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Dest {
    pub(crate) token: u64,
    pub(crate) offset: u64,
    pub(crate) len: u64,
    pub(crate) imm: u32,
}

pub(crate) fn encode_define(index: u32, d: &Dest, no_data: bool) -> [u8; DEFINE_LEN] {
    let mut b = [0u8; DEFINE_LEN];
    b[..HDR].copy_from_slice(&header(
        Kind::Define,
        if no_data { F_NO_DATA } else { 0 },
        0,
    ));
    b[HDR..HDR + 4].copy_from_slice(&index.to_le_bytes());
    b[HDR + 4..HDR + 8].copy_from_slice(&d.imm.to_le_bytes());
    b[HDR + 8..HDR + 16].copy_from_slice(&d.token.to_le_bytes());
    b[HDR + 16..HDR + 24].copy_from_slice(&d.offset.to_le_bytes());
    b[HDR + 24..HDR + 32].copy_from_slice(&d.len.to_le_bytes());
    b
}

pub(crate) fn encode_resolve(token: u64) -> [u8; RESOLVE_LEN] {
    let mut b = [0u8; RESOLVE_LEN];
    b[..HDR].copy_from_slice(&header(Kind::Resolve, 0, 0));
    b[HDR..].copy_from_slice(&token.to_le_bytes());
    b
}

pub(crate) fn encode_announce(
    token: u64,
    addr: u64,
    len: u64,
    rkey: u32,
    status: u8,
) -> [u8; ANNOUNCE_LEN] {
    let mut b = [0u8; ANNOUNCE_LEN];
    b[..HDR].copy_from_slice(&header(Kind::Announce, 0, 0));
    b[HDR..HDR + 8].copy_from_slice(&token.to_le_bytes());
    b[HDR + 8..HDR + 16].copy_from_slice(&addr.to_le_bytes());
    b[HDR + 16..HDR + 24].copy_from_slice(&len.to_le_bytes());
    b[HDR + 24..HDR + 28].copy_from_slice(&rkey.to_le_bytes());
    b[HDR + 28] = status;
    b
}

pub(crate) fn decode(b: &[u8]) -> Result<Send<'_>, String> {
    if b.len() < HDR {
        return Err(format!(
            "RDMA message of {} bytes is shorter than its header",
            b.len()
        ));
    }
    let (kind, flags) = (b[0], b[1]);
    let lane = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let need = |n: usize| {
        if b.len() == n {
            Ok(())
        } else {
            Err(format!(
                "RDMA message of kind {kind} has {} bytes, expected {n}",
                b.len()
            ))
        }
    };
    match kind {
        1 => Ok(Send::Msg {
            lane,
            last: flags & F_LAST != 0,
            data: &b[HDR..],
        }),
        6 => {
            need(DEFINE_LEN)?;
            Ok(Send::Define {
                index: u32_at(b, HDR),
                imm: u32_at(b, HDR + 4),
                token: u64_at(b, HDR + 8),
                offset: u64_at(b, HDR + 16),
                len: u64_at(b, HDR + 24),
                no_data: flags & F_NO_DATA != 0,
            })
        }
        3 => {
            need(RESOLVE_LEN)?;
            Ok(Send::Resolve {
                token: u64_at(b, HDR),
            })
        }
        4 => {
            need(ANNOUNCE_LEN)?;
            Ok(Send::Announce {
                token: u64_at(b, HDR),
                addr: u64_at(b, HDR + 8),
                len: u64_at(b, HDR + 16),
                rkey: u32_at(b, HDR + 24),
                status: b[HDR + 28],
            })
        }
        5 => {
            need(HDR)?;
            Ok(Send::Ready)
        }
        k => Err(format!("unknown RDMA message kind {k}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep() -> Endpoint {
        Endpoint {
            qpn: 0x11,
            psn: 0xabcdef,
            lid: 7,
            gid: "::ffff:198.18.0.1".parse().unwrap(),
            mtu: 4096,
        }
    }

    #[test]
    fn handshake_round_trips() {
        for h in [
            Handshake::Offer(ep()),
            Handshake::Accept(ep()),
            Handshake::Decline("no RDMA device\n(ibv_get_device_list returned 0)".into()),
        ] {
            let s = h.encode();
            assert!(Handshake::is_handshake(&s));
            assert!(s.len() < 1024, "fits a Hello's field");
            let back = Handshake::parse(&s).unwrap();
            match (&h, &back) {
                (Handshake::Decline(_), Handshake::Decline(r)) => assert!(!r.contains('\n')),
                _ => assert_eq!(back, h),
            }
        }
    }

    #[test]
    fn handshake_rejects_garbage() {
        assert!(!Handshake::is_handshake(""));
        for bad in [
            "bps-rdma/2",
            "bps-rdma/2 offer",
            "bps-rdma/2 offer qpn=1 psn=2 lid=0 mtu=4096",
            "bps-rdma/2 offer qpn=1 psn=2 lid=0 gid=zz mtu=4096",
            "bps-rdma/2 offer qpn=0 psn=2 lid=0 gid=00000000000000000000000000000000 mtu=4096",
            "bps-rdma/2 offer qpn=1 psn=2 lid=0 gid=00000000000000000000000000000000 mtu=100",
            "bps-rdma/2 offer qpn=16777216 psn=2 lid=0 gid=00000000000000000000000000000000 mtu=256",
            "bps-rdma/2 hello",
            "bps-rdma/3 offer",
        ] {
            assert!(Handshake::parse(bad).is_err(), "{bad}");
        }
        let old = "bps-rdma/1 offer qpn=1 psn=2 lid=0 gid=00000000000000000000000000000000 mtu=256";
        assert!(
            Handshake::is_handshake(old),
            "an older version is recognised"
        );
        let e = Handshake::parse(old).unwrap_err();
        assert!(
            e.contains("version mismatch") && e.contains("bps-rdma/1"),
            "{e}"
        );
    }

    #[test]
    fn sends_round_trip() {
        let dest = Dest {
            token: 1,
            offset: 2,
            len: 3,
            imm: 0xfeed_beef,
        };
        let d = encode_define(7, &dest, true);
        assert_eq!(
            decode(&d).unwrap(),
            Send::Define {
                index: 7,
                imm: 0xfeed_beef,
                token: 1,
                offset: 2,
                len: 3,
                no_data: true
            }
        );
        assert!(decode(&header(Kind::Define, 0, 0)).is_err());
        assert!(
            decode(&[2, 0, 0, 0, 0, 0, 0, 0]).is_err(),
            "version 1's descriptor"
        );
        assert_eq!(
            decode(&encode_resolve(9)).unwrap(),
            Send::Resolve { token: 9 }
        );
        let a = encode_announce(5, 0x1000, 64, 0xdead, ANN_RETIRED);
        assert_eq!(
            decode(&a).unwrap(),
            Send::Announce {
                token: 5,
                addr: 0x1000,
                len: 64,
                rkey: 0xdead,
                status: ANN_RETIRED
            }
        );
        let mut m = header(Kind::Msg, F_LAST, 3).to_vec();
        m.extend_from_slice(b"hi");
        assert_eq!(
            decode(&m).unwrap(),
            Send::Msg {
                lane: 3,
                last: true,
                data: b"hi"
            }
        );
        assert_eq!(decode(&header(Kind::Ready, 0, 0)).unwrap(), Send::Ready);
        assert!(decode(&[1, 0, 0]).is_err());
        assert!(decode(&[9, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(decode(&d[..DEFINE_LEN - 1]).is_err());
    }
}
