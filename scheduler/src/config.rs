//! Scheduling knobs: partition size and credit.

use crate::DEFAULT_PARTITION_BYTES;

/// The default credit in partitions: 4 partitions may be in flight per stage.
pub const DEFAULT_CREDIT_PARTITIONS: u64 = 4;

/// How tensors are cut and how many bytes each stage may have in flight.
///
/// This crate only holds the values; reading them from the environment
/// (`BYTEPS_PARTITION_BYTES`, `BYTEPS_SCHEDULING_CREDIT`) is the runtime's job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SchedulingConfig {
    /// Target chunk size in bytes, before rounding down to whole elements.
    pub partition_bytes: usize,
    /// Most bytes in flight per stage queue; `u64::MAX` turns flow control off.
    pub credit_bytes: u64,
}

impl SchedulingConfig {
    /// A configuration from BytePS's units: `BYTEPS_SCHEDULING_CREDIT` counts partitions in
    /// flight, so the credit in bytes is `credit_partitions * partition_bytes`.
    ///
    /// As in BytePS, a credit of 0 turns flow control off (`credit_bytes = u64::MAX`). A
    /// product too large for a `u64` saturates to `u64::MAX`, which is also unlimited.
    ///
    /// # Examples
    ///
    /// ```
    /// use bps_scheduler::SchedulingConfig;
    ///
    /// let c = SchedulingConfig::from_partition_credit(1 << 20, 8);
    /// assert_eq!(c.credit_bytes, 8 << 20);
    /// assert!(!SchedulingConfig::from_partition_credit(1 << 20, 0).flow_control());
    /// ```
    pub fn from_partition_credit(partition_bytes: usize, credit_partitions: u64) -> Self {
        let credit_bytes = if credit_partitions == 0 {
            u64::MAX
        } else {
            credit_partitions.saturating_mul(partition_bytes as u64)
        };
        SchedulingConfig {
            partition_bytes,
            credit_bytes,
        }
    }

    /// Whether the credit limits anything (`credit_bytes != u64::MAX`).
    pub fn flow_control(&self) -> bool {
        self.credit_bytes != u64::MAX
    }
}

impl Default for SchedulingConfig {
    /// 4 MiB partitions, 4 partitions (16 MiB) in flight.
    fn default() -> Self {
        Self::from_partition_credit(DEFAULT_PARTITION_BYTES, DEFAULT_CREDIT_PARTITIONS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_4_mib_and_16_mib() {
        let c = SchedulingConfig::default();
        assert_eq!(c.partition_bytes, 4 << 20);
        assert_eq!(c.credit_bytes, 16 << 20);
        assert!(c.flow_control());
    }

    #[test]
    fn credit_counts_partitions() {
        let c = SchedulingConfig::from_partition_credit(1000, 3);
        assert_eq!(c.partition_bytes, 1000);
        assert_eq!(c.credit_bytes, 3000);
    }

    #[test]
    fn zero_credit_means_unlimited() {
        let c = SchedulingConfig::from_partition_credit(1000, 0);
        assert_eq!(c.credit_bytes, u64::MAX);
        assert!(!c.flow_control());
    }

    #[test]
    fn overflow_saturates_to_unlimited() {
        let c = SchedulingConfig::from_partition_credit(usize::MAX, u64::MAX);
        assert_eq!(c.credit_bytes, u64::MAX);
    }
}
