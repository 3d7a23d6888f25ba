//! Shared pieces of bps's criterion microbenchmarks: the parameter tensors of two reference
//! models, built from their architectures, and a few helpers the benches share.
//!
//! The benches themselves are in `benches/` (`scheduler`, `cq`, `sum`, `codec`); `README.md`
//! says what each measures and how to run it.
//!
//! # What it does not do
//!
//! It measures nothing by itself and depends on no bps crate (only the benches do), so the
//! model lists can be reused without pulling in the runtime.
//!
//! # Example
//!
//! ```
//! let resnet = bps_benches::resnet50();
//! assert_eq!(resnet.len(), 161);
//! assert_eq!(bps_benches::total_elems(&resnet), 25_557_032);
//! assert_eq!(resnet[0].name, "conv1.weight");
//! ```

use std::time::Duration;

/// One parameter tensor of a model: its name (PyTorch's) and its number of elements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tensor {
    /// Parameter name, as `model.named_parameters()` spells it.
    pub name: String,
    /// Number of elements.
    pub elems: usize,
}

impl Tensor {
    fn new(name: impl Into<String>, shape: &[usize]) -> Self {
        Tensor {
            name: name.into(),
            elems: shape.iter().product(),
        }
    }
}

/// The 161 parameter tensors of torchvision's ResNet-50 (25,557,032 parameters), in
/// declaration order: convolution weights (no biases), batch-norm weights and biases
/// (running statistics are buffers, not parameters), and the 2048 × 1000 classifier.
pub fn resnet50() -> Vec<Tensor> {
    let mut t = vec![Tensor::new("conv1.weight", &[64, 3, 7, 7])];
    let bn = |t: &mut Vec<Tensor>, name: &str, c: usize| {
        t.push(Tensor::new(format!("{name}.weight"), &[c]));
        t.push(Tensor::new(format!("{name}.bias"), &[c]));
    };
    bn(&mut t, "bn1", 64);
    let mut inplanes = 64;
    for (stage, (blocks, width)) in [(3, 64), (4, 128), (6, 256), (3, 512)]
        .into_iter()
        .enumerate()
    {
        let out = width * 4; // bottleneck expansion
        for block in 0..blocks {
            let p = format!("layer{}.{block}", stage + 1);
            t.push(Tensor::new(
                format!("{p}.conv1.weight"),
                &[width, inplanes, 1, 1],
            ));
            bn(&mut t, &format!("{p}.bn1"), width);
            t.push(Tensor::new(
                format!("{p}.conv2.weight"),
                &[width, width, 3, 3],
            ));
            bn(&mut t, &format!("{p}.bn2"), width);
            t.push(Tensor::new(
                format!("{p}.conv3.weight"),
                &[out, width, 1, 1],
            ));
            bn(&mut t, &format!("{p}.bn3"), out);
            if block == 0 {
                t.push(Tensor::new(
                    format!("{p}.downsample.0.weight"),
                    &[out, inplanes, 1, 1],
                ));
                bn(&mut t, &format!("{p}.downsample.1"), out);
            }
            inplanes = out;
        }
    }
    t.push(Tensor::new("fc.weight", &[1000, 2048]));
    t.push(Tensor::new("fc.bias", &[1000]));
    t
}

/// The 391 parameter tensors of BERT-large (Hugging Face `BertModel`, uncased vocabulary:
/// 335,141,888 parameters), in declaration order: word, position and token-type embeddings
/// and their layer norm; 24 encoder layers of query, key, value and output projections,
/// two feed-forward layers (1024 → 4096 → 1024) and two layer norms, each with its bias;
/// and the pooler.
pub fn bert_large() -> Vec<Tensor> {
    const HIDDEN: usize = 1024;
    const FFN: usize = 4096;
    let mut t = Vec::new();
    let linear = |t: &mut Vec<Tensor>, name: &str, out: usize, inp: usize| {
        t.push(Tensor::new(format!("{name}.weight"), &[out, inp]));
        t.push(Tensor::new(format!("{name}.bias"), &[out]));
    };
    let norm = |t: &mut Vec<Tensor>, name: &str| {
        t.push(Tensor::new(format!("{name}.weight"), &[HIDDEN]));
        t.push(Tensor::new(format!("{name}.bias"), &[HIDDEN]));
    };
    t.push(Tensor::new(
        "embeddings.word_embeddings.weight",
        &[30522, HIDDEN],
    ));
    t.push(Tensor::new(
        "embeddings.position_embeddings.weight",
        &[512, HIDDEN],
    ));
    t.push(Tensor::new(
        "embeddings.token_type_embeddings.weight",
        &[2, HIDDEN],
    ));
    norm(&mut t, "embeddings.LayerNorm");
    for layer in 0..24 {
        let p = format!("encoder.layer.{layer}");
        for proj in ["query", "key", "value"] {
            linear(
                &mut t,
                &format!("{p}.attention.self.{proj}"),
                HIDDEN,
                HIDDEN,
            );
        }
        linear(
            &mut t,
            &format!("{p}.attention.output.dense"),
            HIDDEN,
            HIDDEN,
        );
        norm(&mut t, &format!("{p}.attention.output.LayerNorm"));
        linear(&mut t, &format!("{p}.intermediate.dense"), FFN, HIDDEN);
        linear(&mut t, &format!("{p}.output.dense"), HIDDEN, FFN);
        norm(&mut t, &format!("{p}.output.LayerNorm"));
    }
    linear(&mut t, "pooler.dense", HIDDEN, HIDDEN);
    t
}

/// Total number of elements of a model's tensors.
pub fn total_elems(model: &[Tensor]) -> usize {
    model.iter().map(|t| t.elems).sum()
}

/// True when the bench binary was started by `cargo bench` (which passes `--bench`), false
/// under `cargo test --benches` / `--all-targets`, where criterion runs every bench once as
/// a smoke test: the benches then use small sizes so the debug build finishes in seconds.
pub fn full_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// Prints, under `cargo test`, that the printed figures of this smoke run mean nothing.
pub fn note_smoke_test() {
    if !full_run() {
        println!("smoke test (debug build, reduced sizes): the figures below are not measurements");
    }
}

/// False in criterion's `--profile-time` mode (meant for profilers such as callgrind, which
/// would take minutes over the extra summaries: paired ratios, latency percentiles) and in
/// `--list` mode; true otherwise.
pub fn summaries_wanted() -> bool {
    !std::env::args().any(|a| a == "--profile-time" || a == "--list")
}

/// The `p`-th percentile (`0.0..=1.0`, nearest rank) of an ascending slice; 0 when empty.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p.clamp(0.0, 1.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank]
}

/// Medians of a paired comparison (see [`paired`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Paired {
    /// Median time of one baseline run.
    pub base: Duration,
    /// Median time of one subject run.
    pub subject: Duration,
    /// Median over the pairs of `base time / subject time`: above 1, the subject is faster.
    pub speed_ratio: f64,
}

/// Which side of a paired comparison to run (see [`paired`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The baseline (memcpy, `ArrayQueue`, ...).
    Base,
    /// What is measured against it.
    Subject,
}

/// Runs the baseline and the subject alternately, `pairs` times each: `run(side)` runs one
/// and returns the time of its timed part. (One closure, so both sides may borrow the same
/// buffers mutably.) On a machine whose load drifts (other engineers' builds on the same
/// two vCPUs) the ratio taken pair by pair is far steadier than two figures taken minutes
/// apart.
///
/// # Panics
///
/// If `pairs` is 0.
pub fn paired(pairs: usize, mut run: impl FnMut(Side) -> Duration) -> Paired {
    assert!(pairs > 0, "paired() needs at least one pair");
    let mut b = Vec::with_capacity(pairs);
    let mut s = Vec::with_capacity(pairs);
    let mut r = Vec::with_capacity(pairs);
    for _ in 0..pairs {
        let (tb, ts) = (run(Side::Base), run(Side::Subject));
        b.push(tb);
        s.push(ts);
        r.push(tb.as_secs_f64() / ts.as_secs_f64().max(1e-12));
    }
    b.sort_unstable();
    s.sort_unstable();
    r.sort_by(f64::total_cmp);
    Paired {
        base: b[pairs / 2],
        subject: s[pairs / 2],
        speed_ratio: r[pairs / 2],
    }
}

/// `bytes` moved in `t`, in GiB/s (criterion's unit).
pub fn gib_per_s(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64().max(1e-12) / f64::from(1u32 << 30)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn resnet50_matches_torchvision() {
        let m = resnet50();
        assert_eq!(m.len(), 161);
        assert_eq!(total_elems(&m), 25_557_032);
        assert_eq!(m.last().map(|t| t.elems), Some(1000));
        assert_eq!(m[m.len() - 2].elems, 2048 * 1000);
        let names: HashSet<_> = m.iter().map(|t| &t.name).collect();
        assert_eq!(names.len(), m.len(), "names are unique");
    }

    #[test]
    fn bert_large_matches_hugging_face() {
        let m = bert_large();
        assert_eq!(m.len(), 5 + 24 * 16 + 2);
        assert_eq!(total_elems(&m), 335_141_888);
        let names: HashSet<_> = m.iter().map(|t| &t.name).collect();
        assert_eq!(names.len(), m.len(), "names are unique");
    }

    #[test]
    fn paired_takes_medians() {
        let mut n = 0u64;
        let p = paired(3, |side| match side {
            Side::Base => Duration::from_micros(100),
            Side::Subject => {
                n += 1;
                Duration::from_micros(25 * n) // 25, 50, 75
            }
        });
        assert_eq!(p.base, Duration::from_micros(100));
        assert_eq!(p.subject, Duration::from_micros(50));
        assert_eq!(p.speed_ratio, 2.0);
        assert_eq!(gib_per_s(1 << 30, Duration::from_secs(2)), 0.5);
    }

    #[test]
    fn percentile_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&v, 0.5), 51);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&v, 1.0), 100);
        assert_eq!(percentile(&[], 0.5), 0);
    }
}
