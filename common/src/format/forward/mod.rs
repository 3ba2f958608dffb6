//! What a forward-only stream needs to convert formats laid out for random access: data
//! read ahead of the tables that map it (`held`), reads by host offset over a stream
//! (`hostread`), and a bounded pool that decodes compressed units in parallel
//! (`decode_pool`).

pub mod decode_pool;
pub mod held;
pub mod hostread;
