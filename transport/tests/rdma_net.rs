//! `Net` over RDMA, beyond the conformance suite: the registration cache, a peer killed in the
//! middle of a transfer, and the fallback to tcp where there is no device.
//!
//! The RDMA tests need feature `rdma` and a device (Soft-RoCE in `ci/softroce`'s guest); without
//! one they print why and pass, unless `BPS_RDMA_REQUIRE=1`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bps_transport::rdma::{self, RdmaConfig};
use bps_transport::{Event, LinkKind, Net, NetConfig, PeerAddr, PeerId, RemoteSlice, Transport};

fn rdma_config() -> RdmaConfig {
    RdmaConfig {
        device: std::env::var("RXE_DEV").ok(),
        gid_index: std::env::var("RXE_GID_INDEX")
            .ok()
            .and_then(|v| v.parse().ok()),
        ..RdmaConfig::default()
    }
}

fn have_device() -> bool {
    match rdma::probe(&rdma_config()) {
        Ok(_) => true,
        Err(e) if std::env::var("BPS_RDMA_REQUIRE").as_deref() == Ok("1") => {
            panic!("BPS_RDMA_REQUIRE=1 but no usable RDMA device: {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            false
        }
    }
}

fn config(me: u32) -> NetConfig {
    let mut c = NetConfig::new(PeerId(me), "127.0.0.1:0".parse().expect("literal"));
    c.force = Some(LinkKind::Rdma);
    c.unix_dir = None;
    c.rdma = rdma_config();
    c.connect_timeout = Duration::from_secs(10);
    c
}

/// Polls `net` until `f` accepts an event (returned), failing after `limit`.
fn wait<T>(
    net: &mut Net,
    ev: &mut Vec<Event>,
    limit: Duration,
    what: &str,
    mut f: impl FnMut(&Event) -> Option<T>,
) -> T {
    let end = Instant::now() + limit;
    loop {
        if let Some(i) = ev.iter().position(|e| f(e).is_some()) {
            let e = ev.remove(i);
            return f(&e).expect("accepted above");
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for {what}; events: {ev:?}"
        );
        net.poll(ev, Some(Duration::from_millis(5))).expect("poll");
    }
}

fn pump(a: &mut Net, ea: &mut Vec<Event>, b: &mut Net, eb: &mut Vec<Event>) {
    a.poll(ea, Some(Duration::from_millis(1))).expect("poll a");
    b.poll(eb, Some(Duration::from_millis(1))).expect("poll b");
}

/// Pumps both ends until the writer (first pair) saw an event matching `done` and the reader
/// (second pair) one matching `got`; fails after 30 s naming `what`.
fn until_written(
    [(w, ew), (r, er)]: [(&mut Net, &mut Vec<Event>); 2],
    done: impl Fn(&Event) -> bool,
    got: impl Fn(&Event) -> bool,
    what: &str,
) {
    let end = Instant::now() + Duration::from_secs(30);
    let (mut seen_done, mut seen_got) = (false, false);
    while !(seen_done && seen_got) {
        assert!(Instant::now() < end, "{what}: {ew:?} / {er:?}");
        pump(w, ew, r, er);
        seen_done |= ew.drain(..).any(|e| done(&e));
        seen_got |= er.drain(..).any(|e| got(&e));
    }
}

fn connect(a: &mut Net, b: &mut Net) -> (Vec<Event>, Vec<Event>) {
    a.add_peer(PeerId(1), b.local_addr()).expect("add 1");
    b.add_peer(PeerId(0), a.local_addr()).expect("add 0");
    let (mut ea, mut eb) = (Vec::new(), Vec::new());
    let end = Instant::now() + Duration::from_secs(20);
    let connected = |ev: &Vec<Event>| {
        ev.iter().any(|e| {
            matches!(
                e,
                Event::Connected {
                    kind: LinkKind::Rdma,
                    ..
                }
            )
        })
    };
    while !(connected(&ea) && connected(&eb)) {
        assert!(Instant::now() < end, "no RDMA link: {ea:?} / {eb:?}");
        pump(a, &mut ea, b, &mut eb);
    }
    ea.clear();
    eb.clear();
    assert_eq!(a.link_kind(PeerId(1)), Some(LinkKind::Rdma));
    (ea, eb)
}

/// A buffer reused for 1000 writes is registered with the NIC once on each side, and its token
/// is resolved once; registering the same range again under a new token does not register it
/// again either.
#[test]
fn registration_cache_1000_writes_register_once() {
    if !have_device() {
        return;
    }
    let mut a = Net::bind(config(0)).expect("bind 0");
    let mut b = Net::bind(config(1)).expect("bind 1");
    let (mut ea, mut eb) = connect(&mut a, &mut b);
    let before = (a.rdma_stats(), b.rdma_stats());
    let mut src = vec![7u8; 64 << 10].into_boxed_slice();
    let mut dst = vec![0u8; 64 << 10].into_boxed_slice();
    // SAFETY: both buffers outlive the Nets (dropped at the end of the test, after `a` and `b`
    // are dropped explicitly below) and are only read after the writes completed.
    let (s, d) = unsafe {
        (
            a.register(src.as_mut_ptr(), src.len())
                .expect("register src"),
            b.register(dst.as_mut_ptr(), dst.len())
                .expect("register dst"),
        )
    };
    const N: u64 = 1000;
    let (mut posted, mut done, mut got) = (0u64, 0u64, 0u64);
    let end = Instant::now() + Duration::from_secs(120);
    while done < N || got < N {
        while posted < N {
            let off = (posted * 64) % (64 << 10);
            match a.try_write_imm(
                PeerId(1),
                0,
                s.token,
                off,
                64,
                RemoteSlice {
                    token: d.token,
                    offset: off,
                },
                posted as u32,
                posted,
            ) {
                Ok(()) => posted += 1,
                Err(e) if e.is_busy() => break,
                Err(e) => panic!("write {posted}: {e}"),
            }
        }
        pump(&mut a, &mut ea, &mut b, &mut eb);
        done += ea
            .drain(..)
            .filter(|e| matches!(e, Event::WriteDone { .. }))
            .count() as u64;
        for e in eb.drain(..) {
            if let Event::WriteReceived {
                imm, token, len, ..
            } = e
            {
                assert_eq!((imm as u64, token, len), (got, d.token, 64), "in order");
                got += 1;
            }
        }
        assert!(
            Instant::now() < end,
            "1000 writes did not finish: {done} done, {got} received"
        );
    }
    // The same range under a second token: no new NIC registration.
    // SAFETY: as above.
    let s2 = unsafe { a.register(src.as_mut_ptr(), src.len()) }.expect("register again");
    a.try_write_imm(
        PeerId(1),
        0,
        s2.token,
        0,
        8,
        RemoteSlice {
            token: d.token,
            offset: 0,
        },
        1,
        1,
    )
    .expect("write from the second token");
    wait(&mut a, &mut ea, Duration::from_secs(20), "WriteDone", |e| {
        matches!(e, Event::WriteDone { wr_id: 1, .. }).then_some(())
    });
    let (sa, sb) = (a.rdma_stats(), b.rdma_stats());
    eprintln!("sender {sa:?}\nreceiver {sb:?}");
    assert_eq!(
        sa.mr_registrations - before.0.mr_registrations,
        1,
        "source registered once"
    );
    assert_eq!(
        sb.mr_registrations - before.1.mr_registrations,
        1,
        "destination registered once"
    );
    assert_eq!(
        sa.resolves_sent - before.0.resolves_sent,
        1,
        "destination token resolved once"
    );
    assert_eq!(sa.writes_posted - before.0.writes_posted, N + 1);
    assert!(
        dst[..(N * 64) as usize].iter().all(|x| *x == 7),
        "every write landed"
    );
    drop((a, b));
}

/// The receiver process is killed (SIGKILL) while 64 MiB writes stream into it: the writer
/// reports `PeerLost` for it within seconds, and nothing hangs.
#[test]
fn peer_killed_mid_transfer_is_lost_not_hung() {
    if std::env::var("BPS_RDMA_CHILD").is_ok() || !have_device() {
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "child_receiver",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("BPS_RDMA_CHILD", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the receiver");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    let (addr, token) = loop {
        line.clear();
        assert!(
            out.read_line(&mut line).expect("read") > 0,
            "the receiver exited early"
        );
        // libtest prints "test child_receiver ... " on the same line first.
        if let Some(rest) = line.find("CHILD ").map(|i| line[i + 6..].trim()) {
            let (a, t) = rest.split_once(' ').expect("addr token");
            break (a.parse().expect("addr"), t.parse::<u64>().expect("token"));
        }
    };
    let mut a = Net::bind(config(0)).expect("bind");
    let host = a.local_addr().host;
    a.add_peer(
        PeerId(1),
        PeerAddr {
            tcp: addr,
            unix: None,
            host,
        },
    )
    .expect("add the receiver");
    let mut ev = Vec::new();
    wait(&mut a, &mut ev, Duration::from_secs(20), "Connected", |e| {
        matches!(
            e,
            Event::Connected {
                kind: LinkKind::Rdma,
                ..
            }
        )
        .then_some(())
    });
    const LEN: usize = 64 << 20;
    let mut src = vec![1u8; LEN].into_boxed_slice();
    // SAFETY: `src` outlives `a` (dropped explicitly below first).
    let s = unsafe { a.register(src.as_mut_ptr(), LEN) }.expect("register");
    let mut i = 0u64;
    let mut done = 0;
    // Stream until the first write completed, then kill the receiver with writes in flight.
    while done == 0 {
        match a.try_write_imm(
            PeerId(1),
            0,
            s.token,
            0,
            LEN as u64,
            RemoteSlice { token, offset: 0 },
            i as u32,
            i,
        ) {
            Ok(()) => i += 1,
            Err(e) if e.is_busy() => {}
            Err(e) => panic!("write: {e}"),
        }
        a.poll(&mut ev, Some(Duration::from_millis(5)))
            .expect("poll");
        done += ev
            .iter()
            .filter(|e| matches!(e, Event::WriteDone { .. }))
            .count();
        ev.retain(|e| !matches!(e, Event::WriteDone { .. }));
    }
    for _ in 0..4 {
        let _ = a.try_write_imm(
            PeerId(1),
            0,
            s.token,
            0,
            LEN as u64,
            RemoteSlice { token, offset: 0 },
            0,
            0,
        );
    }
    child.kill().expect("kill the receiver");
    let killed = Instant::now();
    let _ = child.wait();
    let why = wait(
        &mut a,
        &mut ev,
        Duration::from_secs(30),
        "PeerLost",
        |e| match e {
            Event::PeerLost { peer, error } if *peer == PeerId(1) => Some(error.to_string()),
            _ => None,
        },
    );
    eprintln!(
        "receiver killed; PeerLost after {:?}: {why}",
        killed.elapsed()
    );
    assert!(killed.elapsed() < Duration::from_secs(30));
    match a.try_send(PeerId(1), 0, b"anyone?") {
        Err(bps_transport::Error::PeerLost { .. }) => {}
        other => panic!("send to the lost peer: {other:?}"),
    }
    drop(a);
    drop(src);
}

/// The receiving side of `peer_killed_mid_transfer_is_lost_not_hung`, run in a child process.
#[test]
fn child_receiver() {
    if std::env::var("BPS_RDMA_CHILD").is_err() {
        return;
    }
    let mut b = Net::bind(config(1)).expect("bind");
    let mut dst = vec![0u8; 64 << 20].into_boxed_slice();
    // SAFETY: `dst` lives until the process is killed (never freed while `b` lives).
    let d = unsafe { b.register(dst.as_mut_ptr(), dst.len()) }.expect("register");
    let addr = b.local_addr().tcp;
    println!("CHILD {addr} {}", d.token);
    std::io::stdout().flush().expect("flush");
    let mut ev = Vec::new();
    let end = Instant::now() + Duration::from_secs(120);
    while Instant::now() < end {
        b.poll(&mut ev, Some(Duration::from_millis(10)))
            .expect("poll");
        ev.clear();
    }
    drop(b);
    drop(dst);
}

/// Where there is no device, `BPS_TRANSPORT=rdma` falls back to tcp: the peers connect over
/// tcp and messages flow.
#[test]
fn without_device_rdma_falls_back_to_tcp() {
    if rdma::probe(&rdma_config()).is_ok() {
        eprintln!("skipped: this machine has an RDMA device");
        return;
    }
    let mut a = Net::bind(config(0)).expect("bind 0");
    let mut b = Net::bind(config(1)).expect("bind 1");
    a.add_peer(PeerId(1), b.local_addr()).expect("add");
    b.add_peer(PeerId(0), a.local_addr()).expect("add");
    a.try_send(PeerId(1), 0, b"over tcp").expect("send");
    let (mut ea, mut eb) = (Vec::new(), Vec::new());
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        pump(&mut a, &mut ea, &mut b, &mut eb);
        if eb
            .iter()
            .any(|e| matches!(e, Event::Message { data, .. } if data == b"over tcp"))
        {
            break;
        }
        assert!(Instant::now() < end, "{ea:?} {eb:?}");
    }
    assert!(ea.iter().any(|e| matches!(
        e,
        Event::Connected {
            kind: LinkKind::Tcp,
            ..
        }
    )));
    assert_eq!(a.link_kind(PeerId(1)), Some(LinkKind::Tcp));
    assert_eq!(a.rdma_stats(), Default::default());
}

/// "Writes still arriving for it are discarded", the case RDMA can honour: the write landed
/// (the sender got `WriteDone`) but the receiver has not polled its completion when it
/// deregisters the destination: no `WriteReceived` is reported and the link stays usable. A
/// warm-up write resolves the token first (the conformance version of this test polls only the
/// sender, so the first resolution could never be answered).
#[test]
fn deregister_discards_a_write_already_landed() {
    if !have_device() {
        return;
    }
    let mut a = Net::bind(config(0)).expect("bind 0");
    let mut b = Net::bind(config(1)).expect("bind 1");
    let (mut ea, mut eb) = connect(&mut a, &mut b);
    let mut src = vec![5u8; 4096].into_boxed_slice();
    let mut dst = vec![0u8; 4096].into_boxed_slice();
    // SAFETY: both buffers outlive the Nets (dropped explicitly first).
    let (s, d) = unsafe {
        (
            a.register(src.as_mut_ptr(), 4096).expect("register"),
            b.register(dst.as_mut_ptr(), 4096).expect("register"),
        )
    };
    let w = |a: &mut Net, imm: u32| {
        a.try_write_imm(
            PeerId(1),
            0,
            s.token,
            0,
            4096,
            RemoteSlice {
                token: d.token,
                offset: 0,
            },
            imm,
            u64::from(imm),
        )
        .expect("write")
    };
    w(&mut a, 1);
    let end = Instant::now() + Duration::from_secs(20);
    while !eb
        .iter()
        .any(|e| matches!(e, Event::WriteReceived { imm: 1, .. }))
    {
        assert!(Instant::now() < end, "warm-up write");
        pump(&mut a, &mut ea, &mut b, &mut eb);
    }
    eb.clear();
    w(&mut a, 2);
    wait(
        &mut a,
        &mut ea,
        Duration::from_secs(20),
        "WriteDone of the second write",
        |e| matches!(e, Event::WriteDone { wr_id: 2, .. }).then_some(()),
    );
    b.deregister(d.token)
        .expect("deregister with a landed, unreported write");
    a.try_send(PeerId(1), 0, b"behind the write").expect("send");
    let got = wait(
        &mut b,
        &mut eb,
        Duration::from_secs(20),
        "the message behind the write",
        |e| match e {
            Event::WriteReceived { .. } => Some(Err(format!("{e:?}"))),
            Event::Message { data, .. } if data == b"behind the write" => Some(Ok(())),
            _ => None,
        },
    );
    got.expect("the discarded write was reported");
    drop((a, b));
}

/// Net-level throughput of 1 MiB `try_write_imm`s (64 MiB in all), over RDMA and over tcp on the
/// same machine, for the report (not asserted).
#[test]
fn net_write_throughput_rdma_vs_tcp() {
    if !have_device() {
        return;
    }
    for kind in [LinkKind::Rdma, LinkKind::Tcp] {
        let mk = |me| {
            let mut c = config(me);
            c.force = Some(kind);
            Net::bind(c).expect("bind")
        };
        let (mut a, mut b) = (mk(0), mk(1));
        a.add_peer(PeerId(1), b.local_addr()).expect("add");
        b.add_peer(PeerId(0), a.local_addr()).expect("add");
        let (mut ea, mut eb) = (Vec::new(), Vec::new());
        let end = Instant::now() + Duration::from_secs(20);
        while !ea.iter().any(|e| matches!(e, Event::Connected { .. })) {
            assert!(Instant::now() < end);
            pump(&mut a, &mut ea, &mut b, &mut eb);
        }
        const TOTAL: usize = 64 << 20;
        const CHUNK: u64 = 1 << 20;
        let mut src = vec![3u8; TOTAL].into_boxed_slice();
        let mut dst = vec![0u8; TOTAL].into_boxed_slice();
        // SAFETY: both buffers outlive the Nets (dropped explicitly first).
        let (s, d) = unsafe {
            (
                a.register(src.as_mut_ptr(), TOTAL).expect("register"),
                b.register(dst.as_mut_ptr(), TOTAL).expect("register"),
            )
        };
        let n = (TOTAL as u64) / CHUNK;
        let start = Instant::now();
        let (mut posted, mut got) = (0u64, 0u64);
        while got < n {
            while posted < n {
                let off = posted * CHUNK;
                match a.try_write_imm(
                    PeerId(1),
                    0,
                    s.token,
                    off,
                    CHUNK,
                    RemoteSlice {
                        token: d.token,
                        offset: off,
                    },
                    posted as u32,
                    posted,
                ) {
                    Ok(()) => posted += 1,
                    Err(e) if e.is_busy() => break,
                    Err(e) => panic!("{e}"),
                }
            }
            pump(&mut a, &mut ea, &mut b, &mut eb);
            ea.clear();
            got += eb
                .drain(..)
                .filter(|e| matches!(e, Event::WriteReceived { .. }))
                .count() as u64;
            assert!(
                start.elapsed() < Duration::from_secs(180),
                "{kind}: {got} of {n}"
            );
        }
        let secs = start.elapsed().as_secs_f64();
        assert!(dst.iter().all(|x| *x == 3));
        println!(
            "RESULT Net {kind}: 64 MiB as 1 MiB try_write_imm, two Nets in one thread: {:.1} MB/s",
            TOTAL as f64 / secs / 1e6
        );
        drop((a, b));
    }
}

/// Writes one `len`-byte write from `s` to `d` (at `offset`, immediate `imm`) and pumps both
/// sides until it was received and completed.
#[allow(clippy::too_many_arguments)]
fn write_and_wait(
    a: &mut Net,
    ea: &mut Vec<Event>,
    b: &mut Net,
    eb: &mut Vec<Event>,
    s: u64,
    d: u64,
    offset: u64,
    len: u64,
    imm: u32,
) {
    a.try_write_imm(
        PeerId(1),
        0,
        s,
        offset,
        len,
        RemoteSlice { token: d, offset },
        imm,
        u64::from(imm),
    )
    .expect("write");
    let end = Instant::now() + Duration::from_secs(20);
    let (mut done, mut got) = (false, false);
    while !(done && got) {
        assert!(Instant::now() < end, "write {imm}: {ea:?} / {eb:?}");
        pump(a, ea, b, eb);
        done |= ea
            .drain(..)
            .any(|e| matches!(e, Event::WriteDone { wr_id, .. } if wr_id == u64::from(imm)));
        got |= eb
            .drain(..)
            .any(|e| matches!(e, Event::WriteReceived { imm: i, .. } if i == imm));
    }
}

/// Once the peer knows a destination (token, offset, length, immediate), a write to it is one
/// WRITE_WITH_IMM: no descriptor, no definition; writes queued while others are in flight go
/// out in batches with one signaled request per batch (or per `SIGNAL_EVERY`).
#[test]
fn steady_writes_are_one_request_each_posted_in_batches() {
    if !have_device() {
        return;
    }
    let mut a = Net::bind(config(0)).expect("bind 0");
    let mut b = Net::bind(config(1)).expect("bind 1");
    let (mut ea, mut eb) = connect(&mut a, &mut b);
    const LEN: usize = 4096;
    let mut src = vec![9u8; LEN].into_boxed_slice();
    let mut dst = vec![0u8; LEN].into_boxed_slice();
    // SAFETY: both buffers outlive the Nets (dropped explicitly first).
    let (s, d) = unsafe {
        (
            a.register(src.as_mut_ptr(), LEN).expect("register"),
            b.register(dst.as_mut_ptr(), LEN).expect("register"),
        )
    };
    // The first write resolves the token and defines the destination.
    write_and_wait(
        &mut a, &mut ea, &mut b, &mut eb, s.token, d.token, 0, LEN as u64, 7,
    );
    let before = a.rdma_stats();
    const N: u64 = 300;
    let (mut posted, mut done, mut got) = (0u64, 0u64, 0u64);
    let end = Instant::now() + Duration::from_secs(120);
    while done < N || got < N {
        while posted < N {
            match a.try_write_imm(
                PeerId(1),
                0,
                s.token,
                0,
                LEN as u64,
                RemoteSlice {
                    token: d.token,
                    offset: 0,
                },
                7,
                1000 + posted,
            ) {
                Ok(()) => posted += 1,
                Err(e) if e.is_busy() => break,
                Err(e) => panic!("write {posted}: {e}"),
            }
        }
        pump(&mut a, &mut ea, &mut b, &mut eb);
        done += ea
            .drain(..)
            .filter(|e| matches!(e, Event::WriteDone { wr_id, .. } if *wr_id >= 1000))
            .count() as u64;
        for e in eb.drain(..) {
            if let Event::WriteReceived {
                imm,
                token,
                offset,
                len,
                ..
            } = e
            {
                assert_eq!((imm, token, offset, len), (7, d.token, 0, LEN as u64));
                got += 1;
            }
        }
        assert!(
            Instant::now() < end,
            "{N} writes did not finish: {done} done, {got} received"
        );
    }
    let after = a.rdma_stats();
    let diff = |f: fn(&rdma::RdmaStats) -> u64| f(&after) - f(&before);
    let (wrs, signaled, posts) = (
        diff(|s| s.send_requests),
        diff(|s| s.signaled_requests),
        diff(|s| s.post_calls),
    );
    eprintln!(
        "{N} writes: {wrs} work requests in {posts} posts, {signaled} signaled; {} \
         completions, {} wake-ups of the event loop, {} sleeps of the poller",
        diff(|s| s.completions),
        diff(|s| s.poller_wakeups),
        diff(|s| s.poller_sleeps)
    );
    assert_eq!(
        diff(|s| s.dest_defines),
        0,
        "no definition for a known destination"
    );
    assert_eq!(wrs, N, "one work request per write");
    assert!(posts < N, "writes queued behind others are posted together");
    assert!(signaled < N, "not every request is signaled");
    assert!(
        signaled >= N / u64::from(32u32),
        "at least every 32nd request is signaled"
    );
    assert!(dst.iter().all(|x| *x == 9));
    drop((a, b));
}

/// More distinct destinations than the destination table holds: slots are reused, and every
/// write is still reported with its own immediate, offset and length.
#[test]
fn destination_table_reuses_slots() {
    if !have_device() {
        return;
    }
    let mut a = Net::bind(config(0)).expect("bind 0");
    let mut b = Net::bind(config(1)).expect("bind 1");
    let (mut ea, mut eb) = connect(&mut a, &mut b);
    const N: u64 = 4096 + 300;
    const LEN: usize = (N * 8) as usize;
    let mut src: Box<[u8]> = (0..LEN).map(|i| (i / 8) as u8 ^ (i as u8)).collect();
    let mut dst = vec![0u8; LEN].into_boxed_slice();
    // SAFETY: both buffers outlive the Nets (dropped explicitly first).
    let (s, d) = unsafe {
        (
            a.register(src.as_mut_ptr(), LEN).expect("register"),
            b.register(dst.as_mut_ptr(), LEN).expect("register"),
        )
    };
    write_and_wait(&mut a, &mut ea, &mut b, &mut eb, s.token, d.token, 0, 8, 0);
    let before = a.rdma_stats();
    let (mut posted, mut done, mut got) = (1u64, 1u64, 1u64);
    let end = Instant::now() + Duration::from_secs(180);
    while done < N || got < N {
        while posted < N {
            let off = posted * 8;
            match a.try_write_imm(
                PeerId(1),
                0,
                s.token,
                off,
                8,
                RemoteSlice {
                    token: d.token,
                    offset: off,
                },
                posted as u32,
                posted,
            ) {
                Ok(()) => posted += 1,
                Err(e) if e.is_busy() => break,
                Err(e) => panic!("write {posted}: {e}"),
            }
        }
        pump(&mut a, &mut ea, &mut b, &mut eb);
        done += ea
            .drain(..)
            .filter(|e| matches!(e, Event::WriteDone { .. }))
            .count() as u64;
        for e in eb.drain(..) {
            if let Event::WriteReceived {
                imm, offset, len, ..
            } = e
            {
                assert_eq!(
                    (u64::from(imm), offset, len),
                    (got, got * 8, 8),
                    "write {got} reported in order, with its own destination"
                );
                got += 1;
            }
        }
        assert!(
            Instant::now() < end,
            "{N} writes did not finish: {done} done, {got} received"
        );
    }
    assert_eq!(
        a.rdma_stats().dest_defines - before.dest_defines,
        N - 1,
        "one definition per new destination"
    );
    assert!(dst == src, "every write landed");
    drop((a, b));
}

/// An event loop blocked in `poll` with a long timeout is woken by the poller thread as soon as
/// a write lands (the completion does not wait for the timeout).
#[test]
fn blocked_poll_wakes_on_completion() {
    if !have_device() {
        return;
    }
    let mut a = Net::bind(config(0)).expect("bind 0");
    let mut b = Net::bind(config(1)).expect("bind 1");
    let (mut ea, mut eb) = connect(&mut a, &mut b);
    let mut src = vec![1u8; 4096].into_boxed_slice();
    let mut dst = vec![0u8; 4096].into_boxed_slice();
    // SAFETY: both buffers outlive the Nets (`src` travels with `a` and comes back with it;
    // both Nets are dropped before the buffers).
    let (s, d) = unsafe {
        (
            a.register(src.as_mut_ptr(), 4096).expect("register"),
            b.register(dst.as_mut_ptr(), 4096).expect("register"),
        )
    };
    write_and_wait(
        &mut a, &mut ea, &mut b, &mut eb, s.token, d.token, 0, 4096, 1,
    );
    let wakeups = b.rdma_stats().poller_wakeups;
    // The write is issued from another thread once `b` sleeps in `poll`.
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        a.try_write_imm(
            PeerId(1),
            0,
            s.token,
            0,
            4096,
            RemoteSlice {
                token: d.token,
                offset: 0,
            },
            2,
            2,
        )
        .expect("write");
        let end = Instant::now() + Duration::from_secs(20);
        let mut ea = Vec::new();
        while !ea
            .iter()
            .any(|e| matches!(e, Event::WriteDone { wr_id: 2, .. }))
        {
            assert!(Instant::now() < end, "no WriteDone: {ea:?}");
            a.poll(&mut ea, Some(Duration::from_millis(10)))
                .expect("poll");
        }
        (a, src)
    });
    let start = Instant::now();
    let mut waits = 0;
    while !eb
        .iter()
        .any(|e| matches!(e, Event::WriteReceived { imm: 2, .. }))
    {
        assert!(waits < 3, "no WriteReceived after {waits} polls of 10 s");
        b.poll(&mut eb, Some(Duration::from_secs(10)))
            .expect("poll");
        waits += 1;
    }
    let took = start.elapsed();
    let (a, src) = writer.join().expect("the writer thread");
    eprintln!(
        "woken after {took:?} (the write was issued after 300 ms); wake-ups of the event loop \
         {wakeups} -> {}",
        b.rdma_stats().poller_wakeups
    );
    assert!(
        took < Duration::from_secs(5),
        "the blocked poll waited {took:?} for a landed write"
    );
    assert!(
        b.rdma_stats().poller_wakeups > wakeups,
        "woken by the poller thread"
    );
    drop((a, b));
    drop((src, dst));
}

// ------------------------------------------------------------------ device memory (dma-buf)

/// `Net::register_dmabuf` where it cannot work, on any machine: without the feature, without a
/// device, or with tcp forced, the error says why (and nothing is registered).
#[test]
fn register_dmabuf_without_an_rdma_device_says_why() {
    let null = std::fs::File::open("/dev/null").expect("/dev/null");
    let reason = |net: &mut Net| {
        // SAFETY: refused before anything is registered.
        match unsafe { net.register_dmabuf(std::os::fd::AsFd::as_fd(&null), 0, 4096, 0x1000) } {
            Err(bps_transport::Error::Unsupported { feature, reason }) => {
                assert_eq!(feature, "rdma");
                reason
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
    };
    let mut tcp = config(0);
    tcp.force = Some(LinkKind::Tcp);
    let mut net = Net::bind(tcp).expect("bind");
    let r = reason(&mut net);
    eprintln!("tcp forced: {r}");
    assert!(
        r.contains("device memory (a dma-buf) can only be registered with an RDMA device"),
        "{r}"
    );
    if rdma::COMPILED {
        assert!(r.contains("this process forces tcp"), "{r}");
    } else {
        assert!(r.contains("feature `rdma`"), "{r}");
    }
    assert_eq!(net.rdma_stats().mr_registrations, 0);
    if rdma::probe(&rdma_config()).is_err() {
        let mut net = Net::bind(config(1)).expect("bind");
        let r = reason(&mut net);
        eprintln!("no device: {r}");
        assert!(
            r.contains("device memory (a dma-buf) can only be registered with an RDMA device"),
            "{r}"
        );
    }
}

/// A dma-buf of host memory (the kernel's udmabuf from a sealed memfd, else a vgem buffer),
/// mapped into this process so that its bytes can be checked.
struct DmaBuf {
    fd: std::os::fd::OwnedFd,
    map: *mut u8,
    len: usize,
    what: String,
    /// What else must stay open (the memfd, the DRM device).
    _keep: Vec<std::os::fd::OwnedFd>,
}

impl DmaBuf {
    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `map` is a shared mapping of `len` bytes, alive until drop; while a test reads
        // or writes it no RDMA operation on the region is in flight (it waits for completions).
        unsafe { std::slice::from_raw_parts_mut(self.map, self.len) }
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        // SAFETY: `map` came from mmap with this length and is not used after this.
        unsafe { libc::munmap(self.map.cast(), self.len) };
    }
}

fn owned(fd: i32, what: &str) -> Result<std::os::fd::OwnedFd, String> {
    use std::os::fd::FromRawFd;
    if fd < 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a descriptor just returned to us, owned by nothing else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Maps `len` bytes of `fd` shared, read-write.
fn map(fd: &std::os::fd::OwnedFd, len: usize, what: &str) -> Result<*mut u8, String> {
    use std::os::fd::AsRawFd;
    // SAFETY: a fresh shared mapping of an open descriptor; checked below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap {what}: {}", std::io::Error::last_os_error()));
    }
    Ok(p.cast())
}

/// `/dev/udmabuf` (CONFIG_UDMABUF): a memfd sealed against shrinking becomes a dma-buf.
fn udmabuf(len: usize) -> Result<DmaBuf, String> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct UdmabufCreate {
        memfd: u32,
        flags: u32,
        offset: u64,
        size: u64,
    }
    // _IOW('u', 0x42, struct udmabuf_create)
    const UDMABUF_CREATE: libc::c_ulong = 0x4018_7542;
    const UDMABUF_FLAGS_CLOEXEC: u32 = 1;
    let _ = Command::new("modprobe").args(["-q", "udmabuf"]).status();
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/udmabuf")
        .map_err(|e| format!("/dev/udmabuf: {e} (a kernel without CONFIG_UDMABUF)"))?;
    // SAFETY: a NUL-terminated name and valid flags; the result is checked by `owned`.
    let memfd = owned(
        unsafe {
            libc::memfd_create(
                c"bps-udmabuf".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        },
        "memfd_create",
    )?;
    // SAFETY: `memfd` is open; ftruncate sizes it, F_ADD_SEALS seals it (udmabuf requires
    // F_SEAL_SHRINK).
    unsafe {
        if libc::ftruncate(memfd.as_raw_fd(), len as libc::off_t) != 0
            || libc::fcntl(memfd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) != 0
        {
            return Err(format!("memfd: {}", std::io::Error::last_os_error()));
        }
    }
    let create = UdmabufCreate {
        memfd: memfd.as_raw_fd() as u32,
        flags: UDMABUF_FLAGS_CLOEXEC,
        offset: 0,
        size: len as u64,
    };
    // SAFETY: UDMABUF_CREATE reads one `struct udmabuf_create` (repr(C), same layout) and
    // returns a new dma-buf descriptor, checked by `owned`.
    let fd = owned(
        unsafe { libc::ioctl(dev.as_raw_fd(), UDMABUF_CREATE as _, &create) },
        "UDMABUF_CREATE",
    )?;
    let map = map(&memfd, len, "the memfd")?;
    Ok(DmaBuf {
        fd,
        map,
        len,
        what: "udmabuf (a sealed memfd)".into(),
        _keep: vec![memfd],
    })
}

/// vgem (CONFIG_DRM_VGEM): a dumb buffer of a virtual GEM device, exported as a dma-buf
/// (DRM PRIME) and mapped through the dma-buf.
fn vgem(len: usize) -> Result<DmaBuf, String> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    #[derive(Default)]
    struct CreateDumb {
        height: u32,
        width: u32,
        bpp: u32,
        flags: u32,
        handle: u32,
        pitch: u32,
        size: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct PrimeHandle {
        handle: u32,
        flags: u32,
        fd: i32,
    }
    // _IOWR('d', 0xB2, struct drm_mode_create_dumb), _IOWR('d', 0x2D, struct drm_prime_handle)
    const CREATE_DUMB: libc::c_ulong = 0xC020_64B2;
    const PRIME_HANDLE_TO_FD: libc::c_ulong = 0xC00C_642D;
    let _ = Command::new("modprobe").args(["-q", "vgem"]).status();
    let mut why = Vec::new();
    let mut cards: Vec<_> = std::fs::read_dir("/dev/dri")
        .map_err(|e| format!("/dev/dri: {e} (no vgem: a kernel without CONFIG_DRM_VGEM)"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("card"))
        })
        .collect();
    cards.sort();
    for card in cards {
        let dev = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&card)
        {
            Ok(d) => d,
            Err(e) => {
                why.push(format!("{}: {e}", card.display()));
                continue;
            }
        };
        let mut c = CreateDumb {
            height: (len / 4096) as u32,
            width: 1024,
            bpp: 32,
            ..CreateDumb::default()
        };
        // SAFETY: the ioctl reads and writes one `struct drm_mode_create_dumb` (same layout).
        if unsafe { libc::ioctl(dev.as_raw_fd(), CREATE_DUMB as _, &mut c) } != 0 {
            why.push(format!(
                "{}: DRM_IOCTL_MODE_CREATE_DUMB: {}",
                card.display(),
                std::io::Error::last_os_error()
            ));
            continue;
        }
        let mut p = PrimeHandle {
            handle: c.handle,
            flags: (libc::O_CLOEXEC | libc::O_RDWR) as u32,
            fd: -1,
        };
        // SAFETY: the ioctl reads and writes one `struct drm_prime_handle` (same layout).
        let rc = unsafe { libc::ioctl(dev.as_raw_fd(), PRIME_HANDLE_TO_FD as _, &mut p) };
        let fd = match owned(
            if rc == 0 { p.fd } else { -1 },
            "DRM_IOCTL_PRIME_HANDLE_TO_FD",
        ) {
            Ok(fd) => fd,
            Err(e) => {
                why.push(format!("{}: {e}", card.display()));
                continue;
            }
        };
        if (c.size as usize) < len {
            why.push(format!(
                "{}: dumb buffer of {} bytes",
                card.display(),
                c.size
            ));
            continue;
        }
        let map = map(&fd, len, "the vgem dma-buf")?;
        return Ok(DmaBuf {
            fd,
            map,
            len,
            what: format!("vgem dumb buffer ({})", card.display()),
            _keep: vec![dev.into()],
        });
    }
    Err(format!("no vgem device: {}", why.join("; ")))
}

/// A dma-buf of `len` bytes (a multiple of the page size) from whichever source this kernel has.
fn dmabuf(len: usize) -> Result<DmaBuf, String> {
    udmabuf(len).or_else(|u| vgem(len).map_err(|v| format!("{u}; {v}")))
}

/// Device memory over rdma, for real on the guest's rxe0: a dma-buf (udmabuf or vgem) is
/// registered with `Net::register_dmabuf`. Where the device takes it, a WRITE_WITH_IMM from it
/// into a host region of the peer and one from the peer's host region into it carry the bytes
/// (checked through the CPU mapping), and a write from it to a peer on tcp is refused. Where the
/// device refuses dma-bufs (Soft-RoCE has no dma-buf registration), the error must be the clear
/// one naming the device, the fd, offset and length.
#[test]
fn dmabuf_region_writes_over_rdma_or_says_why_not() {
    use std::os::fd::{AsFd, AsRawFd};
    if !have_device() {
        return;
    }
    const LEN: usize = 64 << 10;
    let mut a = Net::bind(config(0)).expect("bind 0");
    let mut b = Net::bind(config(1)).expect("bind 1");
    let (mut ea, mut eb) = connect(&mut a, &mut b);
    let dev = rdma::probe(&rdma_config()).expect("device").device;
    let mut buf = match dmabuf(LEN) {
        Ok(d) => d,
        Err(why) => {
            // No dma-buf exporter in this kernel: the device must still refuse a plain memfd in
            // words (not a dma-buf, or no dma-buf support at all).
            println!("RESULT dma-buf: no exporter here ({why}); registering a memfd instead");
            // SAFETY: a NUL-terminated name; checked by `owned`.
            let memfd = owned(
                unsafe { libc::memfd_create(c"bps-memfd".as_ptr(), libc::MFD_CLOEXEC) },
                "memfd_create",
            )
            .expect("memfd");
            // SAFETY: sizes the open memfd.
            let rc = unsafe { libc::ftruncate(memfd.as_raw_fd(), LEN as libc::off_t) };
            assert_eq!(rc, 0, "ftruncate: {}", std::io::Error::last_os_error());
            // SAFETY: refused (not a dma-buf); nothing writes into it.
            let err = unsafe { a.register_dmabuf(memfd.as_fd(), 0, LEN, 0x10_0000) }
                .expect_err("a memfd is not a dma-buf");
            println!("RESULT register_dmabuf(memfd) on {dev}: {err}");
            let text = err.to_string();
            assert!(
                text.contains(&format!("device {dev} cannot register dma-buf memory"))
                    || text.contains(&format!("fd {} is not a dma-buf", memfd.as_raw_fd())),
                "{text}"
            );
            return;
        }
    };
    println!(
        "dma-buf: {} of {LEN} bytes, fd {}",
        buf.what,
        buf.fd.as_raw_fd()
    );
    for (i, x) in buf.bytes().iter_mut().enumerate() {
        *x = (i as u8).wrapping_mul(13) ^ 0x5a;
    }
    let iova = buf.map as u64;
    let before = a.rdma_stats().mr_registrations;
    // SAFETY: `buf` (and so the memory behind the dma-buf) outlives the Nets (dropped first);
    // its mapping is read only after the writes into the region completed.
    let reg = unsafe { a.register_dmabuf(buf.fd.as_fd(), 0, LEN, iova) };
    let s = match reg {
        Ok(s) => s,
        Err(err) => {
            let text = err.to_string();
            println!(
                "RESULT register_dmabuf({}) on {dev} refused: {text}",
                buf.what
            );
            let fd = buf.fd.as_raw_fd();
            for part in [
                format!("ibv_reg_dmabuf_mr on {dev}"),
                format!("dma-buf fd {fd}"),
                "offset 0".into(),
                format!("{LEN} bytes"),
            ] {
                assert!(text.contains(&part), "{part}: {text}");
            }
            if let bps_transport::Error::Unsupported { reason, .. } = &err {
                assert!(
                    reason.starts_with(&format!(
                        "device {dev} cannot register dma-buf memory (driver has no dma-buf \
                         support"
                    )),
                    "{reason}"
                );
            }
            // Nothing half-registered: the token space is untouched, stats unchanged.
            assert_eq!(a.rdma_stats().mr_registrations, before);
            return;
        }
    };
    println!("RESULT register_dmabuf({}) on {dev}: accepted", buf.what);
    assert_eq!(s.len, LEN as u64);
    assert_eq!(a.rdma_stats().mr_registrations, before + 1);
    let mut host = vec![0u8; LEN].into_boxed_slice();
    let mut src = (0..LEN)
        .map(|i| (i as u8).wrapping_mul(7) ^ 0xc3)
        .collect::<Vec<u8>>()
        .into_boxed_slice();
    // SAFETY: both buffers outlive the Nets (dropped explicitly first).
    let (d, bs) = unsafe {
        (
            b.register(host.as_mut_ptr(), LEN).expect("register"),
            b.register(src.as_mut_ptr(), LEN).expect("register"),
        )
    };
    // From the dma-buf region into the peer's host memory.
    a.try_write_imm(
        PeerId(1),
        0,
        s.token,
        0,
        LEN as u64,
        RemoteSlice {
            token: d.token,
            offset: 0,
        },
        1,
        1,
    )
    .expect("write from the dma-buf region");
    until_written(
        [(&mut a, &mut ea), (&mut b, &mut eb)],
        |e| matches!(e, Event::WriteDone { wr_id: 1, .. }),
        |e| matches!(e, Event::WriteReceived { imm: 1, .. }),
        "write from dma-buf",
    );
    assert!(host[..] == buf.bytes()[..], "bytes from the dma-buf");
    // From the peer's host memory into the dma-buf region (at an offset).
    b.try_write_imm(
        PeerId(0),
        0,
        bs.token,
        0,
        (LEN - 4096) as u64,
        RemoteSlice {
            token: s.token,
            offset: 4096,
        },
        2,
        2,
    )
    .expect("write into the dma-buf region");
    let dmabuf_token = s.token;
    until_written(
        [(&mut b, &mut eb), (&mut a, &mut ea)],
        |e| matches!(e, Event::WriteDone { wr_id: 2, .. }),
        |e| matches!(e, Event::WriteReceived { imm: 2, token, offset: 4096, .. } if *token == dmabuf_token),
        "write into dma-buf",
    );
    let expect_head: Vec<u8> = (0..4096)
        .map(|i| (i as u8).wrapping_mul(13) ^ 0x5a)
        .collect();
    assert!(buf.bytes()[..4096] == expect_head[..], "head untouched");
    assert!(
        buf.bytes()[4096..] == src[..LEN - 4096],
        "bytes into the dma-buf"
    );
    // A peer on tcp: refused, in words.
    let mut tcp = config(2);
    tcp.force = Some(LinkKind::Tcp);
    let mut c = Net::bind(tcp).expect("bind 2");
    a.add_peer(PeerId(2), c.local_addr()).expect("add 2");
    c.add_peer(PeerId(0), a.local_addr()).expect("add 0");
    let mut ec = Vec::new();
    let end = Instant::now() + Duration::from_secs(20);
    while !ea.iter().any(|e| {
        matches!(
            e,
            Event::Connected {
                peer: PeerId(2),
                ..
            }
        )
    }) {
        assert!(Instant::now() < end, "tcp peer: {ea:?} / {ec:?}");
        pump(&mut a, &mut ea, &mut c, &mut ec);
    }
    let err = a
        .try_write_imm(
            PeerId(2),
            0,
            s.token,
            0,
            64,
            RemoteSlice {
                token: 1,
                offset: 0,
            },
            3,
            3,
        )
        .expect_err("a write from device memory over tcp");
    println!("tcp peer: {err}");
    assert!(
        err.to_string()
            .contains("needs an rdma link: it is device memory registered through a dma-buf")
            && err.to_string().contains("the link to peer 2 is tcp"),
        "{err}"
    );
    a.deregister(s.token)
        .expect("deregister the dma-buf region");
    assert!(a.deregister(s.token).is_err(), "once");
    drop((a, b, c));
    drop((host, src));
}
