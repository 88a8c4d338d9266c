//! The bulk of a large synthetic image: files whose chunks are all different yet compress to
//! almost nothing, so that a 100 GiB image fits in a few GB of registry and disk while a lazy
//! mount still has as many chunks to index as a real one (one per 64 KiB).
//!
//! A file is regions of one average chunk, zero but for their first 4 KiB block: a counter no
//! other region has and, at the block's end, a 64-byte trigger on whose last byte Warren's
//! chunker (FastCDC's gear hash, its parameters) cuts. Cuts fall one region apart, so every
//! chunk but a file's first (a block longer) is exactly one region. The zeros are holes in the
//! source files: a region costs one block of disk. A file ends just before its last trigger's
//! last byte, so that its last chunk holds a counter of its own too.

use std::os::unix::fs::FileExt as _;
use std::path::Path;

use anyhow::bail;
use fastcdc::v2020::{FastCDC, Normalization, get_gear_with_seed, select_masks};
use warren_image::ChunkParams;

/// The block of each region that holds data.
const BLOCK: usize = 4096;
/// The trigger's length: the gear hash's window (each byte shifts the hash by one bit).
const TRIGGER: usize = 64;
/// Where in its block the trigger starts: at the block's end.
const TRIGGER_AT: usize = BLOCK - TRIGGER;

pub(crate) struct CompressibleChunks {
    params: ChunkParams,
    gear: Vec<u64>,
    /// The chunker's masks (a cut where a hash has none of a mask's bits): strict before the
    /// average size, relaxed after.
    masks: [u64; 2],
    /// The mask a trigger's last byte meets: the relaxed one (one region past the last cut).
    trigger_mask: u64,
    trigger: [u8; TRIGGER],
    /// The hash after a run of zeros.
    zeros: u64,
    /// Regions written so far: each one's counter.
    regions: u64,
}

impl CompressibleChunks {
    /// Finds a trigger for Warren's chunk parameters (some tens of thousands of tries).
    pub(crate) fn new() -> anyhow::Result<CompressibleChunks> {
        let params = ChunkParams::default();
        let (mask_s, mask_l) = select_masks(params.avg as usize, Normalization::Level1);
        let mut chunks = CompressibleChunks {
            params,
            gear: get_gear_with_seed(0).0.into_owned(),
            masks: [mask_s, mask_l],
            trigger_mask: mask_l,
            trigger: [0; TRIGGER],
            zeros: 0,
            regions: 0,
        };
        chunks.zeros = chunks.roll(0, &[0; TRIGGER]);
        if chunks.may_cut(chunks.zeros) {
            bail!("zeros make the chunker cut: no filler for these chunk parameters");
        }
        let mut rng = crate::bench::Xorshift(0x5EED_F11E_0000_0001);
        let mut candidate = [0u8; TRIGGER];
        for _ in 0..(64 << 20) {
            rng.fill(&mut candidate);
            let (last, before) = candidate.split_last().expect("not empty");
            let mut hash = chunks.zeros;
            let clean = before.iter().all(|&b| {
                hash = chunks.roll(hash, &[b]);
                !chunks.may_cut(hash)
            });
            if clean && chunks.roll(hash, &[*last]) & chunks.trigger_mask == 0 {
                chunks.trigger = candidate;
                return Ok(chunks);
            }
        }
        bail!("no trigger found for the chunker")
    }

    /// The gear hash after `bytes`, from `hash`.
    fn roll(&self, mut hash: u64, bytes: &[u8]) -> u64 {
        for &b in bytes {
            hash = (hash << 1).wrapping_add(self.gear[b as usize]);
        }
        hash
    }

    /// Whether the chunker may cut on `hash` (under one of its masks).
    fn may_cut(&self, hash: u64) -> bool {
        self.masks.iter().any(|m| hash & m == 0)
    }

    fn region(&self) -> usize {
        self.params.avg as usize
    }

    /// The first block of the next region: its counter, zeros, the trigger. A counter on which
    /// the chunker might cut (one in a few hundred) is skipped.
    fn next_block(&mut self) -> Vec<u8> {
        let mut block = vec![0u8; BLOCK];
        block[TRIGGER_AT..TRIGGER_AT + TRIGGER].copy_from_slice(&self.trigger);
        loop {
            self.regions += 1;
            block[..8].copy_from_slice(&self.regions.to_le_bytes());
            // Until the hash is back to that of zeros, one window past the counter.
            let mut hash = self.zeros;
            if block[..8 + TRIGGER].iter().all(|&b| {
                hash = self.roll(hash, &[b]);
                !self.may_cut(hash)
            }) {
                return block;
            }
        }
    }

    /// Writes `chunks` chunks of filler (at least one) at `path`; the file's size.
    fn write_chunks(&mut self, path: &Path, chunks: u64) -> anyhow::Result<u64> {
        let region = self.region() as u64;
        let chunks = chunks.max(1);
        // The first chunk runs to the second region's trigger; the file ends before the last.
        let size = chunks * region + (TRIGGER_AT + TRIGGER - 1) as u64;
        let file = std::fs::File::create(path)?;
        file.set_len(size)?;
        for r in 0..=chunks {
            let block = self.next_block();
            let at = r * region;
            let keep = (size - at).min(BLOCK as u64) as usize;
            file.write_all_at(&block[..keep], at)?;
        }
        Ok(size)
    }

    /// Writes a file of filler of about `len` bytes (whole chunks) at `path`; its size.
    pub(crate) fn write(&mut self, path: &Path, len: u64) -> anyhow::Result<u64> {
        let chunks = len.div_ceil(self.region() as u64);
        self.write_chunks(path, chunks)
    }

    /// Checks that Warren's chunker cuts a filler file one region per chunk (the first a
    /// block longer), so that the image has the chunk count the benchmark says it has.
    pub(crate) fn check(&mut self, dir: &Path) -> anyhow::Result<()> {
        let (min, avg, max) = (
            self.params.min as usize,
            self.params.avg as usize,
            self.params.max as usize,
        );
        let region = self.region();
        let path = dir.join("filler-check");
        self.write_chunks(&path, 16)?;
        let sample = std::fs::read(&path)?;
        std::fs::remove_file(&path)?;
        let lens: Vec<usize> = FastCDC::new(&sample, min, avg, max)
            .map(|c| c.length)
            .collect();
        let mut want = vec![region; 16];
        want[0] = region + TRIGGER_AT + TRIGGER - 1;
        if lens != want {
            bail!("the filler's chunks are not one region each: {lens:?}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_image::{ImageBuilder, Limits, import_dir};

    /// What the benchmark relies on: Warren's own import makes one chunk per region, no two
    /// alike, and stores them in a sliver of their size.
    #[test]
    fn filler_imports_as_one_distinct_chunk_per_region_that_compresses_away() {
        let src = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        let mut filler = CompressibleChunks::new().unwrap();
        filler.check(work.path()).unwrap();
        let region = ChunkParams::default().avg as u64;
        let tail = (TRIGGER_AT + TRIGGER - 1) as u64;
        let written = filler.write(&src.path().join("a"), 3 << 20).unwrap();
        assert_eq!(written, (3 << 20) + tail);
        // A size between regions rounds up to whole ones.
        let written = filler.write(&src.path().join("b"), region + 1).unwrap();
        assert_eq!(written, 2 * region + tail);

        let mut builder = ImageBuilder::new(work.path(), ChunkParams::default(), Limits::default());
        import_dir(&mut builder, src.path()).unwrap();
        let built = builder.finish().unwrap();
        let regions = (3 << 20) / region + 2;
        assert_eq!(built.index.chunks.len() as u64, regions);
        // Each file's first chunk runs to the second region's trigger.
        let mut lens: Vec<u64> = built
            .index
            .chunks
            .iter()
            .map(|c| u64::from(c.len))
            .collect();
        lens.sort_unstable();
        let mut want = vec![region; regions as usize - 2];
        want.extend([region + tail; 2]);
        assert_eq!(lens, want);
        // Counters the chunker might cut on come along every few hundred: skipped, not stuck
        // on (a 100 GiB image takes 1.6 M of them).
        for _ in 0..100_000 {
            filler.next_block();
        }
        let stored: u64 = built.new_packs.iter().map(|p| p.size).sum();
        assert!(
            stored < regions * 256,
            "{regions} regions stored in {stored} bytes"
        );
    }
}
