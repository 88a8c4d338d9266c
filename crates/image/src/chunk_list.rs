//! A file's chunks: positions in its image's chunk table, in file order, kept as runs of
//! consecutive positions. A file's new chunks are numbered in the order they are cut, so a
//! file is mostly one run: a 100 GiB image's 1.6 M chunk positions are a few thousand runs
//! (8 bytes a run instead of 4 a chunk). A list of scattered or repeated positions (chunks
//! shared with other files, out of order; a file of zeros) costs 8 bytes per chunk. Decoding
//! may be held to a budget of positions ([`with_budget`]): an index is a tenant's.
//!
//! Encoded as the plain sequence of positions, or, in a paged index's tree, as differences
//! from the position before ([`DeltaCoded`]); both decode straight into runs.

use std::cell::Cell;

use serde::de::{SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Default, PartialEq, Eq)]
pub struct ChunkList {
    runs: Vec<Run>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    first: u32,
    /// Chunks in the list up to the end of this run.
    end: u32,
}

impl ChunkList {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.runs.last().map_or(0, |r| r.end as usize)
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Appends the chunk at table position `c`.
    ///
    /// # Panics
    /// Past 2^32 - 1 chunks in one list (a file of 256 TiB at the smallest chunk size).
    pub fn push(&mut self, c: u32) {
        let end = u32::try_from(self.len() + 1).expect("fewer than 2^32 chunks in a file");
        let start = self.start_of(self.runs.len().saturating_sub(1));
        if let Some(last) = self.runs.last_mut()
            && last.first.checked_add(last.end - start) == Some(c)
        {
            last.end = end;
        } else {
            self.runs.push(Run { first: c, end });
        }
    }

    pub fn clear(&mut self) {
        self.runs.clear();
    }

    /// Where run `i` starts in the list.
    fn start_of(&self, i: usize) -> u32 {
        i.checked_sub(1).map_or(0, |p| self.runs[p].end)
    }

    /// The table position of the list's `i`th chunk.
    pub fn get(&self, i: usize) -> Option<u32> {
        let run = self.runs.partition_point(|r| (r.end as usize) <= i);
        let r = self.runs.get(run)?;
        Some(r.first + (i as u32 - self.start_of(run)))
    }

    /// The table positions, in file order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + Clone + '_ {
        self.runs.iter().enumerate().flat_map(move |(i, r)| {
            let count = r.end - self.start_of(i);
            r.first..=r.first + (count - 1)
        })
    }

    /// The table positions of the list's chunks `range` (clamped to the list).
    pub fn range(&self, range: std::ops::Range<usize>) -> impl Iterator<Item = u32> + '_ {
        let end = range.end.min(self.len());
        let start = range.start.min(end);
        let run = self.runs.partition_point(|r| (r.end as usize) <= start);
        let mut skip = start - self.start_of(run) as usize;
        self.runs[run..]
            .iter()
            .enumerate()
            .flat_map(move |(k, r)| {
                let count = r.end - self.start_of(run + k);
                let from = std::mem::take(&mut skip) as u32;
                r.first + from..=r.first + (count - 1)
            })
            .take(end - start)
    }

    /// The highest position in the list.
    pub fn max(&self) -> Option<u32> {
        (0..self.runs.len())
            .map(|i| self.runs[i].first + (self.runs[i].end - self.start_of(i) - 1))
            .max()
    }

    /// The positions as a vector.
    pub fn to_vec(&self) -> Vec<u32> {
        self.iter().collect()
    }

    /// The runs held (what the list costs: 8 bytes each).
    pub fn runs(&self) -> usize {
        self.runs.len()
    }
}

impl std::fmt::Debug for ChunkList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl FromIterator<u32> for ChunkList {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        let mut list = ChunkList::new();
        for c in iter {
            list.push(c);
        }
        list
    }
}

impl<const N: usize> From<[u32; N]> for ChunkList {
    fn from(chunks: [u32; N]) -> Self {
        chunks.into_iter().collect()
    }
}

impl From<Vec<u32>> for ChunkList {
    fn from(chunks: Vec<u32>) -> Self {
        chunks.into_iter().collect()
    }
}

/// Serializes `items` (the `len` positions of a list) as a sequence of its known length.
fn seq<S: Serializer>(
    s: S,
    len: usize,
    items: impl Iterator<Item = u32>,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq as _;
    let mut seq = s.serialize_seq(Some(len))?;
    for c in items {
        seq.serialize_element(&c)?;
    }
    seq.end()
}

impl Serialize for ChunkList {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        seq(s, self.len(), self.iter())
    }
}

impl<'de> Deserialize<'de> for ChunkList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_seq(ListVisitor { delta: false })
    }
}

/// A chunk list encoded as differences from the position before (the first from 0): a run of
/// new chunks is a run of 1s, a byte each before compression.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeltaCoded(pub ChunkList);

impl Serialize for DeltaCoded {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut prev = 0u32;
        seq(
            s,
            self.0.len(),
            self.0.iter().map(|c| {
                let delta = c.wrapping_sub(prev);
                prev = c;
                delta
            }),
        )
    }
}

impl<'de> Deserialize<'de> for DeltaCoded {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_seq(ListVisitor { delta: true })
            .map(DeltaCoded)
    }
}

struct ListVisitor {
    delta: bool,
}

thread_local! {
    /// The chunk positions lists decoded on this thread may still hold (`None`: no limit).
    static BUDGET: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Runs `decode` allowing at most `positions` chunk positions in all the lists it decodes on
/// this thread: a small compressed index must not make its reader allocate without bound.
pub(crate) fn with_budget<T>(positions: u64, decode: impl FnOnce() -> T) -> T {
    let before = BUDGET.replace(Some(positions));
    let out = decode();
    BUDGET.set(before);
    out
}

impl<'de> Visitor<'de> for ListVisitor {
    type Value = ChunkList;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a sequence of chunk positions")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ChunkList, A::Error> {
        let mut list = ChunkList::new();
        let mut prev = 0u32;
        while let Some(c) = seq.next_element::<u32>()? {
            if let Some(left) = BUDGET.get() {
                let Some(left) = left.checked_sub(1) else {
                    return Err(serde::de::Error::custom("too many chunk positions"));
                };
                BUDGET.set(Some(left));
            }
            let c = if self.delta { c.wrapping_add(prev) } else { c };
            prev = c;
            if list.len() == u32::MAX as usize {
                return Err(serde::de::Error::custom(
                    "more than 2^32 - 1 chunks in a file",
                ));
            }
            list.push(c);
        }
        Ok(list)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_list_reads_back_as_pushed_in_runs() {
        let chunks = vec![7, 8, 9, 10, 3, 3, 4, 5000, 5001, 0, u32::MAX, 0, 1];
        let list: ChunkList = chunks.iter().copied().collect();
        assert_eq!(list.to_vec(), chunks);
        assert_eq!(list.len(), chunks.len());
        // 7..=10, 3, 3..=4, 5000..=5001, 0, MAX, 0..=1
        assert_eq!(list.runs(), 7);
        for (i, &c) in chunks.iter().enumerate() {
            assert_eq!(list.get(i), Some(c), "{i}");
        }
        assert_eq!(list.get(chunks.len()), None);
        for start in 0..=chunks.len() + 1 {
            for end in start..=chunks.len() + 2 {
                let want: Vec<u32> = chunks
                    .get(start.min(chunks.len())..end.min(chunks.len()))
                    .unwrap_or_default()
                    .to_vec();
                assert_eq!(
                    list.range(start..end).collect::<Vec<_>>(),
                    want,
                    "{start}..{end}"
                );
            }
        }
        assert_eq!(list.max(), Some(u32::MAX));
        assert_eq!(ChunkList::new().max(), None);
        let new: ChunkList = (100..100_000).collect();
        assert_eq!(new.runs(), 1);
        assert_eq!(new.get(50_000), Some(50_100));
    }

    #[test]
    fn both_encodings_decode_to_the_list() {
        let list: ChunkList = [7, 8, 9, 3, 3, 0, 4_000_000_000, 1].into();
        let plain = postcard::to_stdvec(&list).unwrap();
        assert_eq!(postcard::from_bytes::<ChunkList>(&plain).unwrap(), list);
        // The plain form is the sequence of positions (what the first index format holds).
        assert_eq!(plain, postcard::to_stdvec(&list.to_vec()).unwrap());
        let delta = postcard::to_stdvec(&DeltaCoded(list.clone())).unwrap();
        assert_eq!(postcard::from_bytes::<DeltaCoded>(&delta).unwrap().0, list);
        // Held to a budget of positions across lists, both encodings.
        let three: ChunkList = [1, 2, 3].into();
        let pair = postcard::to_stdvec(&(three.clone(), three.clone())).unwrap();
        assert!(with_budget(5, || postcard::from_bytes::<(ChunkList, ChunkList)>(&pair)).is_err());
        assert!(with_budget(6, || postcard::from_bytes::<(ChunkList, ChunkList)>(&pair)).is_ok());
        let delta = postcard::to_stdvec(&DeltaCoded(three)).unwrap();
        assert!(with_budget(2, || postcard::from_bytes::<DeltaCoded>(&delta)).is_err());
        let run: ChunkList = (1000..2000).collect();
        // A run of new chunks: a byte each (the count's two bytes and the first's two).
        assert_eq!(
            postcard::to_stdvec(&DeltaCoded(run)).unwrap().len(),
            2 + 2 + 999
        );
    }
}
