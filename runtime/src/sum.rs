//! Element-wise summation kernels: the summation server's hot loop.
//!
//! All functions work on raw byte buffers (as they arrive from the network) tagged
//! with a [`DType`]. Buffers need not be aligned for their element type: aligned
//! buffers are viewed in place as typed slices (`bytemuck`), unaligned blocks are
//! first copied into aligned stack scratch. The code is safe Rust whose inner loops
//! auto-vectorise.
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
//! Performance note: the bf16 kernels are compute-bound with the baseline x86-64
//! target (SSE2); building with `-C target-cpu=x86-64-v3` (AVX2, F16C) lets the same
//! code vectorise twice as wide and brings bf16 close to memory bandwidth.

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
    if len % dtype.size() != 0 {
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
        _ => match dtype {
            DType::F32 => sum_native::<f32>(out, inputs, true),
            DType::F64 => sum_native::<f64>(out, inputs, true),
            DType::I32 => sum_native::<i32>(out, inputs, true),
            DType::I64 => sum_native::<i64>(out, inputs, true),
            DType::U8 => sum_native::<u8>(out, inputs, true),
            DType::F16 => sum_half::<f16>(out, inputs),
            DType::BF16 => sum_half::<bf16>(out, inputs),
        },
    }
    Ok(())
}

/// `acc += input`, element-wise (same rules as [`sum_into`]; f16/bf16 are added in
/// f32 and rounded once).
pub fn add_assign(dtype: DType, acc: &mut [u8], input: &[u8]) -> Result<(), SumError> {
    check_multiple(dtype, acc.len())?;
    check_same(dtype, acc.len(), 0, input.len())?;
    match dtype {
        DType::F32 => sum_native::<f32>(acc, &[input], false),
        DType::F64 => sum_native::<f64>(acc, &[input], false),
        DType::I32 => sum_native::<i32>(acc, &[input], false),
        DType::I64 => sum_native::<i64>(acc, &[input], false),
        DType::U8 => sum_native::<u8>(acc, &[input], false),
        DType::F16 => add_assign_half::<f16>(acc, input),
        DType::BF16 => add_assign_half::<bf16>(acc, input),
    }
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
    let inv = 1.0f64 / f64::from(n);
    match dtype {
        DType::F32 => {
            let s = inv as f32;
            map_typed::<f32>(buf, |b| b.iter_mut().for_each(|x| *x *= s));
        }
        DType::F64 => map_typed::<f64>(buf, |b| b.iter_mut().for_each(|x| *x *= inv)),
        DType::I32 => map_typed::<i32>(buf, |b| {
            let n = i64::from(n);
            b.iter_mut().for_each(|x| *x = (i64::from(*x) / n) as i32)
        }),
        DType::I64 => map_typed::<i64>(buf, |b| {
            let n = i64::from(n);
            b.iter_mut().for_each(|x| *x /= n)
        }),
        DType::U8 => map_typed::<u8>(buf, |b| {
            b.iter_mut().for_each(|x| *x = (u32::from(*x) / n) as u8)
        }),
        DType::F16 => scale_half::<f16>(buf, inv as f32),
        DType::BF16 => scale_half::<bf16>(buf, inv as f32),
    }
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
// Kernels.
//
// Buffers are walked in blocks of `BLOCK_BYTES` input bytes. Within a block the
// inputs are consumed in groups of up to `GROUP`; each group is one loop that reads
// its input blocks once, adds them to the running sum (started by the first group,
// held in the output block or an f32 stack block, both in L1) and writes it once.
// So memory sees exactly one pass over every buffer, and L1 a pass over one small
// block per group. Additions always happen in input order.

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

/// Whether `bytes` may be viewed as a `[T]` (the length is checked by the callers).
#[inline(always)]
fn aligned<T>(bytes: &[u8]) -> bool {
    bytes.as_ptr().cast::<T>().is_aligned()
}

/// Whether every buffer is aligned for `T`. Blocks start at multiples of
/// `BLOCK_BYTES` from the buffer starts, so they are then aligned too.
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
fn groups(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).step_by(GROUP).map(move |s| (s, (s + GROUP).min(n)))
}

// ---------------------------------------------------------------------------
// Native types: f32, f64, i32, i64, u8.

/// An element type that is summed in its own arithmetic.
trait Native: bytemuck::Pod {
    /// The summation operator (wrapping for integers).
    fn add(self, rhs: Self) -> Self;
}

macro_rules! native {
    ($t:ty, |$a:ident, $b:ident| $add:expr) => {
        impl Native for $t {
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
fn sum_native<T: Native>(out: &mut [u8], inputs: &[&[u8]], init: bool) {
    if all_aligned::<T>(out, inputs) {
        sum_native_blocks::<T>(out, inputs, init, &mut []);
    } else {
        let mut scratch: Scratches = [[0; BLOCK_BYTES / 8]; GROUP + 1];
        sum_native_blocks::<T>(out, inputs, init, &mut scratch);
    }
}

/// Block loop of [`sum_native`]; `scratch` is empty when every buffer is aligned.
fn sum_native_blocks<T: Native>(
    out: &mut [u8],
    inputs: &[&[u8]],
    init: bool,
    scratch: &mut [Scratch],
) {
    let (in_scratch, mut out_scratch) = match scratch.split_last_mut() {
        Some((o, i)) => (i, Some(o)),
        None => (scratch, None),
    };
    for (bi, ob) in out.chunks_mut(BLOCK_BYTES).enumerate() {
        let r = bi * BLOCK_BYTES..bi * BLOCK_BYTES + ob.len();
        let out_aligned = aligned::<T>(ob);
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
            ob.copy_from_slice(&bytemuck::cast_slice::<u64, u8>(s)[..ob.len()]);
        }
    }
}

/// Applies `f` to `buf` viewed as `[T]` (block by block through scratch when `buf`
/// is not aligned for `T`).
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
// with plain SSE2). f16 conversions go through `half`'s slice helpers, which use
// the F16C instructions when the CPU has them: each input block is widened into
// an f32 scratch block and added to the running sum.

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
}

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

    fn scale(buf: &mut [Self], s: f32, _tmp: &mut [f32]) {
        for x in buf {
            *x = bf16::from_bits(f32_to_bf16(bf16_to_f32(x.to_bits()) * s));
        }
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
}

/// An f32 block (the running sum, or widened inputs).
type F32Block = [f32; BLOCK_BYTES / 2];

/// Runs `f` with the f32 stack blocks the kernels of `H` need: the running sum
/// (when `H::NEEDS_ACC` or `many` inputs span several groups) and, for f16, the
/// widening scratch. Blocks that are not needed are empty and cost nothing.
fn with_f32_blocks<H: Half16, R>(many: bool, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    let mut acc_block: F32Block;
    let mut tmp_block: F32Block;
    let acc: &mut [f32] = if H::NEEDS_ACC || many {
        acc_block = [0.0; BLOCK_BYTES / 2];
        &mut acc_block
    } else {
        &mut []
    };
    let tmp: &mut [f32] = if H::NEEDS_ACC {
        tmp_block = [0.0; BLOCK_BYTES / 2];
        &mut tmp_block
    } else {
        &mut []
    };
    f(acc, tmp)
}

/// `out = round(f32(in0) + f32(in1) + ...)` for two or more inputs.
fn sum_half<H: Half16>(out: &mut [u8], inputs: &[&[u8]]) {
    with_f32_blocks::<H, _>(inputs.len() > GROUP, |acc, tmp| {
        if all_aligned::<H>(out, inputs) {
            sum_half_blocks::<H>(out, inputs, acc, tmp, &mut []);
        } else {
            let mut scratch: Scratches = [[0; BLOCK_BYTES / 8]; GROUP + 1];
            sum_half_blocks::<H>(out, inputs, acc, tmp, &mut scratch);
        }
    });
}

/// Block loop of [`sum_half`]; `scratch` is empty when every buffer is aligned.
fn sum_half_blocks<H: Half16>(
    out: &mut [u8],
    inputs: &[&[u8]],
    acc: &mut [f32],
    tmp: &mut [f32],
    scratch: &mut [Scratch],
) {
    let (in_scratch, mut out_scratch) = match scratch.split_last_mut() {
        Some((o, i)) => (i, Some(o)),
        None => (scratch, None),
    };
    let n = inputs.len();
    for (bi, ob) in out.chunks_mut(BLOCK_BYTES).enumerate() {
        let r = bi * BLOCK_BYTES..bi * BLOCK_BYTES + ob.len();
        let out_aligned = aligned::<H>(ob);
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
            H::group(acc, tmp, o, v, e - s, s == 0, e == n);
        }
        if !out_aligned {
            let s = out_scratch
                .as_deref()
                .expect("scratch for an unaligned block");
            ob.copy_from_slice(&bytemuck::cast_slice::<u64, u8>(s)[..ob.len()]);
        }
    }
}

/// `x = round(f32(x) * s)` for every element.
fn scale_half<H: Half16>(buf: &mut [u8], s: f32) {
    let mut tmp: F32Block = [0.0; BLOCK_BYTES / 2];
    map_typed::<H>(buf, |b| H::scale(b, s, &mut tmp));
}

/// `acc = round(f32(acc) + f32(input))`.
fn add_assign_half<H: Half16>(accb: &mut [u8], input: &[u8]) {
    let mut scratch: [Scratch; 3] = [[0; BLOCK_BYTES / 8]; 3];
    let [old_copy, in_scratch, out_scratch] = &mut scratch;
    with_f32_blocks::<H, _>(false, |acc, tmp| {
        for (bi, ob) in accb.chunks_mut(BLOCK_BYTES).enumerate() {
            let r = bi * BLOCK_BYTES..bi * BLOCK_BYTES + ob.len();
            // The old value is read from a copy, as the block is overwritten in place.
            let old = &mut bytemuck::cast_slice_mut::<u64, u8>(old_copy)[..ob.len()];
            old.copy_from_slice(ob);
            let old: &[H] = bytemuck::cast_slice(old);
            let inp = view::<H>(&input[r], Some(in_scratch));
            let v = [old, inp, &[], &[]];
            if aligned::<H>(ob) {
                H::group(acc, tmp, bytemuck::cast_slice_mut(ob), v, 2, true, true);
            } else {
                let s = &mut bytemuck::cast_slice_mut::<u64, u8>(out_scratch)[..ob.len()];
                H::group(acc, tmp, bytemuck::cast_slice_mut(s), v, 2, true, true);
                ob.copy_from_slice(s);
            }
        }
    });
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

    /// Throughput check (run in release): `cargo test -p bps-runtime --release --lib sum -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_throughput() {
        use std::hint::black_box;
        use std::time::Instant;
        const LEN: usize = 64 << 20;
        let reps = 8;
        let gbs = |bytes: usize, secs: f64| bytes as f64 / secs / 1e9;
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
        let time = |f: &mut dyn FnMut()| {
            f();
            let mut best = f64::INFINITY;
            for _ in 0..reps {
                let t = Instant::now();
                f();
                best = best.min(t.elapsed().as_secs_f64());
            }
            best
        };
        let src = mk(DType::U8, &mut rng);
        let t = time(&mut || out.copy_from_slice(black_box(&src)));
        println!("memcpy          : {:6.2} GB/s", gbs(2 * LEN, t));
        for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64, DType::I32] {
            for w in [2usize, 4, 8] {
                let data: Vec<Vec<u8>> = (0..w).map(|_| mk(dtype, &mut rng)).collect();
                let ins: Vec<&[u8]> = data.iter().map(|v| v.as_slice()).collect();
                let t = time(&mut || sum_into(dtype, &mut out, black_box(&ins)).unwrap());
                println!(
                    "sum {dtype:>4} W={w}    : {:6.2} GB/s",
                    gbs((w + 1) * LEN, t)
                );
            }
        }
        for dtype in [DType::F32, DType::BF16] {
            // Unaligned: every buffer starts one byte into its allocation.
            let data: Vec<Vec<u8>> = (0..2).map(|_| mk(dtype, &mut rng)).collect();
            let ins: Vec<&[u8]> = data.iter().map(|v| &v[1..LEN - 7]).collect();
            let t = time(&mut || sum_into(dtype, &mut out[1..LEN - 7], black_box(&ins)).unwrap());
            println!("sum {dtype:>4} W=2 +1B: {:6.2} GB/s", gbs(3 * (LEN - 8), t));
        }
        let data = mk(DType::F32, &mut rng);
        let t = time(&mut || add_assign(DType::F32, &mut out, &data).unwrap());
        println!("add_assign f32  : {:6.2} GB/s", gbs(2 * LEN, t));
        out.copy_from_slice(&mk(DType::F32, &mut rng));
        let t = time(&mut || scale_div(DType::F32, &mut out, 3).unwrap());
        println!("scale_div f32   : {:6.2} GB/s", gbs(LEN, t));
        out.copy_from_slice(&mk(DType::BF16, &mut rng));
        let t = time(&mut || scale_div(DType::BF16, &mut out, 3).unwrap());
        println!("scale_div bf16  : {:6.2} GB/s", gbs(LEN, t));
    }
}
