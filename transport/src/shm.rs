//! shm rings (being written)
