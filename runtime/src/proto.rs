//! Control messages: rendezvous (node ↔ scheduler) and key set-up (worker ↔ server).
//!
//! Bodies are encoded with the transport's bounded codec; every count and length is bounded
//! before anything is allocated, and a message that does not decode is an error naming the
//! sender, never a panic.

use bps_transport::codec::{DecodeError, Decoder, Encoder};

use crate::config::Role;

/// Longest name, address or reason string accepted.
pub const MAX_STR: usize = 4096;
/// InitKey scope: to the key's server.
pub const SCOPE_GLOBAL: u8 = 0;
/// InitKey scope: to the host's local aggregator of the key.
pub const SCOPE_LOCAL: u8 = 1;
/// Most entries in an address book or a placement.
pub const MAX_ENTRIES: usize = 1 << 16;

/// One process in the address book.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BookEntry {
    /// Its transport id.
    pub peer: u32,
    /// Its role.
    pub role: Role,
    /// Worker rank or server index.
    pub rank: u32,
    /// TCP address.
    pub tcp: String,
    /// Unix socket of its shm links ("" = none).
    pub unix: String,
    /// Host identity.
    pub host: String,
    /// Host name, for messages.
    pub hostname: String,
}

/// Rendezvous registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Register {
    /// Role.
    pub role: Role,
    /// Requested rank (workers), if any.
    pub rank: Option<u32>,
    /// Rank on the host.
    pub local_rank: u32,
    /// Workers on the host.
    pub local_size: u32,
    /// Workers the process expects.
    pub num_workers: u32,
    /// Servers the process expects.
    pub num_servers: u32,
    /// Its partition size (must agree).
    pub partition_bytes: u64,
    /// Its adaptive-partitioning setting, chunks per server (must agree; 0 = off).
    pub min_chunks: u32,
    /// TCP lanes (must agree).
    pub lanes: u32,
    /// Where it listens.
    pub tcp: String,
    /// Its shm socket ("" = none).
    pub unix: String,
    /// Host identity.
    pub host: String,
    /// Host name.
    pub hostname: String,
    /// Process id.
    pub pid: u32,
}

/// Every control message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// node → scheduler
    Register(Register),
    /// scheduler → node: your rank and everyone's address.
    Welcome {
        /// Assigned rank (worker rank or server index).
        rank: u32,
        /// Transport id.
        peer: u32,
        /// Workers in the job.
        num_workers: u32,
        /// Servers in the job (0 = colocated).
        num_servers: u32,
        /// Workers per host group (BYTEPS_LOCAL_SIZE), agreed by every worker.
        local_size: u32,
        /// Partition size of the job (the workers' BYTEPS_PARTITION_BYTES).
        partition_bytes: u64,
        /// Adaptive partitioning of the job (the workers' BPS_MIN_CHUNKS_PER_SERVER).
        min_chunks: u32,
        /// Everyone.
        book: Vec<BookEntry>,
    },
    /// scheduler → node: registration refused.
    Refused {
        /// Why.
        reason: String,
    },
    /// worker → scheduler: where do the chunks of this tensor go?
    Place {
        /// Tensor id (declaration order).
        tensor: u32,
        /// Its name.
        name: String,
        /// Its size.
        bytes: u64,
        /// Its dtype.
        dtype: u8,
    },
    /// scheduler → worker: the server index of each chunk.
    Placement {
        /// Tensor id.
        tensor: u32,
        /// One server index per chunk.
        servers: Vec<u32>,
    },
    /// scheduler → worker: placement refused (mismatch across workers).
    PlaceError {
        /// Tensor id.
        tensor: u32,
        /// Why.
        reason: String,
    },
    /// node → scheduler: wait for every worker.
    Barrier {
        /// Barrier number.
        id: u64,
    },
    /// scheduler → node.
    BarrierDone {
        /// Barrier number.
        id: u64,
    },
    /// node → scheduler: done.
    Goodbye,
    /// worker → scheduler: leaving because the job broke here (instead of `Goodbye`): the
    /// scheduler tells every other process, so none of them takes the end for a clean one.
    Abort {
        /// What broke.
        reason: String,
    },
    /// scheduler → node: every worker is done, exit.
    Terminate,
    /// scheduler → node: a process died.
    PeerDead {
        /// Its transport id.
        peer: u32,
        /// Who it was and what happened.
        reason: String,
    },
    /// node → scheduler, first message: the node's nonce (empty without a job secret).
    AuthHello {
        /// Random bytes.
        nonce: Vec<u8>,
    },
    /// scheduler → node: the scheduler's nonce and its proof (empty without a job secret).
    AuthChallenge {
        /// Random bytes.
        nonce: Vec<u8>,
        /// HMAC proof.
        proof: Vec<u8>,
    },
    /// node → scheduler: the node's proof.
    AuthProof {
        /// HMAC proof.
        proof: Vec<u8>,
    },
    /// Either way between a node and the scheduler: still alive.
    Heartbeat,
    /// worker (local rank 0 of a host group) → scheduler → the group's other workers: the
    /// NCCL unique id of the group's communicator.
    GpuId {
        /// Host group (rank / local size).
        group: u32,
        /// The opaque id (128 bytes).
        id: Vec<u8>,
    },
    /// worker → scheduler: this worker is ready for NCCL step `phase` of the `seq`-th GPU
    /// operation on `tensor`.
    GpuReady {
        /// Tensor id.
        tensor: u32,
        /// Operation number on that tensor (0, 1, …).
        seq: u32,
        /// Step of the operation.
        phase: u8,
    },
    /// scheduler → every worker of a host group, in one order for all: go ahead with the NCCL
    /// step (every worker of the group said it is ready).
    GpuGo {
        /// Tensor id.
        tensor: u32,
        /// Operation number on that tensor.
        seq: u32,
        /// Step of the operation.
        phase: u8,
    },
    /// worker → server: first use of a key.
    InitKey {
        /// The key.
        key: u64,
        /// Its bytes.
        bytes: u64,
        /// Its dtype.
        dtype: u8,
        /// Immediate the server puts on answers to this worker.
        reply_slot: u32,
        /// Name of the tensor, for messages.
        name: String,
        /// [`SCOPE_GLOBAL`] (to a server) or [`SCOPE_LOCAL`] (to the host's local aggregator).
        scope: u8,
        /// For local scope: the transport id of the key's server.
        upstream: u32,
    },
    /// server → worker: key ready; push into this slice.
    InitAck {
        /// Scope of the InitKey answered.
        scope: u8,
        /// The key.
        key: u64,
        /// Immediate for pushes of this key.
        server_slot: u32,
        /// Region token for this worker's pushes.
        token: u64,
        /// Offset in it.
        offset: u64,
    },
    /// server → worker: a key failed.
    KeyError {
        /// The key.
        key: u64,
        /// Why.
        reason: String,
    },
    /// worker → server: where answers for a key go from now on.
    SetReply {
        /// The server's slot of the key.
        server_slot: u32,
        /// Region token on the worker.
        token: u64,
        /// Offset in it.
        offset: u64,
    },
}

fn put_role(e: &mut Encoder, r: Role) {
    e.u8(r.to_u8());
}

fn get_role(d: &mut Decoder<'_>) -> Result<Role, DecodeError> {
    let v = d.u8("role")?;
    Role::from_u8(v).ok_or(DecodeError::Invalid {
        what: "role",
        value: v as u64,
    })
}

impl Msg {
    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let mut e;
        match self {
            Msg::Register(r) => {
                e = Encoder::with_tag(1);
                put_role(&mut e, r.role);
                e.u32(r.rank.map_or(u32::MAX, |x| x))
                    .u32(r.local_rank)
                    .u32(r.local_size)
                    .u32(r.num_workers)
                    .u32(r.num_servers)
                    .u64(r.partition_bytes)
                    .u32(r.min_chunks)
                    .u32(r.lanes)
                    .str(&r.tcp)
                    .str(&r.unix)
                    .str(&r.host)
                    .str(&r.hostname)
                    .u32(r.pid);
            }
            Msg::Welcome {
                rank,
                peer,
                num_workers,
                num_servers,
                local_size,
                partition_bytes,
                min_chunks,
                book,
            } => {
                e = Encoder::with_tag(2);
                e.u32(*rank)
                    .u32(*peer)
                    .u32(*num_workers)
                    .u32(*num_servers)
                    .u32(*local_size)
                    .u64(*partition_bytes)
                    .u32(*min_chunks)
                    .u32(book.len() as u32);
                for b in book {
                    e.u32(b.peer);
                    put_role(&mut e, b.role);
                    e.u32(b.rank)
                        .str(&b.tcp)
                        .str(&b.unix)
                        .str(&b.host)
                        .str(&b.hostname);
                }
            }
            Msg::Refused { reason } => {
                e = Encoder::with_tag(3);
                e.str(reason);
            }
            Msg::Place {
                tensor,
                name,
                bytes,
                dtype,
            } => {
                e = Encoder::with_tag(4);
                e.u32(*tensor).str(name).u64(*bytes).u8(*dtype);
            }
            Msg::Placement { tensor, servers } => {
                e = Encoder::with_tag(5);
                e.u32(*tensor).u32(servers.len() as u32);
                for s in servers {
                    e.u32(*s);
                }
            }
            Msg::PlaceError { tensor, reason } => {
                e = Encoder::with_tag(6);
                e.u32(*tensor).str(reason);
            }
            Msg::Barrier { id } => {
                e = Encoder::with_tag(7);
                e.u64(*id);
            }
            Msg::BarrierDone { id } => {
                e = Encoder::with_tag(8);
                e.u64(*id);
            }
            Msg::Goodbye => e = Encoder::with_tag(9),
            Msg::Terminate => e = Encoder::with_tag(10),
            Msg::PeerDead { peer, reason } => {
                e = Encoder::with_tag(11);
                e.u32(*peer).str(reason);
            }
            Msg::AuthHello { nonce } => {
                e = Encoder::with_tag(12);
                e.bytes(nonce);
            }
            Msg::AuthChallenge { nonce, proof } => {
                e = Encoder::with_tag(13);
                e.bytes(nonce).bytes(proof);
            }
            Msg::AuthProof { proof } => {
                e = Encoder::with_tag(14);
                e.bytes(proof);
            }
            Msg::Heartbeat => e = Encoder::with_tag(15),
            Msg::Abort { reason } => {
                e = Encoder::with_tag(19);
                e.str(reason);
            }
            Msg::GpuId { group, id } => {
                e = Encoder::with_tag(16);
                e.u32(*group).bytes(id);
            }
            Msg::GpuReady { tensor, seq, phase } => {
                e = Encoder::with_tag(17);
                e.u32(*tensor).u32(*seq).u8(*phase);
            }
            Msg::GpuGo { tensor, seq, phase } => {
                e = Encoder::with_tag(18);
                e.u32(*tensor).u32(*seq).u8(*phase);
            }
            Msg::InitKey {
                key,
                bytes,
                dtype,
                reply_slot,
                name,
                scope,
                upstream,
            } => {
                e = Encoder::with_tag(20);
                e.u64(*key)
                    .u64(*bytes)
                    .u8(*dtype)
                    .u32(*reply_slot)
                    .str(name)
                    .u8(*scope)
                    .u32(*upstream);
            }
            Msg::InitAck {
                scope,
                key,
                server_slot,
                token,
                offset,
            } => {
                e = Encoder::with_tag(21);
                e.u8(*scope)
                    .u64(*key)
                    .u32(*server_slot)
                    .u64(*token)
                    .u64(*offset);
            }
            Msg::KeyError { key, reason } => {
                e = Encoder::with_tag(22);
                e.u64(*key).str(reason);
            }
            Msg::SetReply {
                server_slot,
                token,
                offset,
            } => {
                e = Encoder::with_tag(23);
                e.u32(*server_slot).u64(*token).u64(*offset);
            }
        }
        e.finish()
    }

    /// Decode, checking every bound.
    pub fn decode(b: &[u8]) -> Result<Msg, DecodeError> {
        let mut d = Decoder::new(b);
        let tag = d.u8("message tag")?;
        let m = match tag {
            1 => {
                let role = get_role(&mut d)?;
                let rank = d.u32("rank")?;
                Msg::Register(Register {
                    role,
                    rank: (rank != u32::MAX).then_some(rank),
                    local_rank: d.u32("local rank")?,
                    local_size: d.u32("local size")?,
                    num_workers: d.u32("workers")?,
                    num_servers: d.u32("servers")?,
                    partition_bytes: d.u64("partition bytes")?,
                    min_chunks: d.u32("chunks per server")?,
                    lanes: d.u32("lanes")?,
                    tcp: d.str("tcp address", MAX_STR)?.into(),
                    unix: d.str("unix path", MAX_STR)?.into(),
                    host: d.str("host id", MAX_STR)?.into(),
                    hostname: d.str("host name", MAX_STR)?.into(),
                    pid: d.u32("pid")?,
                })
            }
            2 => {
                let rank = d.u32("rank")?;
                let peer = d.u32("peer")?;
                let num_workers = d.u32("workers")?;
                let num_servers = d.u32("servers")?;
                let local_size = d.u32("local size")?;
                let partition_bytes = d.u64("partition bytes")?;
                let min_chunks = d.u32("chunks per server")?;
                // each entry is at least 4 + 1 + 4 + 4*4 bytes
                let n = d.count("address book", 25, MAX_ENTRIES)?;
                let mut book = Vec::with_capacity(n);
                for _ in 0..n {
                    book.push(BookEntry {
                        peer: d.u32("peer")?,
                        role: get_role(&mut d)?,
                        rank: d.u32("rank")?,
                        tcp: d.str("tcp address", MAX_STR)?.into(),
                        unix: d.str("unix path", MAX_STR)?.into(),
                        host: d.str("host id", MAX_STR)?.into(),
                        hostname: d.str("host name", MAX_STR)?.into(),
                    });
                }
                Msg::Welcome {
                    rank,
                    peer,
                    num_workers,
                    num_servers,
                    local_size,
                    partition_bytes,
                    min_chunks,
                    book,
                }
            }
            3 => Msg::Refused {
                reason: d.str("reason", MAX_STR)?.into(),
            },
            4 => Msg::Place {
                tensor: d.u32("tensor")?,
                name: d.str("tensor name", MAX_STR)?.into(),
                bytes: d.u64("bytes")?,
                dtype: d.u8("dtype")?,
            },
            5 => {
                let tensor = d.u32("tensor")?;
                let n = d.count("placement", 4, MAX_ENTRIES * 16)?;
                let mut servers = Vec::with_capacity(n);
                for _ in 0..n {
                    servers.push(d.u32("server")?);
                }
                Msg::Placement { tensor, servers }
            }
            6 => Msg::PlaceError {
                tensor: d.u32("tensor")?,
                reason: d.str("reason", MAX_STR)?.into(),
            },
            7 => Msg::Barrier {
                id: d.u64("barrier")?,
            },
            8 => Msg::BarrierDone {
                id: d.u64("barrier")?,
            },
            9 => Msg::Goodbye,
            10 => Msg::Terminate,
            11 => Msg::PeerDead {
                peer: d.u32("peer")?,
                reason: d.str("reason", MAX_STR)?.into(),
            },
            12 => Msg::AuthHello {
                nonce: d.bytes("nonce", 64)?.to_vec(),
            },
            13 => Msg::AuthChallenge {
                nonce: d.bytes("nonce", 64)?.to_vec(),
                proof: d.bytes("proof", 64)?.to_vec(),
            },
            14 => Msg::AuthProof {
                proof: d.bytes("proof", 64)?.to_vec(),
            },
            15 => Msg::Heartbeat,
            19 => Msg::Abort {
                reason: d.str("reason", MAX_STR)?.into(),
            },
            16 => Msg::GpuId {
                group: d.u32("group")?,
                id: d.bytes("nccl id", 128)?.to_vec(),
            },
            17 => Msg::GpuReady {
                tensor: d.u32("tensor")?,
                seq: d.u32("seq")?,
                phase: d.u8("phase")?,
            },
            18 => Msg::GpuGo {
                tensor: d.u32("tensor")?,
                seq: d.u32("seq")?,
                phase: d.u8("phase")?,
            },
            20 => Msg::InitKey {
                key: d.u64("key")?,
                bytes: d.u64("bytes")?,
                dtype: d.u8("dtype")?,
                reply_slot: d.u32("reply slot")?,
                name: d.str("tensor name", MAX_STR)?.into(),
                scope: d.u8("scope")?,
                upstream: d.u32("upstream")?,
            },
            21 => Msg::InitAck {
                scope: d.u8("scope")?,
                key: d.u64("key")?,
                server_slot: d.u32("server slot")?,
                token: d.u64("token")?,
                offset: d.u64("offset")?,
            },
            22 => Msg::KeyError {
                key: d.u64("key")?,
                reason: d.str("reason", MAX_STR)?.into(),
            },
            23 => Msg::SetReply {
                server_slot: d.u32("server slot")?,
                token: d.u64("token")?,
                offset: d.u64("offset")?,
            },
            t => {
                return Err(DecodeError::Invalid {
                    what: "message tag",
                    value: t as u64,
                })
            }
        };
        d.finish()?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Msg> {
        vec![
            Msg::Register(Register {
                role: Role::Server,
                rank: None,
                local_rank: 1,
                local_size: 2,
                num_workers: 4,
                num_servers: 2,
                partition_bytes: 4 << 20,
                min_chunks: 64,
                lanes: 2,
                tcp: "127.0.0.1:5".into(),
                unix: "/tmp/x".into(),
                host: "h".into(),
                hostname: "n".into(),
                pid: 9,
            }),
            Msg::Welcome {
                rank: 1,
                peer: 5,
                num_workers: 4,
                num_servers: 2,
                local_size: 2,
                partition_bytes: 4096,
                min_chunks: 0,
                book: vec![BookEntry {
                    peer: 0,
                    role: Role::Worker,
                    rank: 0,
                    tcp: "a".into(),
                    unix: "".into(),
                    host: "h".into(),
                    hostname: "n".into(),
                }],
            },
            Msg::Refused { reason: "r".into() },
            Msg::Place {
                tensor: 3,
                name: "w".into(),
                bytes: 8,
                dtype: 0,
            },
            Msg::Placement {
                tensor: 3,
                servers: vec![0, 1, 0],
            },
            Msg::PlaceError {
                tensor: 3,
                reason: "x".into(),
            },
            Msg::Barrier { id: 1 },
            Msg::BarrierDone { id: 1 },
            Msg::Goodbye,
            Msg::Terminate,
            Msg::AuthHello { nonce: vec![1; 32] },
            Msg::AuthChallenge {
                nonce: vec![2; 32],
                proof: vec![3; 32],
            },
            Msg::AuthProof { proof: vec![4; 32] },
            Msg::Heartbeat,
            Msg::GpuId {
                group: 1,
                id: vec![7; 128],
            },
            Msg::Abort {
                reason: "server 1 lost".into(),
            },
            Msg::GpuReady {
                tensor: 3,
                seq: 9,
                phase: 1,
            },
            Msg::GpuGo {
                tensor: 3,
                seq: 9,
                phase: 2,
            },
            Msg::PeerDead {
                peer: 2,
                reason: "gone".into(),
            },
            Msg::InitKey {
                key: 7,
                bytes: 9,
                dtype: 3,
                reply_slot: 4,
                name: "w".into(),
                scope: SCOPE_LOCAL,
                upstream: 3,
            },
            Msg::InitAck {
                scope: SCOPE_GLOBAL,
                key: 7,
                server_slot: 1,
                token: 2,
                offset: 3,
            },
            Msg::KeyError {
                key: 7,
                reason: "bad".into(),
            },
            Msg::SetReply {
                server_slot: 1,
                token: 2,
                offset: 3,
            },
        ]
    }

    #[test]
    fn round_trip() {
        for m in samples() {
            assert_eq!(Msg::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn truncations_and_trailing_bytes_are_errors() {
        for m in samples() {
            let b = m.encode();
            for cut in 0..b.len() {
                assert!(Msg::decode(&b[..cut]).is_err(), "{m:?} cut at {cut}");
            }
            let mut longer = b.clone();
            longer.push(0);
            assert!(Msg::decode(&longer).is_err());
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Msg::decode(&b);
        }
    }
}
