//! Which workspace holds which slot. A slot is an index that fixes both the workspace's uid/gid
//! range (`base + slot * 65536`) and its address (`subnet + 2 + slot`), so ranges never overlap
//! and are released, with the address, only when the workspace is deleted.
//!
//! The table is one JSON file, rewritten atomically under an exclusive lock, so concurrent
//! `warren` processes never hand out a slot twice.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::{Error, WorkspaceId};

#[derive(Debug)]
pub(crate) struct Slots {
    table: PathBuf,
    lock: PathBuf,
}

type Table = BTreeMap<u32, WorkspaceId>;

impl Slots {
    pub(crate) fn new(dir: &Path) -> Self {
        Self {
            table: dir.join("slots.json"),
            lock: dir.join("slots.lock"),
        }
    }

    fn locked<T>(
        &self,
        f: impl FnOnce(&mut Table) -> Result<(T, bool), Error>,
    ) -> Result<T, Error> {
        let lock = File::create(&self.lock).map_err(Error::io("cannot create", &self.lock))?;
        lock.lock().map_err(Error::io("cannot lock", &self.lock))?;
        let mut table: Table = match std::fs::read(&self.table) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|cause| Error::Damaged {
                path: self.table.clone(),
                cause,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Table::new(),
            Err(e) => return Err(Error::io("cannot read", &self.table)(e)),
        };
        let (out, changed) = f(&mut table)?;
        if changed {
            let tmp = self.table.with_extension("json.tmp");
            let bytes =
                serde_json::to_vec_pretty(&table).map_err(Error::encode("the slot table"))?;
            std::fs::write(&tmp, bytes).map_err(Error::io("cannot write", &tmp))?;
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(Error::io("cannot sync", &tmp))?;
            std::fs::rename(&tmp, &self.table).map_err(Error::io("cannot replace", &self.table))?;
        }
        Ok(out)
    }

    /// The workspace's slot, allocating the lowest free one below `capacity` if it has none.
    pub(crate) fn allocate(&self, id: &WorkspaceId, capacity: u32) -> Result<u32, Error> {
        self.locked(|table| {
            if let Some((&slot, _)) = table.iter().find(|(_, owner)| *owner == id) {
                return Ok((slot, false));
            }
            let slot = (0..capacity)
                .find(|s| !table.contains_key(s))
                .ok_or(Error::Exhausted(capacity as usize))?;
            table.insert(slot, id.clone());
            Ok((slot, true))
        })
    }

    pub(crate) fn release(&self, id: &WorkspaceId) -> Result<(), Error> {
        self.locked(|table| {
            let before = table.len();
            table.retain(|_, owner| owner != id);
            Ok(((), table.len() != before))
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn slots_are_unique_reused_after_release_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let slots = Slots::new(dir.path());
        let ids: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|s| WorkspaceId::new(s).unwrap())
            .collect();
        assert_eq!(slots.allocate(&ids[0], 3).unwrap(), 0);
        assert_eq!(slots.allocate(&ids[1], 3).unwrap(), 1);
        assert_eq!(
            slots.allocate(&ids[0], 3).unwrap(),
            0,
            "same workspace, same slot"
        );
        slots.release(&ids[0]).unwrap();
        let reopened = Slots::new(dir.path());
        assert_eq!(
            reopened.allocate(&ids[1], 3).unwrap(),
            1,
            "kept across reopening"
        );
        assert_eq!(
            reopened.allocate(&ids[2], 3).unwrap(),
            0,
            "lowest free slot"
        );
        assert_eq!(reopened.allocate(&ids[0], 3).unwrap(), 2);
        let d = WorkspaceId::new("d").unwrap();
        assert!(matches!(reopened.allocate(&d, 3), Err(Error::Exhausted(3))));
    }
}
