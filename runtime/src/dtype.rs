//! dtypes (being written)
