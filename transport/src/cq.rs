//! completion queue (being written)
