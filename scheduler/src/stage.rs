//! The stages a chunk passes through on its way through `push_pull`.

use std::fmt;

/// One stage of the `push_pull` pipeline, in the order a chunk visits them. Each stage has
/// its own [`CreditQueue`](crate::CreditQueue).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// GPUs of one node reduce-scatter the tensor among themselves.
    LocalReduce,
    /// The local shard is copied from the device to a pinned host buffer (or nothing, with
    /// GPUDirect RDMA).
    StageOut,
    /// The shard is written into the owning server's buffer.
    Push,
    /// The server writes the sum back into the worker's result buffer.
    Pull,
    /// The sum is copied from pinned host memory to the device (or nothing, with GPUDirect
    /// RDMA).
    StageIn,
    /// Local GPUs all-gather so each holds the full result.
    LocalGather,
}

impl Stage {
    /// Every stage, in pipeline order.
    pub const ALL: [Stage; 6] = [
        Stage::LocalReduce,
        Stage::StageOut,
        Stage::Push,
        Stage::Pull,
        Stage::StageIn,
        Stage::LocalGather,
    ];

    /// The stage's name as logs and metrics print it, e.g. `"PUSH"`.
    pub const fn name(self) -> &'static str {
        match self {
            Stage::LocalReduce => "LOCAL_REDUCE",
            Stage::StageOut => "STAGE_OUT",
            Stage::Push => "PUSH",
            Stage::Pull => "PULL",
            Stage::StageIn => "STAGE_IN",
            Stage::LocalGather => "LOCAL_GATHER",
        }
    }

    /// The stage after this one, or `None` after the last.
    pub fn next(self) -> Option<Stage> {
        let i = Stage::ALL.iter().position(|&s| s == self)?;
        Stage::ALL.get(i + 1).copied()
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_pipeline_order_and_sorted() {
        let mut sorted = Stage::ALL;
        sorted.sort();
        assert_eq!(sorted, Stage::ALL);
        let mut s = Some(Stage::ALL[0]);
        let mut walked = Vec::new();
        while let Some(stage) = s {
            walked.push(stage);
            s = stage.next();
        }
        assert_eq!(walked, Stage::ALL);
    }

    #[test]
    fn names_are_distinct() {
        let names: Vec<&str> = Stage::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            [
                "LOCAL_REDUCE",
                "STAGE_OUT",
                "PUSH",
                "PULL",
                "STAGE_IN",
                "LOCAL_GATHER"
            ]
        );
        assert_eq!(Stage::Push.to_string(), "PUSH");
    }
}
