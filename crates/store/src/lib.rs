//! Where Warren images live and how their bytes reach a reader.
//!
//! - [`BlobStore`]: blobs and tagged manifests; [`LocalStore`] (an OCI image layout folder, the
//!   embedded default) and [`RegistryStore`] (any OCI registry).
//! - [`images`]: a Warren image as an OCI artifact (commit, open, copy).
//! - [`ChunkCache`]: the host's verified chunk cache, shared by every image.
//! - [`ChunkFetcher`]: cache first, then merged range requests to the store.
//! - [`WholeFiles`]: large files kept whole beside the cache, for the kernel to read directly.

mod blob;
mod cache;
mod fetch;
pub mod images;
mod local;
pub mod manifest;
mod registry;
mod table;
mod whole;

pub use blob::{
    BlobStore, CONFIG_LIMIT, INDEX_LIMIT, MANIFEST_LIMIT, StoreError, TRACE_LIMIT, Verified,
};
pub use cache::{CacheError, CacheStats, ChunkCache, PinSet};
pub use fetch::{ChunkFetcher, Counters, FetchError, Located};
pub use local::{GcReport, LocalStore};
pub use registry::{
    AddressFilter, FilteringResolver, RegistryRef, RegistryStore, Retry, registry_host,
};
pub use table::{ChunkTable, TableSource};
pub use whole::{HeldCopy, WHOLE_FILE_MIN, WholeFiles};
pub mod oci;
