//! Property tests for the invariants the runtime relies on.

use std::collections::HashSet;

use bps_scheduler::{
    chunk_bytes, partition, ChunkIndex, CreditQueue, Error, Key, Priority, ServerAssigner, TensorId,
};
use proptest::prelude::*;

/// One step applied to a queue under test.
#[derive(Debug, Clone)]
enum Op {
    Push {
        priority: i32,
        bytes: u64,
    },
    Pop,
    /// Release the in-flight item at this position (modulo the number in flight).
    Release(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (-3i32..=3, 0u64..=40).prop_map(|(priority, bytes)| Op::Push { priority, bytes }),
        3 => Just(Op::Pop),
        2 => any::<usize>().prop_map(Op::Release),
    ]
}

/// Pop from `q`, checking against `peek` that the head leaves (strictness) and, on `None`,
/// that the head really does not fit.
fn checked_pop(q: &mut CreditQueue<usize>) -> Option<(usize, u64)> {
    let head = q.peek().map(|(&id, _, bytes)| (id, bytes));
    let in_flight = q.in_flight();
    let popped = q.pop();
    match (head, popped) {
        (None, None) => {}
        (Some((id, bytes)), Some(got)) => {
            assert_eq!(got, (id, bytes), "pop must return the head");
            assert!(in_flight == 0 || in_flight + bytes <= q.credit());
        }
        (Some((_, bytes)), None) => {
            assert!(in_flight > 0, "nothing in flight, yet the head was refused");
            assert!(
                in_flight + bytes > q.credit(),
                "the head fits, yet was refused"
            );
        }
        (None, Some(_)) => panic!("pop returned an item from an empty queue"),
    }
    popped
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn partition_covers_the_tensor_exactly_once(
        elems in 0usize..=50_000,
        elem_size in 1usize..=16,
        partition_bytes in 1usize..=70_000,
    ) {
        let total = elems * elem_size;
        let chunks = partition(total, elem_size, partition_bytes).unwrap();
        let size = chunk_bytes(elem_size, partition_bytes);
        prop_assert_eq!(size % elem_size, 0);
        prop_assert!(size >= elem_size);
        prop_assert!(size <= partition_bytes.max(elem_size));
        prop_assert_eq!(chunks.len(), total.div_ceil(size));
        let mut offset = 0;
        for (i, c) in chunks.iter().enumerate() {
            prop_assert_eq!(c.index, ChunkIndex(i as u32));
            prop_assert_eq!(c.offset, offset);
            prop_assert!(c.len > 0);
            prop_assert_eq!(c.len % elem_size, 0);
            prop_assert!(c.len <= size);
            if i + 1 < chunks.len() {
                prop_assert_eq!(c.len, size, "only the last chunk may be shorter");
            }
            offset += c.len;
        }
        prop_assert_eq!(offset, total);
    }

    #[test]
    fn partition_rejects_partial_elements(
        elems in 0usize..=10_000,
        elem_size in 2usize..=16,
        extra in 1usize..16,
        partition_bytes in 1usize..=70_000,
    ) {
        let extra = extra % elem_size;
        prop_assume!(extra != 0);
        let total = elems * elem_size + extra;
        prop_assert_eq!(
            partition(total, elem_size, partition_bytes),
            Err(Error::Misaligned { total_bytes: total, elem_size })
        );
    }

    #[test]
    fn key_round_trips(t in any::<u32>(), c in any::<u32>()) {
        let k = Key::new(TensorId(t), ChunkIndex(c));
        prop_assert_eq!(k.tensor(), TensorId(t));
        prop_assert_eq!(k.chunk(), ChunkIndex(c));
        prop_assert_eq!(k.to_string(), format!("t{t}.c{c}"));
    }

    #[test]
    fn assignment_is_total_deterministic_and_balanced(
        num_servers in 1u32..=16,
        tensors in prop::collection::vec((1usize..=5_000, 1usize..=8), 1..20),
        partition_bytes in 64usize..=4096,
    ) {
        let mut a = ServerAssigner::new(num_servers).unwrap();
        let mut b = ServerAssigner::new(num_servers).unwrap();
        let mut seen = HashSet::new();
        let mut largest = 0u64;
        let mut total = 0u64;
        for (t, &(elems, elem_size)) in tensors.iter().enumerate() {
            let tensor = TensorId(t as u32);
            let chunks = partition(elems * elem_size, elem_size, partition_bytes).unwrap();
            let servers = a.assign_tensor(tensor, &chunks);
            prop_assert_eq!(&servers, &b.assign_tensor(tensor, &chunks));
            prop_assert_eq!(servers.len(), chunks.len());
            for (c, s) in chunks.iter().zip(&servers) {
                let key = Key::new(tensor, c.index);
                prop_assert!(seen.insert(key), "key {} assigned twice", key);
                prop_assert!(s.0 < num_servers);
                prop_assert_eq!(a.server_of(key), Some(*s));
                // Asking again never moves a key.
                prop_assert_eq!(a.assign(key, c.len as u64), *s);
                largest = largest.max(c.len as u64);
                total += c.len as u64;
            }
        }
        prop_assert_eq!(a.loads(), b.loads());
        prop_assert_eq!(a.num_keys(), seen.len());
        prop_assert_eq!(a.loads().iter().sum::<u64>(), total);
        let max = *a.loads().iter().max().unwrap();
        let min = *a.loads().iter().min().unwrap();
        prop_assert!(max - min <= largest, "spread {} > largest chunk {}", max - min, largest);
    }

    #[test]
    fn balance_holds_for_arbitrary_sizes(
        num_servers in 1u32..=16,
        sizes in prop::collection::vec(0u64..=1 << 30, 0..300),
    ) {
        let mut a = ServerAssigner::new(num_servers).unwrap();
        for (i, &bytes) in sizes.iter().enumerate() {
            let s = a.assign(Key(i as u64), bytes);
            prop_assert!(s.0 < num_servers);
        }
        let largest = sizes.iter().copied().max().unwrap_or(0);
        let max = *a.loads().iter().max().unwrap();
        let min = *a.loads().iter().min().unwrap();
        prop_assert!(max - min <= largest);
    }

    #[test]
    fn queue_respects_credit_and_never_starves(
        credit in 0u64..=100,
        ops in prop::collection::vec(op(), 0..200),
    ) {
        let mut q = CreditQueue::new(credit);
        let mut flying: Vec<u64> = Vec::new();
        let mut queued = 0usize;
        let mut next_id = 0usize;
        let check = |q: &CreditQueue<usize>, flying: &[u64], queued: usize| {
            assert_eq!(q.in_flight(), flying.iter().sum::<u64>());
            // Zero-byte items take no credit, so only items with bytes count here.
            let sized = flying.iter().filter(|&&b| b > 0).count();
            assert!(
                q.in_flight() <= q.credit() || sized == 1,
                "{} bytes in flight over {} items, credit {}",
                q.in_flight(), sized, q.credit()
            );
            assert_eq!(q.len(), queued);
            assert_eq!(q.is_empty(), queued == 0);
        };
        for op in ops {
            match op {
                Op::Push { priority, bytes } => {
                    q.push(next_id, Priority(priority), bytes);
                    next_id += 1;
                    queued += 1;
                }
                Op::Pop => {
                    if let Some((_, bytes)) = checked_pop(&mut q) {
                        flying.push(bytes);
                        queued -= 1;
                    }
                }
                Op::Release(i) => {
                    if !flying.is_empty() {
                        let bytes = flying.swap_remove(i % flying.len());
                        q.release(bytes);
                    }
                }
            }
            check(&q, &flying, queued);
        }
        // Release everything in flight: from here on, pop must always make progress.
        for bytes in flying.drain(..) {
            q.release(bytes);
        }
        prop_assert_eq!(q.in_flight(), 0);
        while !q.is_empty() {
            let (_, bytes) = checked_pop(&mut q).expect("starved with nothing in flight");
            queued -= 1;
            // Pop more while it fits, then release all of them.
            flying.push(bytes);
            while let Some((_, bytes)) = checked_pop(&mut q) {
                flying.push(bytes);
                queued -= 1;
            }
            check(&q, &flying, queued);
            for bytes in flying.drain(..) {
                q.release(bytes);
            }
        }
        prop_assert_eq!(q.in_flight(), 0);
    }

    #[test]
    fn unlimited_queue_pops_by_priority_then_fifo(
        priorities in prop::collection::vec(-4i32..=4, 0..200),
    ) {
        let mut q = CreditQueue::unlimited();
        for (i, &p) in priorities.iter().enumerate() {
            q.push(i, Priority(p), i as u64);
        }
        let popped: Vec<usize> = std::iter::from_fn(|| q.pop().map(|(i, _)| i)).collect();
        let mut expected: Vec<usize> = (0..priorities.len()).collect();
        // Stable sort: equal priorities keep push order.
        expected.sort_by_key(|&i| std::cmp::Reverse(priorities[i]));
        prop_assert_eq!(popped, expected);
    }

    #[test]
    fn drain_matches_pop_order(
        priorities in prop::collection::vec(-4i32..=4, 0..100),
    ) {
        let mut a = CreditQueue::unlimited();
        let mut b = CreditQueue::new(0);
        for (i, &p) in priorities.iter().enumerate() {
            a.push(i, Priority(p), 1);
            b.push(i, Priority(p), 1);
        }
        let popped: Vec<usize> = std::iter::from_fn(|| a.pop().map(|(i, _)| i)).collect();
        prop_assert_eq!(b.drain(), popped);
        prop_assert!(b.is_empty());
        prop_assert_eq!(b.in_flight(), 0);
    }
}
