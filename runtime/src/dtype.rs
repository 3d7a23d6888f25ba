//! Element data types of the tensors that workers push and servers sum.
//!
//! A [`DType`] travels on the wire as a single byte ([`DType::to_u8`] /
//! [`DType::from_u8`]) and on the command line / in configuration as a name
//! (`Display` / `FromStr`).

use std::fmt;
use std::str::FromStr;

/// The element type of a gradient buffer.
///
/// The discriminants are the wire encoding and must never change.
#[repr(u8)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 binary32.
    F32 = 0,
    /// IEEE 754 binary64.
    F64 = 1,
    /// IEEE 754 binary16 (half precision).
    F16 = 2,
    /// bfloat16 (the upper 16 bits of a binary32).
    BF16 = 3,
    /// Signed 32-bit integer (two's complement, wrapping arithmetic).
    I32 = 4,
    /// Signed 64-bit integer (two's complement, wrapping arithmetic).
    I64 = 5,
    /// Unsigned 8-bit integer (wrapping arithmetic).
    U8 = 6,
}

impl DType {
    /// Every data type, in wire-code order.
    pub const ALL: [DType; 7] = [
        DType::F32,
        DType::F64,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::I64,
        DType::U8,
    ];

    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
        }
    }

    /// Canonical short name: `"f32"`, `"f64"`, `"f16"`, `"bf16"`, `"i32"`, `"i64"` or `"u8"`.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
        }
    }

    /// Decodes the wire byte; `None` for an unknown code.
    pub const fn from_u8(v: u8) -> Option<DType> {
        Some(match v {
            0 => DType::F32,
            1 => DType::F64,
            2 => DType::F16,
            3 => DType::BF16,
            4 => DType::I32,
            5 => DType::I64,
            6 => DType::U8,
            _ => return None,
        })
    }

    /// Encodes the data type as its wire byte (the inverse of [`DType::from_u8`]).
    pub const fn to_u8(self) -> u8 {
        self as u8
    }

    /// `true` for the floating-point types (f32, f64, f16, bf16).
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// Every accepted spelling, grouped by data type (canonical name first).
const ACCEPTED: [(DType, &[&str]); 7] = [
    (DType::F32, &["f32", "float32", "float"]),
    (DType::F64, &["f64", "float64", "double"]),
    (DType::F16, &["f16", "float16", "half"]),
    (DType::BF16, &["bf16", "bfloat16"]),
    (DType::I32, &["i32", "int32"]),
    (DType::I64, &["i64", "int64"]),
    (DType::U8, &["u8", "uint8"]),
];

/// Error returned when a string does not name a [`DType`].
///
/// Holds the rejected input; its `Display` lists the accepted names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseDTypeError(pub String);

impl fmt::Display for ParseDTypeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown dtype {:?}; expected one of: ", self.0)?;
        for (i, (_, names)) in ACCEPTED.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(&names.join("|"))?;
        }
        Ok(())
    }
}

impl std::error::Error for ParseDTypeError {}

impl FromStr for DType {
    type Err = ParseDTypeError;

    /// Parses a data type name, ignoring ASCII case and surrounding whitespace;
    /// see [`ParseDTypeError`] for the accepted names.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        ACCEPTED
            .iter()
            .find(|(_, names)| names.iter().any(|n| n.eq_ignore_ascii_case(t)))
            .map(|(d, _)| *d)
            .ok_or_else(|| ParseDTypeError(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_names() {
        let sizes = [4, 8, 2, 2, 4, 8, 1];
        let names = ["f32", "f64", "f16", "bf16", "i32", "i64", "u8"];
        for (i, d) in DType::ALL.iter().enumerate() {
            assert_eq!(d.size(), sizes[i]);
            assert_eq!(d.name(), names[i]);
            assert_eq!(d.to_string(), names[i]);
            assert_eq!(d.to_u8() as usize, i);
        }
        assert!(DType::F32.is_float() && DType::F64.is_float());
        assert!(DType::F16.is_float() && DType::BF16.is_float());
        assert!(!DType::I32.is_float() && !DType::I64.is_float() && !DType::U8.is_float());
        assert_eq!(format!("{:>5}", DType::U8), "   u8");
    }

    #[test]
    fn from_u8_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_u8(d as u8), Some(d));
        }
        for v in 7..=u8::MAX {
            assert_eq!(DType::from_u8(v), None);
        }
    }

    #[test]
    fn from_str_round_trip_and_aliases() {
        for d in DType::ALL {
            assert_eq!(d.to_string().parse::<DType>(), Ok(d));
        }
        let aliases = [
            ("float32", DType::F32),
            ("float", DType::F32),
            ("float64", DType::F64),
            ("double", DType::F64),
            ("float16", DType::F16),
            ("half", DType::F16),
            ("bfloat16", DType::BF16),
            ("int32", DType::I32),
            ("int64", DType::I64),
            ("uint8", DType::U8),
            (" bf16\n", DType::BF16),
        ];
        for (s, d) in aliases {
            assert_eq!(s.parse::<DType>(), Ok(d), "{s:?}");
        }
    }

    #[test]
    fn from_str_error_lists_names() {
        let err = "f8".parse::<DType>().unwrap_err();
        assert_eq!(err, ParseDTypeError("f8".into()));
        let msg = err.to_string();
        assert!(msg.contains("\"f8\""), "{msg}");
        for (_, names) in ACCEPTED {
            for n in names {
                assert!(msg.contains(n), "{msg} lacks {n}");
            }
        }
        assert_eq!("F32".parse::<DType>(), Ok(DType::F32));
        assert_eq!("BFloat16".parse::<DType>(), Ok(DType::BF16));
        assert!("".parse::<DType>().is_err());
        assert!("f 32".parse::<DType>().is_err());
        assert!("int8".parse::<DType>().is_err());
    }
}
