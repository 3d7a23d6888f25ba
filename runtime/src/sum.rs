//! Element-wise summation kernels: the summation server's hot loop.
//!
//! All functions work on raw byte buffers (as they arrive from the network) tagged
//! with a [`DType`]. Buffers need not be aligned for their element type: aligned
//! buffers are viewed in place as typed slices (`bytemuck`), unaligned blocks are
//! first copied into aligned stack scratch. The code is safe Rust whose inner loops
//! auto-vectorise; the only `unsafe` is the call into the AVX2 build (below) and
//! its non-temporal store.
//!
//! Semantics:
//! * integers wrap on overflow;
//! * f32 / f64 accumulate in their own type, in input order
//!   (`((in0 + in1) + in2) + ...`);
//! * f16 / bf16 are widened to f32, all inputs are accumulated in f32 (in input
//!   order) and the result is rounded to the target type once per element
//!   (round to nearest, ties to even).
//!
//! Results are bit-identical to [`reference_sum`], except that the payload of a NaN
//! result is unspecified (it is a NaN either way).
//!
//! [`sum_into`] makes one pass over memory: it walks the buffers in blocks of a few
//! KiB, and for each block computes `out = in0 + in1 + ...` while the output block
//! (or, for f16/bf16, an f32 running-sum block on the stack) stays in L1. The
//! kernels use at most about 40 KiB of stack.
//!
//! CPU features: the baseline x86-64 target only has SSE2, with which the f16/bf16
//! conversions are compute-bound. So on x86-64 every kernel is also compiled for
//! AVX2 + FMA + F16C, and that build is picked at run time when the CPU has them
//! (results are identical; the baseline build remains the fallback). It converts f16
//! with the F16C instructions, eight lanes at a time, sums up to four inputs 32
//! output bytes at a time in registers, and writes the output of large sums (at
//! least 8 MiB) with non-temporal stores, which skip reading the output into the
//! cache first, as `memcpy` does for large copies.

use std::fmt;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::dtype::DType;

/// Error returned by the summation kernels for malformed arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SumError {
    /// A buffer's length differs from the output (or accumulator) length.
    LengthMismatch {
        /// Element type of the operation.
        dtype: DType,
        /// Length in bytes of the output / accumulator buffer.
        expected: usize,
        /// Index of the offending input (always 0 for [`add_assign`]).
        input: usize,
        /// Length in bytes of the offending input.
        len: usize,
    },
    /// A buffer's length is not a multiple of the element size.
    NotMultiple {
        /// Element type of the operation.
        dtype: DType,
        /// Length in bytes of the offending buffer.
        len: usize,
    },
    /// [`scale_div`] was asked to divide by zero.
    ZeroDivisor {
        /// Element type of the operation.
        dtype: DType,
    },
}

impl fmt::Display for SumError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SumError::LengthMismatch {
                dtype,
                expected,
                input,
                len,
            } => write!(
                f,
                "{dtype} sum: input {input} has {len} bytes but the output has {expected} bytes"
            ),
            SumError::NotMultiple { dtype, len } => write!(
                f,
                "{dtype} sum: buffer length {len} bytes is not a multiple of the element size ({} bytes)",
                dtype.size()
            ),
            SumError::ZeroDivisor { dtype } => {
                write!(f, "{dtype} scale_div: cannot divide by zero")
            }
        }
    }
}

impl std::error::Error for SumError {}

fn check_multiple(dtype: DType, len: usize) -> Result<(), SumError> {
    if !len.is_multiple_of(dtype.size()) {
        return Err(SumError::NotMultiple { dtype, len });
    }
    Ok(())
}

fn check_same(dtype: DType, expected: usize, input: usize, len: usize) -> Result<(), SumError> {
    if len != expected {
        return Err(SumError::LengthMismatch {
            dtype,
            expected,
            input,
            len,
        });
    }
    Ok(())
}

/// `out = inputs[0] + inputs[1] + ...`, element-wise, in one fused pass over memory.
///
/// Every input is read once and `out` is written once (no copy-then-add); work
/// proceeds block by block so that the partial sums stay in cache. All slices must
/// have the same length, a multiple of `dtype.size()`. With no inputs `out` is
/// zeroed; with one input it is a copy of it. `out` cannot alias an input (it is
/// borrowed mutably).
///
/// Integers wrap on overflow; f32/f64 add in input order; f16/bf16 accumulate
/// all inputs in f32 and round once. The result is bit-identical to
/// [`reference_sum`] (up to NaN payloads).
pub fn sum_into(dtype: DType, out: &mut [u8], inputs: &[&[u8]]) -> Result<(), SumError> {
    check_multiple(dtype, out.len())?;
    for (i, inp) in inputs.iter().enumerate() {
        check_same(dtype, out.len(), i, inp.len())?;
    }
    match inputs {
        [] => out.fill(0),
        [only] => out.copy_from_slice(only),
        _ => run(Kernels::Best, dtype, Op::Sum(out, inputs)),
    }
    Ok(())
}

/// `acc += input`, element-wise (same rules as [`sum_into`]; f16/bf16 are added in
/// f32 and rounded once).
pub fn add_assign(dtype: DType, acc: &mut [u8], input: &[u8]) -> Result<(), SumError> {
    check_multiple(dtype, acc.len())?;
    check_same(dtype, acc.len(), 0, input.len())?;
    run(Kernels::Best, dtype, Op::AddAssign(acc, input));
    Ok(())
}

/// Divides every element by `n` (averaging over `n` workers).
///
/// Floats multiply by `1/n`, computed in f64 and rounded to the compute type
/// (f64 for f64, f32 for f32, f16 and bf16 — the latter two are widened to f32,
/// multiplied, and rounded back once). Integers divide, truncating toward zero
/// (`-7 / 2 == -3`); for `u8` that is plain truncation. `n == 0` is an error;
/// `n == 1` leaves the buffer untouched.
pub fn scale_div(dtype: DType, buf: &mut [u8], n: u32) -> Result<(), SumError> {
    check_multiple(dtype, buf.len())?;
    if n == 0 {
        return Err(SumError::ZeroDivisor { dtype });
    }
    if n == 1 {
        return Ok(());
    }
    run(Kernels::Best, dtype, Op::Scale(buf, n));
    Ok(())
}

/// Reference implementation of [`sum_into`]: simple, one element at a time.
///
/// Returns the element-wise sum of `inputs` (empty for no inputs, a copy for one),
/// with exactly the semantics documented on [`sum_into`]. Used by the tests and
/// by the runtime's `--check` mode.
///
/// # Panics
///
/// If the inputs differ in length or a length is not a multiple of `dtype.size()`.
pub fn reference_sum(dtype: DType, inputs: &[&[u8]]) -> Vec<u8> {
    let Some(first) = inputs.first() else {
        return Vec::new();
    };
    let len = first.len();
    assert!(
        len % dtype.size() == 0,
        "{}",
        SumError::NotMultiple { dtype, len }
    );
    for (i, inp) in inputs.iter().enumerate() {
        if let Err(e) = check_same(dtype, len, i, inp.len()) {
            panic!("{e}");
        }
    }
    if inputs.len() == 1 {
        return first.to_vec();
    }
    let mut out = vec![0u8; len];
    match dtype {
        DType::F32 => reference_elems::<4, f32>(
            &mut out,
            inputs,
            f32::from_ne_bytes,
            |a, b| a + b,
            f32::to_ne_bytes,
        ),
        DType::F64 => reference_elems::<8, f64>(
            &mut out,
            inputs,
            f64::from_ne_bytes,
            |a, b| a + b,
            f64::to_ne_bytes,
        ),
        DType::I32 => reference_elems::<4, i32>(
            &mut out,
            inputs,
            i32::from_ne_bytes,
            i32::wrapping_add,
            i32::to_ne_bytes,
        ),
        DType::I64 => reference_elems::<8, i64>(
            &mut out,
            inputs,
            i64::from_ne_bytes,
            i64::wrapping_add,
            i64::to_ne_bytes,
        ),
        DType::U8 => reference_elems::<1, u8>(
            &mut out,
            inputs,
            u8::from_ne_bytes,
            u8::wrapping_add,
            u8::to_ne_bytes,
        ),
        DType::F16 => reference_elems::<2, f32>(
            &mut out,
            inputs,
            |b| f16::from_bits(u16::from_ne_bytes(b)).to_f32(),
            |a, b| a + b,
            |a| f16::from_f32(a).to_bits().to_ne_bytes(),
        ),
        DType::BF16 => reference_elems::<2, f32>(
            &mut out,
            inputs,
            |b| bf16::from_bits(u16::from_ne_bytes(b)).to_f32(),
            |a, b| a + b,
            |a| bf16::from_f32(a).to_bits().to_ne_bytes(),
        ),
    }
    out
}

/// One element at a time: `out[i] = encode(decode(in0[i]) + decode(in1[i]) + ...)`.
fn reference_elems<const N: usize, A: Copy>(
    out: &mut [u8],
    inputs: &[&[u8]],
    decode: impl Fn([u8; N]) -> A,
    add: impl Fn(A, A) -> A,
    encode: impl Fn(A) -> [u8; N],
) {
    let elem = |k: usize, i: usize| -> A {
        let mut b = [0u8; N];
        b.copy_from_slice(&inputs[k][i * N..(i + 1) * N]);
        decode(b)
    };
    for i in 0..out.len() / N {
        let mut acc = elem(0, i);
        for k in 1..inputs.len() {
            acc = add(acc, elem(k, i));
        }
        out[i * N..(i + 1) * N].copy_from_slice(&encode(acc));
    }
}

// ---------------------------------------------------------------------------
// Dispatch.
//
// The kernels below are generic, `#[inline(always)]` code that is instantiated
// twice: once in `run_with`'s baseline build (SSE2 on x86-64, whatever the target
// gives elsewhere) and, on x86-64, once more inside `avx2::run`, a function compiled
// with AVX2, FMA and F16C enabled, so that the same loops vectorise eight f32 lanes
// wide. `run` picks the AVX2 build when the CPU has those features (detected once).
// Both builds perform the same operations in the same order: results are identical
// (FMA is enabled but never used for our arithmetic, as Rust does not contract
// `a * b + c`, and there is no multiply-add in the kernels anyway).

/// A kernel call, its arguments already validated.
enum Op<'a> {
    /// `out = inputs[0] + inputs[1] + ...` (at least two inputs).
    Sum(&'a mut [u8], &'a [&'a [u8]]),
    /// `acc += input`.
    AddAssign(&'a mut [u8], &'a [u8]),
    /// Divides every element by `n` (at least 2).
    Scale(&'a mut [u8], u32),
}

/// Which build of the kernels [`run`] may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernels {
    /// The fastest build the CPU supports.
    Best,
    /// The baseline build, which runs on every CPU of the target (the fallback; the
    /// tests compare it with the dispatched one).
    #[cfg_attr(not(test), allow(dead_code))]
    Baseline,
}

/// Whether the CPU has AVX2, FMA and F16C, which [`avx2::run`] needs (detected once).
#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

/// Runs `op` on `dtype` with the chosen build of the kernels.
fn run(kernels: Kernels, dtype: DType, op: Op<'_>) {
    #[cfg(target_arch = "x86_64")]
    if kernels == Kernels::Best && has_avx2() {
        // SAFETY: `avx2::run` only requires the CPU to support AVX2, FMA and F16C,
        // which `has_avx2` has just checked.
        unsafe { avx2::run(dtype, op) };
        return;
    }
    let _ = kernels; // Only one build elsewhere.
    run_with(dtype, op, PlainHalf, PlainHalf, PlainSink);
}

/// The kernels for every dtype and operation; `f16k` and `bf16k` do the f16 and
/// bf16 work. Everything below is inlined into this function, so that it is
/// compiled with the target features of its caller.
#[inline(always)]
fn run_with(
    dtype: DType,
    op: Op<'_>,
    f16k: impl HalfKernels<f16>,
    bf16k: impl HalfKernels<bf16>,
    sink: impl Sink,
) {
    match op {
        Op::Sum(out, inputs) => match dtype {
            DType::F32 => sum_native::<f32, _>(out, inputs, true, sink),
            DType::F64 => sum_native::<f64, _>(out, inputs, true, sink),
            DType::I32 => sum_native::<i32, _>(out, inputs, true, sink),
            DType::I64 => sum_native::<i64, _>(out, inputs, true, sink),
            DType::U8 => sum_native::<u8, _>(out, inputs, true, sink),
            DType::F16 => sum_half::<f16, _, _>(f16k, out, inputs, sink),
            DType::BF16 => sum_half::<bf16, _, _>(bf16k, out, inputs, sink),
        },
        Op::AddAssign(acc, input) => match dtype {
            DType::F32 => sum_native::<f32, _>(acc, &[input], false, sink),
            DType::F64 => sum_native::<f64, _>(acc, &[input], false, sink),
            DType::I32 => sum_native::<i32, _>(acc, &[input], false, sink),
            DType::I64 => sum_native::<i64, _>(acc, &[input], false, sink),
            DType::U8 => sum_native::<u8, _>(acc, &[input], false, sink),
            DType::F16 => add_assign_half::<f16, _>(f16k, acc, input),
            DType::BF16 => add_assign_half::<bf16, _>(bf16k, acc, input),
        },
        Op::Scale(buf, n) => {
            let inv = 1.0f64 / f64::from(n);
            match dtype {
                DType::F32 => {
                    let s = inv as f32;
                    map_typed::<f32>(
                        buf,
                        #[inline(always)]
                        |b| {
                            for x in b {
                                *x *= s;
                            }
                        },
                    );
                }
                DType::F64 => map_typed::<f64>(
                    buf,
                    #[inline(always)]
                    |b| {
                        for x in b {
                            *x *= inv;
                        }
                    },
                ),
                DType::I32 => map_typed::<i32>(
                    buf,
                    #[inline(always)]
                    |b| {
                        for x in b {
                            *x = (i64::from(*x) / i64::from(n)) as i32;
                        }
                    },
                ),
                DType::I64 => map_typed::<i64>(
                    buf,
                    #[inline(always)]
                    |b| {
                        for x in b {
                            *x /= i64::from(n);
                        }
                    },
                ),
                DType::U8 => map_typed::<u8>(
                    buf,
                    #[inline(always)]
                    |b| {
                        for x in b {
                            *x = (u32::from(*x) / n) as u8;
                        }
                    },
                ),
                DType::F16 => scale_half::<f16, _>(f16k, buf, inv as f32),
                DType::BF16 => scale_half::<bf16, _>(bf16k, buf, inv as f32),
            }
        }
    }
}

/// The AVX2 + FMA + F16C build.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::{
        __m256, __m256i, _mm256_add_epi32, _mm256_add_ps, _mm256_and_si256, _mm256_andnot_si256,
        _mm256_castps_si256, _mm256_castsi256_ps, _mm256_cmp_ps, _mm256_cvtph_ps, _mm256_cvtps_ph,
        _mm256_packus_epi32, _mm256_set1_epi32, _mm256_setzero_si256, _mm256_srli_epi32,
        _mm256_stream_si256, _mm256_unpackhi_epi16, _mm256_unpacklo_epi16, _mm_sfence,
        _CMP_UNORD_Q, _MM_FROUND_TO_NEAREST_INT,
    };

    use half::f16;

    use super::{
        run_with, Bf16Lines, DType, F16Lanes, Line, Op, StreamSink, LINE_BYTES, STREAM_MIN_BYTES,
    };

    /// [`super::run`] compiled for AVX2, FMA and F16C. f16 converts eight lanes at a
    /// time with the F16C instructions (the ones `half` uses on such CPUs, so results
    /// match it exactly), bf16 lines are summed with AVX2 instructions written out,
    /// and large sums stream their output with non-temporal stores. The closures
    /// inherit this function's target features.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn run(dtype: DType, op: Op<'_>) {
        // Fences the streaming stores before this returns or unwinds.
        let _fence = Sfence(|| _mm_sfence());
        let lanes = F16Lanes {
            widen: |h: [f16; 8]| -> [f32; 8] {
                let v = _mm256_cvtph_ps(bytemuck::cast(h));
                bytemuck::cast(v)
            },
            narrow: |x: [f32; 8]| -> [f16; 8] {
                let v = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(bytemuck::cast(x));
                bytemuck::cast(v)
            },
        };
        // A line of 16 bf16 `x` widens into two vectors of f32 (`x << 16`) in the
        // order (0..4, 8..12) and (4..8, 12..16), which `packus` undoes.
        let bf16 = Bf16Lines(|xs: &[[u8; LINE_BYTES]]| -> [u8; LINE_BYTES] {
            let zero = _mm256_setzero_si256();
            let widen = |x: [u8; LINE_BYTES]| {
                let x: __m256i = bytemuck::cast(x);
                let lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, x));
                let hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, x));
                (lo, hi)
            };
            let (mut lo, mut hi) = widen(xs[0]);
            for x in &xs[1..] {
                let (l, h) = widen(*x);
                lo = _mm256_add_ps(lo, l);
                hi = _mm256_add_ps(hi, h);
            }
            // As `f32_to_bf16`: add 0x7fff + the lowest kept bit, except to NaNs.
            let round = |a: __m256| {
                let b = _mm256_castps_si256(a);
                let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(a, a));
                let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(1));
                let bias = _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff));
                let bias = _mm256_andnot_si256(nan, bias);
                _mm256_srli_epi32::<16>(_mm256_add_epi32(b, bias))
            };
            bytemuck::cast(_mm256_packus_epi32(round(lo), round(hi)))
        });
        let sink = StreamSink {
            min: STREAM_MIN_BYTES,
            store: |dst: &mut Line, v: [u8; LINE_BYTES]| {
                let p: *mut __m256i = std::ptr::from_mut(dst).cast();
                // SAFETY: `p` comes from a reference to a `Line`, so it is valid for
                // writes and aligned to 32 bytes, as the store requires. `_fence`
                // orders the store before this function returns (or unwinds), and
                // nothing reads the line before then.
                unsafe { _mm256_stream_si256(p, bytemuck::cast(v)) };
            },
        };
        run_with(dtype, op, lanes, bf16, sink);
    }

    /// Runs its `sfence` closure when dropped: orders the streaming stores before
    /// everything that follows (in particular the release that hands the output to
    /// another thread), as ordinary stores are ordered.
    struct Sfence<F: FnMut()>(F);

    impl<F: FnMut()> Drop for Sfence<F> {
        fn drop(&mut self) {
            (self.0)();
        }
    }
}

// ---------------------------------------------------------------------------
// Kernels.
//
// Buffers are walked in blocks of `BLOCK_BYTES` input bytes. Within a block the
// inputs are consumed in groups of up to `GROUP`; each group is one loop that reads
// its input blocks once, adds them to the running sum (started by the first group,
// held in the output block or an f32 stack block, both in L1) and writes it once.
// So memory sees exactly one pass over every buffer, and L1 a pass over one small
// block per group. Additions always happen in input order. The AVX2 build sums
// at most `GROUP` inputs into an aligned output line by line instead, in one loop
// (`stream_lines`). A streamed sum (see `Sink`) that goes through blocks uses
// blocks of `STREAM_BLOCK_BYTES` and builds each output block in stack scratch.

/// Bytes of each input consumed per block (for f16/bf16 that is 2048 elements, whose
/// f32 running sum takes 8 KiB of stack when there are more than `GROUP` inputs).
const BLOCK_BYTES: usize = 4096;

/// Most input streams one kernel loop reads.
const GROUP: usize = 4;

/// Storage with the strictest element alignment (8 bytes) into which an unaligned
/// block is copied.
type Scratch = [u64; BLOCK_BYTES / 8];

/// Scratch blocks: one per input of a group, and one for the output.
type Scratches = [Scratch; GROUP + 1];

/// Outputs of at least this many bytes are streamed by the builds that can (see
/// [`Sink`]): well above the default partition size (4 MiB), whose sums had better
/// stay in cache for the replies that read them, and large enough that the output
/// would not survive in a shared L3 anyway.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const STREAM_MIN_BYTES: usize = 8 << 20;

/// Block size (bytes of each input and of the output) of a streamed sum that goes
/// through blocks (more than [`GROUP`] inputs, or an unaligned output): short
/// enough that loading the inputs and streaming out the previous block overlap
/// well (4 KiB blocks measured 5–15 % slower).
const STREAM_BLOCK_BYTES: usize = 1024;

/// How the output of a sum reaches memory.
///
/// Ordinary stores first read every output cache line from memory (to own it) and
/// later write it back, so a sum with W inputs moves W + 2 bytes per output byte,
/// while `memcpy` of large buffers uses non-temporal stores that skip the read. For
/// a sink that [`Sink::streams`], the kernels write the output with such stores
/// instead (W + 1 bytes per output byte): with at most [`GROUP`] inputs and an
/// aligned output, each [`Line`] is summed in registers and stored at once
/// ([`stream_lines`]); otherwise each block is built in stack scratch (in L1) and
/// then copied out by [`Sink::write`].
trait Sink: Copy {
    /// Whether sums of at most [`GROUP`] inputs into an aligned output go line by
    /// line ([`stream_lines`]) even when not streamed: in the AVX2 build, whose line
    /// kernels beat its block loops (the baseline build keeps its block loops).
    const LINES: bool;

    /// Whether a sum into `len` output bytes is streamed.
    fn streams(self, len: usize) -> bool;

    /// Writes one line of the output.
    fn store_line(self, dst: &mut Line, v: [u8; LINE_BYTES]);

    /// Copies a finished block `src` into the output `dst` (of the same length):
    /// whole lines through [`Sink::store_line`], the ends with ordinary stores.
    #[inline(always)]
    fn write(self, dst: &mut [u8], src: &[u8]) {
        let (head, body, tail) = bytemuck::pod_align_to_mut::<u8, Line>(dst);
        let (src_head, rest) = src.split_at(head.len());
        let (src_body, src_tail) = rest.split_at(body.len() * LINE_BYTES);
        head.copy_from_slice(src_head);
        let src_body: &[[u8; LINE_BYTES]] = bytemuck::cast_slice(src_body);
        for (d, s) in body.iter_mut().zip(src_body) {
            self.store_line(d, *s);
        }
        tail.copy_from_slice(src_tail);
    }
}

/// Bytes of a [`Line`].
const LINE_BYTES: usize = 32;

/// An aligned 32-byte piece of the output: the unit of a streaming store.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(32))]
struct Line([u8; LINE_BYTES]);

/// Ordinary stores (the baseline build).
#[derive(Clone, Copy)]
struct PlainSink;

impl Sink for PlainSink {
    const LINES: bool = false;

    #[inline(always)]
    fn streams(self, _len: usize) -> bool {
        false
    }

    #[inline(always)]
    fn store_line(self, dst: &mut Line, v: [u8; LINE_BYTES]) {
        dst.0 = v;
    }

    #[inline(always)]
    fn write(self, dst: &mut [u8], src: &[u8]) {
        dst.copy_from_slice(src);
    }
}

/// Streams outputs of at least `min` bytes (normally [`STREAM_MIN_BYTES`]), storing
/// their lines with `store`.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Clone, Copy)]
struct StreamSink<F> {
    /// Smallest output that is streamed.
    min: usize,
    /// Writes one line: `store(dst, v)`.
    store: F,
}

impl<F: Fn(&mut Line, [u8; LINE_BYTES]) + Copy> Sink for StreamSink<F> {
    const LINES: bool = true;

    #[inline(always)]
    fn streams(self, len: usize) -> bool {
        len >= self.min
    }

    #[inline(always)]
    fn store_line(self, dst: &mut Line, v: [u8; LINE_BYTES]) {
        (self.store)(dst, v);
    }
}

/// Whether `bytes` may be viewed as a `[T]` (the length is checked by the callers).
#[inline(always)]
fn aligned<T>(bytes: &[u8]) -> bool {
    bytes.as_ptr().cast::<T>().is_aligned()
}

/// Whether every buffer is aligned for `T`. Blocks start at multiples of
/// `BLOCK_BYTES` (or `STREAM_BLOCK_BYTES`) from the buffer starts, so they are then
/// aligned too.
#[inline(always)]
fn all_aligned<T>(out: &[u8], inputs: &[&[u8]]) -> bool {
    aligned::<T>(out) && inputs.iter().all(|i| aligned::<T>(i))
}

/// Views a block of at most `BLOCK_BYTES` bytes as `[T]`: in place when aligned,
/// otherwise copied into `scratch` (which must then be provided).
#[inline(always)]
fn view<'a, T: bytemuck::Pod>(bytes: &'a [u8], scratch: Option<&'a mut Scratch>) -> &'a [T] {
    if aligned::<T>(bytes) {
        bytemuck::cast_slice(bytes)
    } else {
        let s = scratch.expect("scratch for an unaligned block");
        let s = &mut bytemuck::cast_slice_mut::<u64, u8>(s)[..bytes.len()];
        s.copy_from_slice(bytes);
        bytemuck::cast_slice(s)
    }
}

/// Views each input block `inputs[k][r]` as `[T]`, using one scratch block per input.
#[inline(always)]
fn views<'a, T: bytemuck::Pod>(
    inputs: &[&'a [u8]],
    r: std::ops::Range<usize>,
    scratch: &'a mut [Scratch],
) -> [&'a [T]; GROUP] {
    let mut v: [&[T]; GROUP] = [&[]; GROUP];
    let mut scratch = scratch.iter_mut();
    for (v, inp) in v.iter_mut().zip(inputs) {
        *v = view::<T>(&inp[r.clone()], scratch.next());
    }
    v
}

/// Splits `n` inputs into consecutive groups `(start, end)` of up to `GROUP`.
/// (Later groups also read the running sum, but that block is already in L1.)
#[inline(always)]
fn groups(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).step_by(GROUP).map(move |s| (s, (s + GROUP).min(n)))
}

// ---------------------------------------------------------------------------
// Native types: f32, f64, i32, i64, u8.

/// An element type that is summed in its own arithmetic.
trait Native: bytemuck::Pod {
    /// The elements of one [`Line`].
    type Line: bytemuck::Pod + AsRef<[Self]> + AsMut<[Self]>;

    /// The summation operator (wrapping for integers).
    fn add(self, rhs: Self) -> Self;
}

macro_rules! native {
    ($t:ty, |$a:ident, $b:ident| $add:expr) => {
        impl Native for $t {
            type Line = [$t; LINE_BYTES / std::mem::size_of::<$t>()];

            #[inline(always)]
            fn add(self, rhs: Self) -> Self {
                let ($a, $b) = (self, rhs);
                $add
            }
        }
    };
}

native!(f32, |a, b| a + b);
native!(f64, |a, b| a + b);
native!(i32, |a, b| a.wrapping_add(b));
native!(i64, |a, b| a.wrapping_add(b));
native!(u8, |a, b| a.wrapping_add(b));

/// `o = ins[0] + ins[1] + ...` (`INIT`) or `o = o + ins[0] + ...` (`!INIT`), in order.
#[inline(always)]
fn fold_native<T: Native, const N: usize, const INIT: bool>(o: &mut [T], ins: [&[T]; N]) {
    let len = o.len();
    let ins = ins.map(|s| &s[..len]);
    for i in 0..len {
        let mut acc = if INIT { ins[0][i] } else { o[i] };
        for s in &ins[usize::from(INIT)..] {
            acc = acc.add(s[i]);
        }
        o[i] = acc;
    }
}

/// Runs the native kernel for one group of `n` inputs over one output block.
#[inline(always)]
fn group_native<T: Native>(o: &mut [T], v: [&[T]; GROUP], n: usize, init: bool) {
    let [a, b, c, d] = v;
    match (init, n) {
        (true, 2) => fold_native::<T, 2, true>(o, [a, b]),
        (true, 3) => fold_native::<T, 3, true>(o, [a, b, c]),
        (true, 4) => fold_native::<T, 4, true>(o, [a, b, c, d]),
        (false, 1) => fold_native::<T, 1, false>(o, [a]),
        (false, 2) => fold_native::<T, 2, false>(o, [a, b]),
        (false, 3) => fold_native::<T, 3, false>(o, [a, b, c]),
        (false, 4) => fold_native::<T, 4, false>(o, [a, b, c, d]),
        _ => unreachable!("native group of {n} inputs (init: {init})"),
    }
}

/// `out = in0 + in1 + ...` (`init`, at least two inputs) or `out += in0 + ...`.
#[inline(always)]
fn sum_native<T: Native, S: Sink>(out: &mut [u8], inputs: &[&[u8]], init: bool, sink: S) {
    let stream = init && sink.streams(out.len());
    if (S::LINES || stream) && init && inputs.len() <= GROUP && aligned::<T>(out) {
        // One pass, line by line (with streaming stores where the sink streams).
        if stream {
            sum_native_lines::<T, S>(out, inputs, sink);
        } else {
            sum_native_lines::<T, PlainSink>(out, inputs, PlainSink);
        }
    } else if all_aligned::<T>(out, inputs) && !stream {
        sum_native_blocks::<T, S>(out, inputs, init, &mut [], sink, false);
    } else {
        let mut scratch: Scratches = [[0; BLOCK_BYTES / 8]; GROUP + 1];
        sum_native_blocks::<T, S>(out, inputs, init, &mut scratch, sink, stream);
    }
}

/// The lines `xs[0] + xs[1] + ...` of elements `T`, in order.
#[inline(always)]
fn add_line<T: Native>(xs: &[[u8; LINE_BYTES]]) -> [u8; LINE_BYTES] {
    let mut acc: T::Line = bytemuck::cast(xs[0]);
    for x in &xs[1..] {
        let x: T::Line = bytemuck::cast(*x);
        for (a, b) in acc.as_mut().iter_mut().zip(x.as_ref()) {
            *a = a.add(*b);
        }
    }
    bytemuck::cast(acc)
}

/// `out = f(ins)` line by line, streamed: for every [`Line`] of `out`, `f` gets the
/// inputs' bytes at the same offsets and returns the line's bytes, which go to
/// [`Sink::store_line`]. The partial lines at either end of `out` are computed from
/// zero-padded copies and written with ordinary stores. `f` must map bytes to
/// bytes element by element (all elements lying within lines).
#[inline(always)]
fn stream_lines<S: Sink, const N: usize>(
    out: &mut [u8],
    ins: [&[u8]; N],
    sink: S,
    f: impl Fn([[u8; LINE_BYTES]; N]) -> [u8; LINE_BYTES],
) {
    let (head, body, tail) = bytemuck::pod_align_to_mut::<u8, Line>(out);
    let start = head.len();
    let end = start + body.len() * LINE_BYTES;
    let lines = ins.map(|s| bytemuck::cast_slice::<u8, [u8; LINE_BYTES]>(&s[start..end]));
    for (j, line) in body.iter_mut().enumerate() {
        sink.store_line(line, f(lines.map(|l| l[j])));
    }
    for (o, from) in [(head, 0), (tail, end)] {
        let n = o.len();
        let xs = ins.map(|s| {
            let mut x = [0; LINE_BYTES];
            x[..n].copy_from_slice(&s[from..from + n]);
            x
        });
        o.copy_from_slice(&f(xs)[..n]);
    }
}

/// [`sum_native`] of at most [`GROUP`] inputs into an aligned `out`, line by line.
#[inline(always)]
fn sum_native_lines<T: Native, S: Sink>(out: &mut [u8], inputs: &[&[u8]], sink: S) {
    match *inputs {
        [a, b] => stream_lines(
            out,
            [a, b],
            sink,
            #[inline(always)]
            |xs| add_line::<T>(&xs),
        ),
        [a, b, c] => stream_lines(
            out,
            [a, b, c],
            sink,
            #[inline(always)]
            |xs| add_line::<T>(&xs),
        ),
        [a, b, c, d] => stream_lines(
            out,
            [a, b, c, d],
            sink,
            #[inline(always)]
            |xs| add_line::<T>(&xs),
        ),
        _ => unreachable!("sum of {} inputs", inputs.len()),
    }
}

/// Block loop of [`sum_native`]; `scratch` is empty when every buffer is aligned
/// and the output is not `stream`ed (see [`Sink`]).
#[inline(always)]
fn sum_native_blocks<T: Native, S: Sink>(
    out: &mut [u8],
    inputs: &[&[u8]],
    init: bool,
    scratch: &mut [Scratch],
    sink: S,
    stream: bool,
) {
    let (in_scratch, mut out_scratch) = match scratch.split_last_mut() {
        Some((o, i)) => (i, Some(o)),
        None => (scratch, None),
    };
    let blk = if stream {
        STREAM_BLOCK_BYTES
    } else {
        BLOCK_BYTES
    };
    for (bi, ob) in out.chunks_mut(blk).enumerate() {
        let r = bi * blk..bi * blk + ob.len();
        let out_aligned = !stream && aligned::<T>(ob);
        let o: &mut [T] = if out_aligned {
            bytemuck::cast_slice_mut(ob)
        } else {
            let s = out_scratch
                .as_deref_mut()
                .expect("scratch for an unaligned block");
            let s = &mut bytemuck::cast_slice_mut::<u64, u8>(s)[..ob.len()];
            if !init {
                s.copy_from_slice(ob);
            }
            bytemuck::cast_slice_mut(s)
        };
        for (s, e) in groups(inputs.len()) {
            let v = views::<T>(&inputs[s..e], r.clone(), in_scratch);
            group_native(o, v, e - s, init && s == 0);
        }
        if !out_aligned {
            let s = out_scratch
                .as_deref()
                .expect("scratch for an unaligned block");
            let s = &bytemuck::cast_slice::<u64, u8>(s)[..ob.len()];
            if stream {
                sink.write(ob, s);
            } else {
                ob.copy_from_slice(s);
            }
        }
    }
}

/// Applies `f` to `buf` viewed as `[T]` (block by block through scratch when `buf`
/// is not aligned for `T`).
#[inline(always)]
fn map_typed<T: bytemuck::Pod>(buf: &mut [u8], mut f: impl FnMut(&mut [T])) {
    if aligned::<T>(buf) {
        f(bytemuck::cast_slice_mut(buf));
    } else {
        let mut scratch: Scratch = [0; BLOCK_BYTES / 8];
        for ob in buf.chunks_mut(BLOCK_BYTES) {
            let s = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut scratch)[..ob.len()];
            s.copy_from_slice(ob);
            f(bytemuck::cast_slice_mut(s));
            ob.copy_from_slice(s);
        }
    }
}

// ---------------------------------------------------------------------------
// 16-bit floats: f16, bf16 (accumulated in f32).
//
// Per block the running sum lives in f32 and is rounded once into the output.
// bf16 ↔ f32 conversions are a few integer operations, so the bf16 kernels fuse
// widening, adding and rounding into one loop per group of inputs (vectorised
// with SSE2, or AVX2 in that build). In the baseline build f16 conversions go
// through `half`'s slice helpers, which use the F16C instructions when the CPU has
// them: each input block is widened into an f32 scratch block and added to the
// running sum. The AVX2 build fuses the f16 kernels like the bf16 ones, eight lanes
// at a time with F16C (`F16Lanes`).

/// A 16-bit float type that is widened to f32 for arithmetic.
trait Half16: bytemuck::Pod {
    /// Whether [`Half16::group`] needs the f32 running-sum block even when all
    /// inputs fit into one group.
    const NEEDS_ACC: bool;

    /// One group of `n` input blocks `v[..n]` (all of one length):
    /// `acc = v[0] + v[1] + ...` when `init`, else `acc += v[0] + ...` (in f32, in
    /// order); when `last`, the sum is also rounded into `out`. `acc` and `tmp`
    /// are at least one block long when used; `acc` may be empty for a single
    /// group (`init && last`) unless `NEEDS_ACC`.
    fn group(
        acc: &mut [f32],
        tmp: &mut [f32],
        out: &mut [Self],
        v: [&[Self]; GROUP],
        n: usize,
        init: bool,
        last: bool,
    );

    /// `x = round(f32(x) * s)` for every element; `tmp` holds at least `buf.len()` f32s.
    fn scale(buf: &mut [Self], s: f32, tmp: &mut [f32]);

    /// The line `round(f32(xs[0]) + f32(xs[1]) + ...)` (a [`Line`] of elements).
    fn add_line<const N: usize>(xs: [[u8; LINE_BYTES]; N]) -> [u8; LINE_BYTES];
}

/// Elements of a [`Line`] of a 16-bit type.
const HALF_LINE: usize = LINE_BYTES / 2;

/// bf16 → f32 (exact: the bits become the top half). A signalling NaN stays
/// signalling here and is quieted by the first f32 operation applied to it.
#[inline(always)]
fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// f32 → bf16, round to nearest, ties to even. NaNs are truncated (never rounded
/// into an infinity or a zero); every NaN that reaches this function is the result
/// of f32 arithmetic and hence already quiet, which truncation preserves. For all
/// other inputs this is bit-identical to `half::bf16::from_f32`.
#[inline(always)]
fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    // All ones for NaN (one `cmpunordps`), so that the rounding bias is dropped.
    let nan_mask = if x.is_nan() { u32::MAX } else { 0 };
    // Cannot overflow for non-NaNs: the largest such pattern is 0xff80_0000.
    let bias = (0x7fff + ((b >> 16) & 1)) & !nan_mask;
    (b.wrapping_add(bias) >> 16) as u16
}

/// One group of a bf16 sum over one block (see [`Half16::group`]), as one loop.
#[inline(always)]
fn fold_bf16<const N: usize, const INIT: bool, const FINAL: bool>(
    acc: &mut [f32],
    out: &mut [bf16],
    ins: [&[bf16]; N],
) {
    let len = ins[0].len();
    let ins = ins.map(|s| &s[..len]);
    let acc = &mut acc[..if INIT && FINAL { 0 } else { len }];
    let out = &mut out[..if FINAL { len } else { 0 }];
    for i in 0..len {
        let mut a = if INIT {
            bf16_to_f32(ins[0][i].to_bits())
        } else {
            acc[i]
        };
        for s in &ins[usize::from(INIT)..] {
            a += bf16_to_f32(s[i].to_bits());
        }
        if FINAL {
            out[i] = bf16::from_bits(f32_to_bf16(a));
        } else {
            acc[i] = a;
        }
    }
}

impl Half16 for bf16 {
    const NEEDS_ACC: bool = false;

    #[inline(always)]
    fn group(
        acc: &mut [f32],
        _tmp: &mut [f32],
        out: &mut [Self],
        v: [&[Self]; GROUP],
        n: usize,
        init: bool,
        last: bool,
    ) {
        let [a, b, c, d] = v;
        match (init, last, n) {
            (true, true, 2) => fold_bf16::<2, true, true>(acc, out, [a, b]),
            (true, true, 3) => fold_bf16::<3, true, true>(acc, out, [a, b, c]),
            (true, true, 4) => fold_bf16::<4, true, true>(acc, out, [a, b, c, d]),
            (true, false, 4) => fold_bf16::<4, true, false>(acc, out, [a, b, c, d]),
            (false, false, 4) => fold_bf16::<4, false, false>(acc, out, [a, b, c, d]),
            (false, true, 1) => fold_bf16::<1, false, true>(acc, out, [a]),
            (false, true, 2) => fold_bf16::<2, false, true>(acc, out, [a, b]),
            (false, true, 3) => fold_bf16::<3, false, true>(acc, out, [a, b, c]),
            (false, true, 4) => fold_bf16::<4, false, true>(acc, out, [a, b, c, d]),
            _ => unreachable!("bf16 group of {n} inputs (init: {init}, last: {last})"),
        }
    }

    #[inline(always)]
    fn scale(buf: &mut [Self], s: f32, _tmp: &mut [f32]) {
        for x in buf {
            *x = bf16::from_bits(f32_to_bf16(bf16_to_f32(x.to_bits()) * s));
        }
    }

    #[inline(always)]
    fn add_line<const N: usize>(xs: [[u8; LINE_BYTES]; N]) -> [u8; LINE_BYTES] {
        let mut a = [0.0f32; HALF_LINE];
        for (k, x) in xs.iter().enumerate() {
            let x: [u16; HALF_LINE] = bytemuck::cast(*x);
            for (a, x) in a.iter_mut().zip(x) {
                *a = if k == 0 {
                    bf16_to_f32(x)
                } else {
                    *a + bf16_to_f32(x)
                };
            }
        }
        let mut out = [0u16; HALF_LINE];
        for (o, a) in out.iter_mut().zip(a) {
            *o = f32_to_bf16(a);
        }
        bytemuck::cast(out)
    }
}

impl Half16 for f16 {
    const NEEDS_ACC: bool = true;

    fn group(
        acc: &mut [f32],
        tmp: &mut [f32],
        out: &mut [Self],
        v: [&[Self]; GROUP],
        n: usize,
        init: bool,
        last: bool,
    ) {
        let len = v[0].len();
        let acc = &mut acc[..len];
        let tmp = &mut tmp[..len];
        for (k, s) in v[..n].iter().enumerate() {
            if init && k == 0 {
                s.convert_to_f32_slice(acc);
            } else {
                s.convert_to_f32_slice(tmp);
                for (a, t) in acc.iter_mut().zip(tmp.iter()) {
                    *a += *t;
                }
            }
        }
        if last {
            out.convert_from_f32_slice(acc);
        }
    }

    fn scale(buf: &mut [Self], s: f32, tmp: &mut [f32]) {
        for chunk in buf.chunks_mut(tmp.len()) {
            let t = &mut tmp[..chunk.len()];
            chunk.convert_to_f32_slice(t);
            for x in t.iter_mut() {
                *x *= s;
            }
            chunk.convert_from_f32_slice(t);
        }
    }

    fn add_line<const N: usize>(xs: [[u8; LINE_BYTES]; N]) -> [u8; LINE_BYTES] {
        let xs = xs.map(bytemuck::cast::<_, [f16; HALF_LINE]>);
        let mut a = xs[0].map(f16::to_f32);
        for x in &xs[1..] {
            for (a, x) in a.iter_mut().zip(x) {
                *a += x.to_f32();
            }
        }
        bytemuck::cast(a.map(f16::from_f32))
    }
}

/// The f16/bf16 kernels of one build, for element type `H`.
trait HalfKernels<H>: Copy {
    /// Whether [`HalfKernels::group`] needs the f32 running-sum and widening blocks
    /// even when all inputs fit into one group.
    const NEEDS_ACC: bool;

    /// One group of a sum over one block: see [`Half16::group`].
    #[allow(clippy::too_many_arguments)]
    fn group(
        self,
        acc: &mut [f32],
        tmp: &mut [f32],
        out: &mut [H],
        v: [&[H]; GROUP],
        n: usize,
        init: bool,
        last: bool,
    );

    /// `x = round(f32(x) * s)` for every element; `tmp` holds at least `buf.len()` f32s.
    fn scale(self, buf: &mut [H], s: f32, tmp: &mut [f32]);

    /// One line of a sum: see [`Half16::add_line`].
    fn add_line<const N: usize>(self, xs: [[u8; LINE_BYTES]; N]) -> [u8; LINE_BYTES];
}

/// The baseline kernels of [`Half16`] (plain Rust and `half`'s slice conversions).
#[derive(Clone, Copy)]
struct PlainHalf;

impl<H: Half16> HalfKernels<H> for PlainHalf {
    const NEEDS_ACC: bool = H::NEEDS_ACC;

    #[inline(always)]
    fn group(
        self,
        acc: &mut [f32],
        tmp: &mut [f32],
        out: &mut [H],
        v: [&[H]; GROUP],
        n: usize,
        init: bool,
        last: bool,
    ) {
        H::group(acc, tmp, out, v, n, init, last);
    }

    #[inline(always)]
    fn scale(self, buf: &mut [H], s: f32, tmp: &mut [f32]) {
        H::scale(buf, s, tmp);
    }

    #[inline(always)]
    fn add_line<const N: usize>(self, xs: [[u8; LINE_BYTES]; N]) -> [u8; LINE_BYTES] {
        H::add_line(xs)
    }
}

/// f16 kernels that widen and round eight lanes at a time with the given functions
/// (the AVX2 build passes the F16C instructions), fusing widening, adding and
/// rounding into one loop per group as the bf16 kernels do.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Clone, Copy)]
struct F16Lanes<W, N> {
    /// f16 → f32 (exact).
    widen: W,
    /// f32 → f16, round to nearest, ties to even.
    narrow: N,
}

/// Eight f16 lanes.
type F16x8 = [f16; 8];

/// Eight f32 lanes.
type F32x8 = [f32; 8];

/// `s[from..]` (at most eight elements) padded with zeros to eight lanes.
#[inline(always)]
fn pad(s: &[f16], from: usize) -> F16x8 {
    let mut x = [f16::ZERO; 8];
    x[..s.len() - from].copy_from_slice(&s[from..]);
    x
}

impl<W, N> F16Lanes<W, N>
where
    W: Fn(F16x8) -> F32x8 + Copy,
    N: Fn(F32x8) -> F16x8 + Copy,
{
    /// `round(f32(x) * s)`, lane-wise.
    #[inline(always)]
    fn scale8(self, x: F16x8, s: f32) -> F16x8 {
        let mut a = (self.widen)(x);
        for a in &mut a {
            *a *= s;
        }
        (self.narrow)(a)
    }

    /// `a + f32(xs[0]) + f32(xs[1]) + ...`, lane-wise, in order.
    #[inline(always)]
    fn add(self, mut a: F32x8, xs: impl Iterator<Item = F16x8>) -> F32x8 {
        for x in xs {
            for (a, b) in a.iter_mut().zip((self.widen)(x)) {
                *a += b;
            }
        }
        a
    }

    /// One group of an f16 sum over one block, as one loop (see [`Half16::group`]).
    #[inline(always)]
    fn fold<const K: usize, const INIT: bool, const FINAL: bool>(
        self,
        acc: &mut [f32],
        out: &mut [f16],
        ins: [&[f16]; K],
    ) {
        let len = ins[0].len();
        let full = len - len % 8;
        // Whole lanes.
        let n8 = full / 8;
        let ins8 = ins.map(|s| &bytemuck::cast_slice::<f16, F16x8>(&s[..full])[..n8]);
        let acc8: &mut [F32x8] =
            bytemuck::cast_slice_mut(&mut acc[..if INIT && FINAL { 0 } else { full }]);
        let out8: &mut [F16x8] = bytemuck::cast_slice_mut(&mut out[..if FINAL { full } else { 0 }]);
        for j in 0..n8 {
            let first = if INIT {
                (self.widen)(ins8[0][j])
            } else {
                acc8[j]
            };
            let a = self.add(first, ins8[usize::from(INIT)..].iter().map(|s| s[j]));
            if FINAL {
                out8[j] = (self.narrow)(a);
            } else {
                acc8[j] = a;
            }
        }
        // The last `len % 8` elements, through zero-padded lanes.
        let rem = len - full;
        if rem > 0 {
            let first = if INIT {
                (self.widen)(pad(ins[0], full))
            } else {
                let mut x = [0.0; 8];
                x[..rem].copy_from_slice(&acc[full..len]);
                x
            };
            let a = self.add(first, ins[usize::from(INIT)..].iter().map(|s| pad(s, full)));
            if FINAL {
                out[full..len].copy_from_slice(&(self.narrow)(a)[..rem]);
            } else {
                acc[full..len].copy_from_slice(&a[..rem]);
            }
        }
    }
}

impl<W, N> HalfKernels<f16> for F16Lanes<W, N>
where
    W: Fn(F16x8) -> F32x8 + Copy,
    N: Fn(F32x8) -> F16x8 + Copy,
{
    const NEEDS_ACC: bool = false;

    #[inline(always)]
    fn group(
        self,
        acc: &mut [f32],
        _tmp: &mut [f32],
        out: &mut [f16],
        v: [&[f16]; GROUP],
        n: usize,
        init: bool,
        last: bool,
    ) {
        let [a, b, c, d] = v;
        match (init, last, n) {
            (true, true, 2) => self.fold::<2, true, true>(acc, out, [a, b]),
            (true, true, 3) => self.fold::<3, true, true>(acc, out, [a, b, c]),
            (true, true, 4) => self.fold::<4, true, true>(acc, out, [a, b, c, d]),
            (true, false, 4) => self.fold::<4, true, false>(acc, out, [a, b, c, d]),
            (false, false, 4) => self.fold::<4, false, false>(acc, out, [a, b, c, d]),
            (false, true, 1) => self.fold::<1, false, true>(acc, out, [a]),
            (false, true, 2) => self.fold::<2, false, true>(acc, out, [a, b]),
            (false, true, 3) => self.fold::<3, false, true>(acc, out, [a, b, c]),
            (false, true, 4) => self.fold::<4, false, true>(acc, out, [a, b, c, d]),
            _ => unreachable!("f16 group of {n} inputs (init: {init}, last: {last})"),
        }
    }

    #[inline(always)]
    fn scale(self, buf: &mut [f16], s: f32, _tmp: &mut [f32]) {
        let full = buf.len() - buf.len() % 8;
        let (body, tail) = buf.split_at_mut(full);
        for x in bytemuck::cast_slice_mut::<f16, F16x8>(body) {
            *x = self.scale8(*x, s);
        }
        if !tail.is_empty() {
            let n = tail.len();
            tail.copy_from_slice(&self.scale8(pad(tail, 0), s)[..n]);
        }
    }

    #[inline(always)]
    fn add_line<const K: usize>(self, xs: [[u8; LINE_BYTES]; K]) -> [u8; LINE_BYTES] {
        let xs = xs.map(bytemuck::cast::<_, [F16x8; 2]>);
        let mut out = [[f16::ZERO; 8]; 2];
        for (h, o) in out.iter_mut().enumerate() {
            let a = self.add((self.widen)(xs[0][h]), xs[1..].iter().map(|x| x[h]));
            *o = (self.narrow)(a);
        }
        bytemuck::cast(out)
    }
}

/// bf16 kernels whose lines (see [`stream_lines`]) are summed by the given function
/// (the AVX2 build passes one written with its unpack and pack instructions, which
/// needs fewer instructions than the compiler's vectorisation of [`Half16`]'s);
/// everything else is done as by [`PlainHalf`].
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Clone, Copy)]
struct Bf16Lines<L>(L);

impl<L: Fn(&[[u8; LINE_BYTES]]) -> [u8; LINE_BYTES] + Copy> HalfKernels<bf16> for Bf16Lines<L> {
    const NEEDS_ACC: bool = <PlainHalf as HalfKernels<bf16>>::NEEDS_ACC;

    #[inline(always)]
    fn group(
        self,
        acc: &mut [f32],
        tmp: &mut [f32],
        out: &mut [bf16],
        v: [&[bf16]; GROUP],
        n: usize,
        init: bool,
        last: bool,
    ) {
        bf16::group(acc, tmp, out, v, n, init, last);
    }

    #[inline(always)]
    fn scale(self, buf: &mut [bf16], s: f32, tmp: &mut [f32]) {
        bf16::scale(buf, s, tmp);
    }

    #[inline(always)]
    fn add_line<const N: usize>(self, xs: [[u8; LINE_BYTES]; N]) -> [u8; LINE_BYTES] {
        (self.0)(&xs)
    }
}

/// An f32 block (the running sum, or widened inputs).
type F32Block = [f32; BLOCK_BYTES / 2];

/// Runs `f` with the f32 stack blocks the kernels `K` need: the running sum (when
/// `K::NEEDS_ACC` or `many` inputs span several groups) and, for `NEEDS_ACC`, the
/// widening scratch. Blocks that are not needed are empty and cost nothing.
#[inline(always)]
fn with_f32_blocks<H, K: HalfKernels<H>, R>(
    many: bool,
    f: impl FnOnce(&mut [f32], &mut [f32]) -> R,
) -> R {
    let mut acc_block: F32Block;
    let mut tmp_block: F32Block;
    let acc: &mut [f32] = if K::NEEDS_ACC || many {
        acc_block = [0.0; BLOCK_BYTES / 2];
        &mut acc_block
    } else {
        &mut []
    };
    let tmp: &mut [f32] = if K::NEEDS_ACC {
        tmp_block = [0.0; BLOCK_BYTES / 2];
        &mut tmp_block
    } else {
        &mut []
    };
    f(acc, tmp)
}

/// `out = round(f32(in0) + f32(in1) + ...)` for two or more inputs.
#[inline(always)]
fn sum_half<H: bytemuck::Pod, K: HalfKernels<H>, S: Sink>(
    k: K,
    out: &mut [u8],
    inputs: &[&[u8]],
    sink: S,
) {
    let stream = sink.streams(out.len());
    if (S::LINES || stream) && inputs.len() <= GROUP && aligned::<H>(out) {
        // One pass, line by line (with streaming stores where the sink streams).
        if stream {
            sum_half_lines(k, out, inputs, sink);
        } else {
            sum_half_lines(k, out, inputs, PlainSink);
        }
        return;
    }
    with_f32_blocks::<H, K, _>(
        inputs.len() > GROUP,
        #[inline(always)]
        |acc, tmp| {
            if all_aligned::<H>(out, inputs) && !stream {
                sum_half_blocks::<H, K, S>(k, out, inputs, acc, tmp, &mut [], sink, false);
            } else {
                let mut scratch: Scratches = [[0; BLOCK_BYTES / 8]; GROUP + 1];
                sum_half_blocks::<H, K, S>(k, out, inputs, acc, tmp, &mut scratch, sink, stream);
            }
        },
    );
}

/// [`sum_half`] of at most [`GROUP`] inputs into an aligned `out`, line by line.
#[inline(always)]
fn sum_half_lines<H: bytemuck::Pod, K: HalfKernels<H>, S: Sink>(
    k: K,
    out: &mut [u8],
    inputs: &[&[u8]],
    sink: S,
) {
    match *inputs {
        [a, b] => stream_lines(
            out,
            [a, b],
            sink,
            #[inline(always)]
            |xs| k.add_line(xs),
        ),
        [a, b, c] => stream_lines(
            out,
            [a, b, c],
            sink,
            #[inline(always)]
            |xs| k.add_line(xs),
        ),
        [a, b, c, d] => stream_lines(
            out,
            [a, b, c, d],
            sink,
            #[inline(always)]
            |xs| k.add_line(xs),
        ),
        _ => unreachable!("sum of {} inputs", inputs.len()),
    }
}

/// Block loop of [`sum_half`]; `scratch` is empty when every buffer is aligned and
/// the output is not `stream`ed (see [`Sink`]).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn sum_half_blocks<H: bytemuck::Pod, K: HalfKernels<H>, S: Sink>(
    k: K,
    out: &mut [u8],
    inputs: &[&[u8]],
    acc: &mut [f32],
    tmp: &mut [f32],
    scratch: &mut [Scratch],
    sink: S,
    stream: bool,
) {
    let (in_scratch, mut out_scratch) = match scratch.split_last_mut() {
        Some((o, i)) => (i, Some(o)),
        None => (scratch, None),
    };
    let n = inputs.len();
    let blk = if stream {
        STREAM_BLOCK_BYTES
    } else {
        BLOCK_BYTES
    };
    for (bi, ob) in out.chunks_mut(blk).enumerate() {
        let r = bi * blk..bi * blk + ob.len();
        let out_aligned = !stream && aligned::<H>(ob);
        let o: &mut [H] = if out_aligned {
            bytemuck::cast_slice_mut(ob)
        } else {
            let s = out_scratch
                .as_deref_mut()
                .expect("scratch for an unaligned block");
            bytemuck::cast_slice_mut(&mut bytemuck::cast_slice_mut::<u64, u8>(s)[..ob.len()])
        };
        for (s, e) in groups(n) {
            let v = views::<H>(&inputs[s..e], r.clone(), in_scratch);
            k.group(acc, tmp, o, v, e - s, s == 0, e == n);
        }
        if !out_aligned {
            let s = out_scratch
                .as_deref()
                .expect("scratch for an unaligned block");
            let s = &bytemuck::cast_slice::<u64, u8>(s)[..ob.len()];
            if stream {
                sink.write(ob, s);
            } else {
                ob.copy_from_slice(s);
            }
        }
    }
}

/// `x = round(f32(x) * s)` for every element.
#[inline(always)]
fn scale_half<H: bytemuck::Pod, K: HalfKernels<H>>(k: K, buf: &mut [u8], s: f32) {
    let mut tmp: F32Block = [0.0; BLOCK_BYTES / 2];
    map_typed::<H>(
        buf,
        #[inline(always)]
        |b| k.scale(b, s, &mut tmp),
    );
}

/// `acc = round(f32(acc) + f32(input))`.
#[inline(always)]
fn add_assign_half<H: bytemuck::Pod, K: HalfKernels<H>>(k: K, accb: &mut [u8], input: &[u8]) {
    let mut scratch: [Scratch; 3] = [[0; BLOCK_BYTES / 8]; 3];
    let [old_copy, in_scratch, out_scratch] = &mut scratch;
    with_f32_blocks::<H, K, _>(
        false,
        #[inline(always)]
        |acc, tmp| {
            for (bi, ob) in accb.chunks_mut(BLOCK_BYTES).enumerate() {
                let r = bi * BLOCK_BYTES..bi * BLOCK_BYTES + ob.len();
                // The old value is read from a copy, as the block is overwritten in place.
                let old = &mut bytemuck::cast_slice_mut::<u64, u8>(old_copy)[..ob.len()];
                old.copy_from_slice(ob);
                let old: &[H] = bytemuck::cast_slice(old);
                let inp = view::<H>(&input[r], Some(in_scratch));
                let v = [old, inp, &[], &[]];
                if aligned::<H>(ob) {
                    k.group(acc, tmp, bytemuck::cast_slice_mut(ob), v, 2, true, true);
                } else {
                    let s = &mut bytemuck::cast_slice_mut::<u64, u8>(out_scratch)[..ob.len()];
                    k.group(acc, tmp, bytemuck::cast_slice_mut(s), v, 2, true, true);
                    ob.copy_from_slice(s);
                }
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small deterministic PRNG (xorshift64*).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        /// Uniform in [-r, r).
        fn float(&mut self, r: f64) -> f64 {
            ((self.next() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * r
        }
    }

    /// `n` random elements of `dtype` as bytes (finite floats, full-range integers).
    fn random_bytes(dtype: DType, n: usize, rng: &mut Rng) -> Vec<u8> {
        let mut v = Vec::with_capacity(n * dtype.size());
        for _ in 0..n {
            match dtype {
                DType::F32 => v.extend((rng.float(1e3) as f32).to_ne_bytes()),
                DType::F64 => v.extend(rng.float(1e3).to_ne_bytes()),
                DType::F16 => v.extend(f16::from_f64(rng.float(8.0)).to_bits().to_ne_bytes()),
                DType::BF16 => v.extend(bf16::from_f64(rng.float(8.0)).to_bits().to_ne_bytes()),
                DType::I32 => v.extend((rng.next() as i32).to_ne_bytes()),
                DType::I64 => v.extend((rng.next() as i64).to_ne_bytes()),
                DType::U8 => v.push(rng.next() as u8),
            }
        }
        v
    }

    /// Copies `data` into a fresh Vec at byte offset `off`; returns (storage, off).
    fn placed(data: &[u8], off: usize) -> Vec<u8> {
        let mut v = vec![0xA5u8; data.len() + off];
        v[off..].copy_from_slice(data);
        v
    }

    #[test]
    fn sum_into_matches_reference_all_dtypes() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for dtype in DType::ALL {
            for elems in [0usize, 1, 3, 4097] {
                for w in 0..=8usize {
                    let data: Vec<Vec<u8>> = (0..w)
                        .map(|_| random_bytes(dtype, elems, &mut rng))
                        .collect();
                    let refs: Vec<&[u8]> = data.iter().map(|v| v.as_slice()).collect();
                    let expect = if w == 0 {
                        vec![0u8; elems * dtype.size()]
                    } else {
                        reference_sum(dtype, &refs)
                    };
                    // Alignment patterns: all aligned, all at +1, alternating, out only,
                    // and assorted offsets 0..8 (aligned for some dtypes only).
                    for pattern in 0..5usize {
                        let in_off = |k: usize| match pattern {
                            0 | 3 => 0,
                            1 => 1,
                            2 => k % 2,
                            _ => (3 * k + 2) % 8,
                        };
                        let out_off = [0, 1, 0, 1, 2][pattern];
                        let stores: Vec<Vec<u8>> = data
                            .iter()
                            .enumerate()
                            .map(|(k, d)| placed(d, in_off(k)))
                            .collect();
                        let ins: Vec<&[u8]> = stores
                            .iter()
                            .enumerate()
                            .map(|(k, s)| &s[in_off(k)..])
                            .collect();
                        let mut out = placed(&vec![0x5Au8; elems * dtype.size()], out_off);
                        sum_into(dtype, &mut out[out_off..], &ins).unwrap();
                        assert_eq!(
                            &out[out_off..],
                            &expect[..],
                            "{dtype} elems={elems} w={w} pattern={pattern}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn reference_adds_in_input_order() {
        // (1e20 + -1e20) + 1 = 1, whereas 1e20 + (-1e20 + 1) = 0.
        let ins = [1e20f32, -1e20, 1.0].map(|x| x.to_ne_bytes());
        let refs: Vec<&[u8]> = ins.iter().map(|b| &b[..]).collect();
        let mut out = [0u8; 4];
        sum_into(DType::F32, &mut out, &refs).unwrap();
        assert_eq!(f32::from_ne_bytes(out), 1.0);
        assert_eq!(reference_sum(DType::F32, &refs), out);
        let ins = [1e300f64, -1e300, 1.0].map(|x| x.to_ne_bytes());
        let refs: Vec<&[u8]> = ins.iter().map(|b| &b[..]).collect();
        let mut out = [0u8; 8];
        sum_into(DType::F64, &mut out, &refs).unwrap();
        assert_eq!(f64::from_ne_bytes(out), 1.0);
    }

    #[test]
    fn add_assign_matches_reference() {
        let mut rng = Rng(42);
        for dtype in DType::ALL {
            for elems in [0usize, 1, 3, 4097] {
                let a = random_bytes(dtype, elems, &mut rng);
                let b = random_bytes(dtype, elems, &mut rng);
                let expect = reference_sum(dtype, &[&a, &b]);
                for (ao, bo) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                    let mut acc = placed(&a, ao);
                    let inp = placed(&b, bo);
                    add_assign(dtype, &mut acc[ao..], &inp[bo..]).unwrap();
                    assert_eq!(
                        &acc[ao..],
                        &expect[..],
                        "{dtype} elems={elems} offs={ao},{bo}"
                    );
                }
            }
        }
    }

    #[test]
    fn integers_wrap() {
        let a = i32::MAX.to_ne_bytes();
        let b = 1i32.to_ne_bytes();
        let mut out = [0u8; 4];
        sum_into(DType::I32, &mut out, &[&a, &b, &b]).unwrap();
        assert_eq!(i32::from_ne_bytes(out), i32::MIN + 1);
        let a = i64::MIN.to_ne_bytes();
        let b = (-1i64).to_ne_bytes();
        let mut out = [0u8; 8];
        sum_into(DType::I64, &mut out, &[&a, &b]).unwrap();
        assert_eq!(i64::from_ne_bytes(out), i64::MAX);
        let mut out = [0u8; 2];
        sum_into(DType::U8, &mut out, &[&[200, 1], &[100, 255], &[1, 1]]).unwrap();
        assert_eq!(out, [45, 1]);
        let mut acc = [250u8];
        add_assign(DType::U8, &mut acc, &[10]).unwrap();
        assert_eq!(acc, [4]);
        assert_eq!(reference_sum(DType::U8, &[&[200], &[100]]), [44]);
    }

    #[test]
    fn half_types_accumulate_in_f32_and_round_once() {
        // f16: ulp(1.0) = 2^-10. Pairwise rounding: 1 + 2^-11 is a tie -> 1.0, and again
        // -> 1.0. Accumulating in f32 gives exactly 1 + 2^-10, which f16 represents.
        let e = 2f32.powi(-11);
        let enc = |x: f32| f16::from_f32(x).to_bits().to_ne_bytes();
        let (a, b) = (enc(1.0), enc(e));
        let pairwise = f16::from_f32(f16::from_f32(1.0 + e).to_f32() + e);
        assert_eq!(pairwise.to_f32(), 1.0);
        let mut out = [0u8; 2];
        sum_into(DType::F16, &mut out, &[&a, &b, &b]).unwrap();
        let got = f16::from_bits(u16::from_ne_bytes(out)).to_f32();
        assert_eq!(got, 1.0 + 2.0 * e);
        assert_eq!(reference_sum(DType::F16, &[&a, &b, &b]), out);

        // bf16: ulp(1.0) = 2^-7.
        let e = 2f32.powi(-8);
        let enc = |x: f32| bf16::from_f32(x).to_bits().to_ne_bytes();
        let (a, b) = (enc(1.0), enc(e));
        let pairwise = bf16::from_f32(bf16::from_f32(1.0 + e).to_f32() + e);
        assert_eq!(pairwise.to_f32(), 1.0);
        let mut out = [0u8; 2];
        sum_into(DType::BF16, &mut out, &[&a, &b, &b]).unwrap();
        let got = bf16::from_bits(u16::from_ne_bytes(out)).to_f32();
        assert_eq!(got, 1.0 + 2.0 * e);
        assert_eq!(reference_sum(DType::BF16, &[&a, &b, &b]), out);

        // Rounding is to nearest, ties to even: 1 + 2^-8 (bf16 tie) -> 1.0; 1 + 3*2^-8 -> 1 + 2^-6.
        let three = enc(3.0 * e);
        let mut out = [0u8; 2];
        sum_into(DType::BF16, &mut out, &[&a, &b]).unwrap();
        assert_eq!(bf16::from_bits(u16::from_ne_bytes(out)).to_f32(), 1.0);
        sum_into(DType::BF16, &mut out, &[&a, &three]).unwrap();
        assert_eq!(
            bf16::from_bits(u16::from_ne_bytes(out)).to_f32(),
            1.0 + 4.0 * e
        );
    }

    #[test]
    fn half_special_values() {
        let enc = |x: f32| bf16::from_f32(x).to_bits().to_ne_bytes();
        let big = enc(3.0e38);
        let mut out = [0u8; 2];
        sum_into(DType::BF16, &mut out, &[&big, &big]).unwrap();
        assert_eq!(bf16::from_bits(u16::from_ne_bytes(out)), bf16::INFINITY);
        let nan = bf16::NAN.to_bits().to_ne_bytes();
        sum_into(DType::BF16, &mut out, &[&big, &nan]).unwrap();
        assert!(bf16::from_bits(u16::from_ne_bytes(out)).is_nan());
        let enc = |x: f32| f16::from_f32(x).to_bits().to_ne_bytes();
        let big = enc(60000.0);
        sum_into(DType::F16, &mut out, &[&big, &big]).unwrap();
        assert_eq!(f16::from_bits(u16::from_ne_bytes(out)), f16::INFINITY);
        // -0 + -0 = -0 (the accumulator starts from input 0, not from +0).
        let nz = enc(-0.0);
        sum_into(DType::F16, &mut out, &[&nz, &nz, &nz]).unwrap();
        assert_eq!(u16::from_ne_bytes(out), 0x8000);
        assert_eq!(reference_sum(DType::F16, &[&nz, &nz, &nz]), out);
    }

    fn scaled<const N: usize>(dtype: DType, vals: &[[u8; N]], n: u32, off: usize) -> Vec<[u8; N]> {
        let flat: Vec<u8> = vals.iter().flatten().copied().collect();
        let mut buf = placed(&flat, off);
        scale_div(dtype, &mut buf[off..], n).unwrap();
        buf[off..]
            .chunks_exact(N)
            .map(|c| c.try_into().unwrap())
            .collect()
    }

    #[test]
    fn scale_div_each_dtype() {
        for off in [0, 1] {
            let v = [3.0f32, -6.0, 1.0, 0.5, 7.0].map(f32::to_ne_bytes);
            let s = (1.0f64 / 3.0) as f32;
            let got = scaled(DType::F32, &v, 3, off);
            let expect: Vec<_> = v
                .iter()
                .map(|b| (f32::from_ne_bytes(*b) * s).to_ne_bytes())
                .collect();
            assert_eq!(got, expect);

            let v = [3.0f64, -6.0, 1.0].map(f64::to_ne_bytes);
            let got = scaled(DType::F64, &v, 3, off);
            let expect: Vec<_> = v
                .iter()
                .map(|b| (f64::from_ne_bytes(*b) * (1.0 / 3.0)).to_ne_bytes())
                .collect();
            assert_eq!(got, expect);
            let got = scaled(DType::F64, &[8.0f64.to_ne_bytes()], 4, off);
            assert_eq!(got, [2.0f64.to_ne_bytes()]);

            let v = [-7i32, 7, -1, 1, i32::MIN, i32::MAX, 0].map(i32::to_ne_bytes);
            let got = scaled(DType::I32, &v, 2, off);
            let expect = [-3i32, 3, 0, 0, -(1 << 30), (1 << 30) - 1, 0].map(i32::to_ne_bytes);
            assert_eq!(got, expect);
            let got = scaled(
                DType::I32,
                &[i32::MIN.to_ne_bytes(), (-5i32).to_ne_bytes()],
                u32::MAX,
                off,
            );
            assert_eq!(got, [0i32.to_ne_bytes(); 2]);
            let got = scaled(DType::I32, &[i32::MIN.to_ne_bytes()], 1 << 31, off);
            assert_eq!(got, [(-1i32).to_ne_bytes()]);

            let v = [-7i64, 7, i64::MIN, i64::MAX].map(i64::to_ne_bytes);
            let got = scaled(DType::I64, &v, 3, off);
            let expect = [-2i64, 2, i64::MIN / 3, i64::MAX / 3].map(i64::to_ne_bytes);
            assert_eq!(got, expect);

            let got = scaled(DType::U8, &[[255u8], [7], [1]], 2, off);
            assert_eq!(got, [[127u8], [3], [0]]);
            let got = scaled(DType::U8, &[[255u8]], 300, off);
            assert_eq!(got, [[0u8]]);

            let v = [3.0f32, -1.0, 1000.0, 0.1].map(|x| f16::from_f32(x).to_bits().to_ne_bytes());
            let got = scaled(DType::F16, &v, 4, off);
            let expect: Vec<_> = v
                .iter()
                .map(|b| {
                    f16::from_f32(f16::from_bits(u16::from_ne_bytes(*b)).to_f32() * 0.25)
                        .to_bits()
                        .to_ne_bytes()
                })
                .collect();
            assert_eq!(got, expect);
            assert_eq!(f16::from_bits(u16::from_ne_bytes(got[0])).to_f32(), 0.75);

            let v = [3.0f32, -1.0, 1000.0, 0.1].map(|x| bf16::from_f32(x).to_bits().to_ne_bytes());
            let got = scaled(DType::BF16, &v, 3, off);
            let s = (1.0f64 / 3.0) as f32;
            let expect: Vec<_> = v
                .iter()
                .map(|b| {
                    bf16::from_f32(bf16::from_bits(u16::from_ne_bytes(*b)).to_f32() * s)
                        .to_bits()
                        .to_ne_bytes()
                })
                .collect();
            assert_eq!(got, expect);
            assert_eq!(bf16::from_bits(u16::from_ne_bytes(got[0])).to_f32(), 1.0);

            // n == 1 is the identity.
            let v = [-7i32, 7].map(i32::to_ne_bytes);
            assert_eq!(scaled(DType::I32, &v, 1, off), v);
        }
        // Long buffers (several blocks) for the half types.
        let mut rng = Rng(7);
        for dtype in [DType::F16, DType::BF16] {
            let data = random_bytes(dtype, 4097, &mut rng);
            let mut buf = placed(&data, 1);
            scale_div(dtype, &mut buf[1..], 5).unwrap();
            for (c, d) in buf[1..].chunks_exact(2).zip(data.chunks_exact(2)) {
                let x = u16::from_ne_bytes([d[0], d[1]]);
                let expect = match dtype {
                    DType::F16 => f16::from_f32(f16::from_bits(x).to_f32() * 0.2f32).to_bits(),
                    _ => bf16::from_f32(bf16::from_bits(x).to_f32() * 0.2f32).to_bits(),
                };
                assert_eq!(u16::from_ne_bytes([c[0], c[1]]), expect);
            }
        }
    }

    #[test]
    fn errors() {
        let a = [0u8; 8];
        let b = [0u8; 4];
        let mut out = [0u8; 8];
        let e = sum_into(DType::F32, &mut out, &[&a, &b]).unwrap_err();
        assert_eq!(
            e,
            SumError::LengthMismatch {
                dtype: DType::F32,
                expected: 8,
                input: 1,
                len: 4
            }
        );
        let msg = e.to_string();
        assert!(
            msg.contains("f32") && msg.contains('8') && msg.contains('4'),
            "{msg}"
        );

        let mut odd = [0u8; 6];
        let e = sum_into(DType::F64, &mut odd, &[]).unwrap_err();
        assert_eq!(
            e,
            SumError::NotMultiple {
                dtype: DType::F64,
                len: 6
            }
        );
        let msg = e.to_string();
        assert!(
            msg.contains("f64") && msg.contains('6') && msg.contains('8'),
            "{msg}"
        );
        assert!(sum_into(DType::BF16, &mut [0u8; 3], &[&[0u8; 3], &[0u8; 3]]).is_err());

        let e = add_assign(DType::I32, &mut out, &b).unwrap_err();
        assert_eq!(
            e,
            SumError::LengthMismatch {
                dtype: DType::I32,
                expected: 8,
                input: 0,
                len: 4
            }
        );
        assert!(matches!(
            add_assign(DType::I64, &mut [0u8; 4], &[0u8; 4]),
            Err(SumError::NotMultiple { .. })
        ));

        let e = scale_div(DType::F16, &mut [0u8; 4], 0).unwrap_err();
        assert_eq!(e, SumError::ZeroDivisor { dtype: DType::F16 });
        assert!(e.to_string().contains("f16"));
        assert!(matches!(
            scale_div(DType::I32, &mut [0u8; 5], 2),
            Err(SumError::NotMultiple { .. })
        ));
        // u8 accepts any length; empty buffers are fine everywhere.
        for d in DType::ALL {
            sum_into(d, &mut [], &[&[], &[]]).unwrap();
            scale_div(d, &mut [], 3).unwrap();
        }
    }

    #[test]
    fn bf16_conversions_match_half() {
        // Widening: exact for every pattern (NaNs stay NaN; half also quiets them).
        for h in 0..=u16::MAX {
            let ours = bf16_to_f32(h);
            let theirs = bf16::from_bits(h).to_f32();
            if theirs.is_nan() {
                assert!(ours.is_nan(), "{h:#06x}");
            } else {
                assert_eq!(ours.to_bits(), theirs.to_bits(), "{h:#06x}");
            }
        }
        // Narrowing: every bf16 value with the low half at the rounding boundaries,
        // plus a stride through all patterns. Signalling NaNs never reach the
        // kernels (f32 arithmetic quiets them), so only quiet NaNs are compared.
        let check = |b: u32| {
            let x = f32::from_bits(b);
            if x.is_nan() && b & 0x0040_0000 == 0 {
                return;
            }
            assert_eq!(f32_to_bf16(x), bf16::from_f32(x).to_bits(), "{b:#010x}");
        };
        for hi in 0..=u32::from(u16::MAX) {
            for lo in [0, 1, 0x7fff, 0x8000, 0x8001, 0xffff] {
                check(hi << 16 | lo);
            }
        }
        for b in (0..=u32::MAX).step_by(9973) {
            check(b);
        }
        // NaNs are never rounded into infinities or zeros.
        for b in [0x7fff_ffffu32, 0xffff_ffff, 0x7fc0_8000, 0x7fff_8000] {
            let h = f32_to_bf16(f32::from_bits(b));
            assert!(bf16::from_bits(h).is_nan(), "{b:#010x} -> {h:#06x}");
        }
    }

    #[test]
    fn nan_propagates() {
        for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
            let one = reference_sum(dtype, &[&random_bytes(dtype, 1, &mut Rng(3))]);
            let nan = match dtype {
                DType::F32 => f32::NAN.to_ne_bytes().to_vec(),
                DType::F64 => f64::NAN.to_ne_bytes().to_vec(),
                DType::F16 => f16::NAN.to_bits().to_ne_bytes().to_vec(),
                _ => bf16::NAN.to_bits().to_ne_bytes().to_vec(),
            };
            let mut out = vec![0u8; dtype.size()];
            sum_into(dtype, &mut out, &[&one, &nan, &one]).unwrap();
            let is_nan = match dtype {
                DType::F32 => f32::from_ne_bytes(out[..].try_into().unwrap()).is_nan(),
                DType::F64 => f64::from_ne_bytes(out[..].try_into().unwrap()).is_nan(),
                DType::F16 => f16::from_bits(u16::from_ne_bytes([out[0], out[1]])).is_nan(),
                _ => bf16::from_bits(u16::from_ne_bytes([out[0], out[1]])).is_nan(),
            };
            assert!(is_nan, "{dtype}");
        }
    }

    #[test]
    #[should_panic(expected = "input 1 has 4 bytes")]
    fn reference_rejects_mismatch() {
        reference_sum(DType::F32, &[&[0u8; 8], &[0u8; 4]]);
    }

    /// `n` elements of `dtype` as bytes: mostly finite values of assorted magnitudes,
    /// one in eight a random bit pattern (NaNs, infinities, subnormals, huge values
    /// that round to infinity...).
    fn random_mixed(dtype: DType, n: usize, rng: &mut Rng) -> Vec<u8> {
        let mut v = Vec::with_capacity(n * dtype.size());
        for _ in 0..n {
            let bits = rng.next();
            let wild = bits.is_multiple_of(8);
            let mag = [1e-6, 1.0, 8.0, 6e4, 1e30][(bits >> 3) as usize % 5];
            let x = rng.float(mag);
            match dtype {
                DType::F32 if wild => v.extend((bits as u32).to_ne_bytes()),
                DType::F32 => v.extend((x as f32).to_ne_bytes()),
                DType::F64 if wild => v.extend(bits.to_ne_bytes()),
                DType::F64 => v.extend(x.to_ne_bytes()),
                DType::F16 if wild => v.extend(((bits >> 16) as u16).to_ne_bytes()),
                DType::F16 => v.extend(f16::from_f64(x).to_bits().to_ne_bytes()),
                DType::BF16 if wild => v.extend(((bits >> 16) as u16).to_ne_bytes()),
                DType::BF16 => v.extend(bf16::from_f64(x).to_bits().to_ne_bytes()),
                _ => v.extend(&random_bytes(dtype, 1, rng)),
            }
        }
        v
    }

    /// Asserts that `a` and `b` hold the same elements of `dtype`, bit for bit, except
    /// that any two NaNs are equal (their payloads are unspecified).
    fn assert_same(dtype: DType, a: &[u8], b: &[u8], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        let nan = |e: &[u8]| match dtype {
            DType::F32 => f32::from_ne_bytes(e.try_into().unwrap()).is_nan(),
            DType::F64 => f64::from_ne_bytes(e.try_into().unwrap()).is_nan(),
            DType::F16 => f16::from_bits(u16::from_ne_bytes([e[0], e[1]])).is_nan(),
            DType::BF16 => bf16::from_bits(u16::from_ne_bytes([e[0], e[1]])).is_nan(),
            _ => false,
        };
        let size = dtype.size();
        for (i, (x, y)) in a.chunks_exact(size).zip(b.chunks_exact(size)).enumerate() {
            assert!(
                x == y || (nan(x) && nan(y)),
                "{what}: element {i}: {x:02x?} != {y:02x?}"
            );
        }
    }

    /// Runs every operation on random data through `kernels` and through the baseline
    /// build (called directly), and compares the bytes.
    fn check_against_baseline(name: &str, kernels: impl Fn(DType, Op<'_>)) {
        let mut rng = Rng(0x5D15_BA7C);
        for dtype in DType::ALL {
            let size = dtype.size();
            for elems in [1usize, 7, 8, 9, 31, 2048, 4099, 3 * 2048 + 5] {
                for off in [0usize, 1] {
                    let go = |k: &dyn Fn(DType, Op<'_>), data: &[Vec<u8>], op: u32| {
                        let stores: Vec<Vec<u8>> = data.iter().map(|d| placed(d, off)).collect();
                        let ins: Vec<&[u8]> = stores.iter().map(|s| &s[off..]).collect();
                        match op {
                            0 => {
                                let mut out = placed(&vec![0x5Au8; elems * size], off);
                                k(dtype, Op::Sum(&mut out[off..], &ins));
                                out
                            }
                            1 => {
                                let mut acc = placed(ins[0], off);
                                k(dtype, Op::AddAssign(&mut acc[off..], ins[1]));
                                acc
                            }
                            n => {
                                let mut buf = placed(ins[0], off);
                                k(dtype, Op::Scale(&mut buf[off..], n));
                                buf
                            }
                        }
                    };
                    let baseline = |d: DType, op: Op<'_>| run(Kernels::Baseline, d, op);
                    for w in 2..=9usize {
                        let data: Vec<Vec<u8>> = (0..w)
                            .map(|_| random_mixed(dtype, elems, &mut rng))
                            .collect();
                        let what = format!("{name} sum {dtype} elems={elems} w={w} off={off}");
                        assert_same(
                            dtype,
                            &go(&kernels, &data, 0),
                            &go(&baseline, &data, 0),
                            &what,
                        );
                    }
                    let data: Vec<Vec<u8>> = (0..2)
                        .map(|_| random_mixed(dtype, elems, &mut rng))
                        .collect();
                    for op in [1, 2, 3, 7] {
                        let what = format!("{name} op={op} {dtype} elems={elems} off={off}");
                        assert_same(
                            dtype,
                            &go(&kernels, &data, op),
                            &go(&baseline, &data, op),
                            &what,
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn dispatched_matches_baseline() {
        #[cfg(target_arch = "x86_64")]
        println!("AVX2 + FMA + F16C build in use: {}", has_avx2());
        check_against_baseline("dispatched", |d, op| run(Kernels::Best, d, op));
    }

    #[test]
    fn f16_lanes_match_baseline() {
        // The eight-lane f16 kernels with `half`'s scalar conversions, on any CPU.
        let lanes = F16Lanes {
            widen: |h: F16x8| h.map(f16::to_f32),
            narrow: |x: F32x8| x.map(f16::from_f32),
        };
        check_against_baseline("f16 lanes", |d, op| {
            run_with(d, op, lanes, PlainHalf, PlainSink)
        });
        let sink = StreamSink {
            min: 0,
            store: |d: &mut Line, v: [u8; LINE_BYTES]| d.0 = v,
        };
        check_against_baseline("f16 lanes streamed", |d, op| {
            run_with(d, op, lanes, PlainHalf, sink)
        });
    }

    #[test]
    fn streamed_sums_match_baseline() {
        // Every sum streamed (line by line, or block by block through scratch), on
        // any CPU, with ordinary stores.
        let sink = StreamSink {
            min: 0,
            store: |d: &mut Line, v: [u8; LINE_BYTES]| d.0 = v,
        };
        check_against_baseline("streamed", |d, op| {
            run_with(d, op, PlainHalf, PlainHalf, sink)
        });
        // Sums large enough for the dispatched build to stream (non-temporal stores
        // on x86-64 with AVX2), aligned and not.
        let mut rng = Rng(0x5EED_0001);
        let cases = [
            (DType::F32, 2, 0),
            (DType::F32, 3, 1),
            (DType::BF16, 2, 0),
            (DType::BF16, 4, 0),
            (DType::F16, 3, 0),
        ];
        for (dtype, w, off) in cases {
            let elems = STREAM_MIN_BYTES / dtype.size() + 1001;
            let data: Vec<Vec<u8>> = (0..w)
                .map(|_| random_mixed(dtype, elems, &mut rng))
                .collect();
            let stores: Vec<Vec<u8>> = data.iter().map(|d| placed(d, off)).collect();
            let ins: Vec<&[u8]> = stores.iter().map(|s| &s[off..]).collect();
            let size = elems * dtype.size();
            let mut got = placed(&vec![0x5Au8; size], off);
            run(Kernels::Best, dtype, Op::Sum(&mut got[off..], &ins));
            let mut want = placed(&vec![0xA5u8; size], off);
            run(Kernels::Baseline, dtype, Op::Sum(&mut want[off..], &ins));
            assert_same(
                dtype,
                &got,
                &want,
                &format!("large {dtype} w={w} off={off}"),
            );
        }
    }

    /// Throughput check (run in release): `cargo test -p bps-runtime --release --lib sum -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_throughput() {
        use std::hint::black_box;
        use std::time::Instant;
        const LEN: usize = 64 << 20;
        let reps = 8;
        // Time on this thread's CPU: the machine may be shared, and wall-clock time
        // then includes time spent preempted. Both are measured.
        let cpu_secs = || {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `ts` is a valid, writable `timespec`.
            let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
            assert_eq!(rc, 0, "clock_gettime");
            ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
        };
        // GB/s from wall-clock and on-CPU seconds.
        let gbs = |bytes: usize, (wall, cpu): (f64, f64)| {
            (bytes as f64 / wall / 1e9, bytes as f64 / cpu / 1e9)
        };
        let mut rng = Rng(1);
        let mut out = vec![0u8; LEN];
        let mk = |dtype: DType, rng: &mut Rng| {
            let mut v = random_bytes(dtype, 1 << 16, rng);
            v.resize(LEN, 0);
            // Tile the random prefix over the whole buffer.
            let (head, tail) = v.split_at_mut(1 << 17);
            for c in tail.chunks_mut(1 << 17) {
                c.copy_from_slice(&head[..c.len()]);
            }
            v
        };
        // Best (wall-clock, on-CPU) seconds of `reps` runs after a warm-up.
        let time = |f: &mut dyn FnMut()| {
            f();
            let (mut wall, mut cpu) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..reps {
                let (t, c) = (Instant::now(), cpu_secs());
                f();
                cpu = cpu.min(cpu_secs() - c);
                wall = wall.min(t.elapsed().as_secs_f64());
            }
            (wall, cpu)
        };
        let show = |(wall, cpu): (f64, f64)| format!("{wall:6.2} / {cpu:6.2} GB/s");
        let src = mk(DType::U8, &mut rng);
        let memcpy =
            |out: &mut Vec<u8>| gbs(2 * LEN, time(&mut || out.copy_from_slice(black_box(&src))));
        let copy = memcpy(&mut out);
        println!("GB/s as wall-clock / on-CPU; a sum counts (W+1) x len bytes, memcpy 2 x len");
        println!("memcpy          : {}", show(copy));

        // The baseline build (the fallback) against the dispatched one, and their
        // ratios to memcpy (its best of a run before and one after).
        #[cfg(target_arch = "x86_64")]
        println!("AVX2 + FMA + F16C build in use: {}", has_avx2());
        let mut rows = Vec::new();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for w in [2usize, 4] {
                let data: Vec<Vec<u8>> = (0..w).map(|_| mk(dtype, &mut rng)).collect();
                let ins: Vec<&[u8]> = data.iter().map(|v| v.as_slice()).collect();
                let mut speed = |kernels: Kernels| {
                    let t = time(&mut || run(kernels, dtype, Op::Sum(&mut out, black_box(&ins))));
                    gbs((w + 1) * LEN, t)
                };
                rows.push((dtype, w, speed(Kernels::Baseline), speed(Kernels::Best)));
            }
        }
        let again = memcpy(&mut out);
        let copy = (copy.0.max(again.0), copy.1.max(again.1));
        println!("memcpy (best)   : {}", show(copy));
        println!("ratio to memcpy      baseline         dispatched");
        println!("                  wall    on-CPU    wall    on-CPU");
        for (dtype, w, base, best) in &rows {
            println!(
                "sum {dtype:>4} W={w}    : {:5.2}x  {:5.2}x    {:5.2}x  {:5.2}x",
                base.0 / copy.0,
                base.1 / copy.1,
                best.0 / copy.0,
                best.1 / copy.1
            );
        }
        println!("GB/s                 baseline                 dispatched");
        for (dtype, w, base, best) in &rows {
            println!(
                "sum {dtype:>4} W={w}    : {}   {}",
                show(*base),
                show(*best)
            );
        }

        // Dispatched kernels, more shapes.
        for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64, DType::I32] {
            for w in [2usize, 4, 8] {
                let data: Vec<Vec<u8>> = (0..w).map(|_| mk(dtype, &mut rng)).collect();
                let ins: Vec<&[u8]> = data.iter().map(|v| v.as_slice()).collect();
                let t = time(&mut || sum_into(dtype, &mut out, black_box(&ins)).unwrap());
                println!("sum {dtype:>4} W={w}    : {}", show(gbs((w + 1) * LEN, t)));
            }
        }
        for dtype in [DType::F32, DType::BF16] {
            // Unaligned: every buffer starts one byte into its allocation.
            let data: Vec<Vec<u8>> = (0..2).map(|_| mk(dtype, &mut rng)).collect();
            let ins: Vec<&[u8]> = data.iter().map(|v| &v[1..LEN - 7]).collect();
            let t = time(&mut || sum_into(dtype, &mut out[1..LEN - 7], black_box(&ins)).unwrap());
            println!("sum {dtype:>4} W=2 +1B: {}", show(gbs(3 * (LEN - 8), t)));
        }
        let data = mk(DType::F32, &mut rng);
        let t = time(&mut || add_assign(DType::F32, &mut out, &data).unwrap());
        println!("add_assign f32  : {}", show(gbs(2 * LEN, t)));
        out.copy_from_slice(&mk(DType::F32, &mut rng));
        let t = time(&mut || scale_div(DType::F32, &mut out, 3).unwrap());
        println!("scale_div f32   : {}", show(gbs(LEN, t)));
        out.copy_from_slice(&mk(DType::BF16, &mut rng));
        let t = time(&mut || scale_div(DType::BF16, &mut out, 3).unwrap());
        println!("scale_div bf16  : {}", show(gbs(LEN, t)));
        out.copy_from_slice(&mk(DType::F16, &mut rng));
        let t = time(&mut || scale_div(DType::F16, &mut out, 3).unwrap());
        println!("scale_div f16   : {}", show(gbs(LEN, t)));
    }
}
