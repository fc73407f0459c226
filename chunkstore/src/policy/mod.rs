//! Fetch policies: they only decide *which* units to hand to the fetch path, and never touch
//! the cache files themselves (eviction clears bits and punches holes through the same
//! ordering rules as the rest of the store).

pub mod evict;
pub mod hostlimit;
pub mod prefetch;
pub mod readahead;
