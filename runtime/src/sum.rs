//! sums (being written)
