//! A read-only FUSE filesystem that serves a Warren image on demand.
//!
//! Metadata (lookup, stat, readdir, readlink, xattrs) is answered from the tree index at once;
//! file data is fetched chunk by chunk on first read through the [`ChunkFetcher`] (host cache
//! first, then merged range requests), with readahead within the file on a miss. The kernel
//! keeps pages across opens (the image never changes), so a second read never reaches us.
//!
//! Around the filesystem: an access-trace recorder ([`trace`]) and the prefetch / background
//! pull that replays a trace and then fills the cache ([`pull`]).

mod fs;
pub mod pull;
pub mod serve;
pub mod trace;

pub use fs::{LazyFs, MountOptions, mount};
