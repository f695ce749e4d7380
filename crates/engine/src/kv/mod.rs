//! The paged KV cache: a pool of fixed-size blocks per layer, a reference-counted block
//! allocator, and per-sequence block tables.
//!
//! The cache is owned by the engine and handed to the model's `forward` together with each
//! sequence's [`SeqCache`] (its block table), so the model holds no per-request state. Blocks
//! that are full are immutable and may be shared between sequences (beam forks, prefix reuse);
//! a shared block is copied before it is written (copy on write).

use candle_core::{DType, Device, Tensor};

use crate::error::{EngineError, Result};

/// Reference-counted allocator over block ids `0..num_blocks`.
#[derive(Debug)]
pub struct BlockAllocator {
    free: Vec<u32>,
    refs: Vec<u32>,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize) -> Self {
        BlockAllocator { free: (0..num_blocks as u32).rev().collect(), refs: vec![0; num_blocks] }
    }
    /// Take a free block (reference count 1), or `None` when the pool is exhausted.
    pub fn allocate(&mut self) -> Option<u32> {
        let b = self.free.pop()?;
        self.refs[b as usize] = 1;
        Some(b)
    }
    /// Add a reference to a block in use.
    pub fn retain(&mut self, b: u32) {
        debug_assert!(self.refs[b as usize] > 0, "retain of a free block is a bug");
        self.refs[b as usize] += 1;
    }
    /// Drop a reference; the block returns to the pool when none remain.
    pub fn release(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        debug_assert!(*r > 0, "double release of block {b} is a bug");
        *r = r.saturating_sub(1);
        if *r == 0 {
            self.free.push(b);
        }
    }
    pub fn ref_count(&self, b: u32) -> u32 {
        self.refs[b as usize]
    }
    pub fn num_free(&self) -> usize {
        self.free.len()
    }
    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }
}

/// One sequence's view of the cache: the blocks holding its positions `0..len`.
#[derive(Debug, Default, Clone)]
pub struct SeqCache {
    pub blocks: Vec<u32>,
    /// Number of positions whose K/V are stored.
    pub len: usize,
}

/// The KV cache is out of blocks: the caller must wait, preempt or refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfBlocks {
    pub needed: usize,
    pub free: usize,
}

/// Geometry of the cache.
#[derive(Debug, Clone, Copy)]
pub struct KvCacheConfig {
    /// Tokens per block.
    pub block_size: usize,
    pub num_blocks: usize,
}

/// Per-layer K and V pools `[num_blocks * block_size, kv_heads, head_dim]` plus the allocator.
pub struct KvCache {
    pub(crate) k: Vec<Tensor>,
    pub(crate) v: Vec<Tensor>,
    block_size: usize,
    alloc: BlockAllocator,
    /// On CUDA with Silica's kernels, copy-on-write copies `(src, dst)` wait here and run as one
    /// kernel for every layer's pools before the next forward ([`flush_copies`](Self::flush_copies)):
    /// a beam step forks several beams, and copying block by block cost two candle ops per pool
    /// and layer (~110 per copy on a 28-layer model).
    pending: Vec<(u32, u32)>,
    batch_copies: bool,
}

/// Asks Linux for 2 MB pages under a CPU pool (`madvise(MADV_HUGEPAGE)`; transparent huge
/// pages in `madvise` or `always` mode grant them as the still untouched zero pages are first
/// written): the CPU attention reads K and V rows scattered over the pool, and in 4 KB pages
/// a row at 600 positions costs a TLB miss each (one attention task 150–168 µs, 99–123 µs in
/// 2 MB pages; docs/benchmarks.md, CPU fourth pass). Only advice: the contents do not change,
/// and where it is refused the pool keeps 4 KB pages.
fn advise_huge_pages(pool: &Tensor) {
    #[cfg(target_os = "linux")]
    {
        use candle_core::{CpuStorage, Storage};
        const HUGE: usize = crate::device::HUGE_PAGE;
        let (storage, _) = pool.storage_and_layout();
        let (ptr, bytes) = match &*storage {
            Storage::Cpu(CpuStorage::F32(v)) => (v.as_ptr() as usize, std::mem::size_of_val(v.as_slice())),
            Storage::Cpu(CpuStorage::F16(v)) => (v.as_ptr() as usize, std::mem::size_of_val(v.as_slice())),
            Storage::Cpu(CpuStorage::BF16(v)) => (v.as_ptr() as usize, std::mem::size_of_val(v.as_slice())),
            _ => return,
        };
        // The whole 2 MB pages inside the buffer.
        let (start, end) = (ptr.next_multiple_of(HUGE), (ptr + bytes) / HUGE * HUGE);
        if end <= start {
            return;
        }
        // SAFETY: the range lies inside the pool's live allocation, which the tensor keeps;
        // MADV_HUGEPAGE changes how its pages are backed, never what they hold.
        let rc = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "no huge pages for a KV pool; it keeps 4 KB pages");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = pool;
}

impl KvCache {
    pub fn new(
        cfg: KvCacheConfig,
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if cfg.block_size == 0 || cfg.num_blocks == 0 {
            return Err(EngineError::Config(format!(
                "KV cache needs a positive block size and block count, got {cfg:?}"
            )));
        }
        let slots = cfg.num_blocks * cfg.block_size;
        let mut k = Vec::with_capacity(num_layers);
        let mut v = Vec::with_capacity(num_layers);
        for _ in 0..num_layers {
            for pools in [&mut k, &mut v] {
                let pool = Tensor::zeros((slots, kv_heads, head_dim), dtype, device)?;
                advise_huge_pages(&pool);
                pools.push(pool);
            }
        }
        let batch_copies = crate::model::fused::copy_blocks_applies(device, dtype, kv_heads * head_dim);
        Ok(KvCache {
            k,
            v,
            block_size: cfg.block_size,
            alloc: BlockAllocator::new(cfg.num_blocks),
            pending: Vec::new(),
            batch_copies,
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn num_free_blocks(&self) -> usize {
        self.alloc.num_free()
    }
    pub fn num_blocks(&self) -> usize {
        self.alloc.num_blocks()
    }
    pub fn allocator(&self) -> &BlockAllocator {
        &self.alloc
    }

    /// Blocks needed to hold `len` positions.
    pub fn blocks_for(&self, len: usize) -> usize {
        len.div_ceil(self.block_size)
    }

    /// Blocks a sequence would need to take from the pool to grow to `new_len` positions,
    /// counting the copy of a shared partial last block.
    pub fn blocks_needed(&self, seq: &SeqCache, new_len: usize) -> usize {
        let grow = self.blocks_for(new_len).saturating_sub(seq.blocks.len());
        grow + usize::from(self.needs_cow(seq, new_len))
    }

    fn needs_cow(&self, seq: &SeqCache, new_len: usize) -> bool {
        new_len > seq.len
            && seq.len % self.block_size != 0
            && seq
                .blocks
                .get(seq.len / self.block_size)
                .is_some_and(|&b| self.alloc.ref_count(b) > 1)
    }

    /// Make room for positions `seq.len..new_len`: allocate blocks, and copy a shared partial
    /// last block first (copy on write). All or nothing: on `OutOfBlocks` nothing changed.
    pub fn reserve(&mut self, seq: &mut SeqCache, new_len: usize) -> std::result::Result<(), ReserveError> {
        let needed = self.blocks_needed(seq, new_len);
        if needed > self.alloc.num_free() {
            return Err(ReserveError::OutOfBlocks(OutOfBlocks { needed, free: self.alloc.num_free() }));
        }
        if self.needs_cow(seq, new_len) {
            let i = seq.len / self.block_size;
            let old = seq.blocks[i];
            let new = self.alloc.allocate().expect("free blocks were counted above");
            self.copy_block(old, new).map_err(ReserveError::Tensor)?;
            self.alloc.release(old);
            seq.blocks[i] = new;
        }
        while seq.blocks.len() < self.blocks_for(new_len) {
            seq.blocks.push(self.alloc.allocate().expect("free blocks were counted above"));
        }
        Ok(())
    }

    /// A new sequence sharing all of `seq`'s blocks (beam fork). Writes to the shared partial
    /// block are copied on write by [`reserve`](Self::reserve).
    pub fn fork(&mut self, seq: &SeqCache) -> SeqCache {
        for &b in &seq.blocks {
            self.alloc.retain(b);
        }
        seq.clone()
    }

    /// A free block, now in use (one reference), or `None` when the pool has none free.
    pub fn allocate_block(&mut self) -> Option<u32> {
        self.alloc.allocate()
    }

    /// Every layer's K pools, then every layer's V pools (what [`flush_copies`](Self::flush_copies) copies in).
    pub(crate) fn pools(&self) -> impl Iterator<Item = &Tensor> {
        self.k.iter().chain(self.v.iter())
    }

    /// Whether block copies run as one kernel on the device ([`crate::model::fused::copy_blocks_applies`]).
    pub(crate) fn copies_on_device(&self) -> bool {
        self.batch_copies
    }

    /// Add a reference to a block in use (prefix cache, forks).
    pub fn retain_block(&mut self, b: u32) {
        self.alloc.retain(b);
    }
    /// Drop a reference taken with [`retain_block`](Self::retain_block).
    pub fn release_block(&mut self, b: u32) {
        self.alloc.release(b);
    }

    /// Return a sequence's blocks to the pool.
    pub fn free(&mut self, seq: &mut SeqCache) {
        for b in seq.blocks.drain(..) {
            self.alloc.release(b);
        }
        seq.len = 0;
    }

    /// Drop positions at and after `len` (blocks no longer needed are released).
    pub fn truncate(&mut self, seq: &mut SeqCache, len: usize) {
        let keep = self.blocks_for(len);
        for b in seq.blocks.drain(keep.min(seq.blocks.len())..) {
            self.alloc.release(b);
        }
        seq.len = seq.len.min(len);
    }

    fn copy_block(&mut self, src: u32, dst: u32) -> candle_core::Result<()> {
        if self.batch_copies {
            // Copies of one flush run in parallel: one touching a block of another waits.
            if self.pending.iter().any(|&(s, d)| d == src || d == dst || s == dst) {
                self.flush_copies()?;
            }
            self.pending.push((src, dst));
            return Ok(());
        }
        let bs = self.block_size;
        for pool in self.k.iter().chain(self.v.iter()) {
            let data = pool.narrow(0, src as usize * bs, bs)?.copy()?;
            pool.slice_set(&data, 0, dst as usize * bs)?;
        }
        Ok(())
    }

    /// Runs the copy-on-write copies still waiting (see `pending`); the model calls it before
    /// it reads or writes the pools.
    pub fn flush_copies(&mut self) -> candle_core::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pools: Vec<&Tensor> = self.pools().collect();
        crate::model::fused::copy_blocks(&pools, &self.pending, self.block_size)?;
        self.pending.clear();
        Ok(())
    }

    /// The cache slot of position `pos` of a sequence.
    pub fn slot(&self, seq: &SeqCache, pos: usize) -> usize {
        seq.blocks[pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }
}

/// Why [`KvCache::reserve`] failed.
#[derive(Debug)]
pub enum ReserveError {
    OutOfBlocks(OutOfBlocks),
    Tensor(candle_core::Error),
}

impl From<ReserveError> for EngineError {
    fn from(e: ReserveError) -> Self {
        match e {
            ReserveError::OutOfBlocks(o) => EngineError::Config(format!(
                "KV cache exhausted: {} blocks needed, {} free (raise the KV cache size)",
                o.needed, o.free
            )),
            ReserveError::Tensor(e) => EngineError::Candle(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(num_blocks: usize) -> KvCache {
        KvCache::new(KvCacheConfig { block_size: 4, num_blocks }, 1, 1, 2, DType::F32, &Device::Cpu)
            .unwrap()
    }

    #[test]
    fn reserve_allocates_and_free_returns_blocks() {
        let mut kv = cache(4);
        let mut s = SeqCache::default();
        kv.reserve(&mut s, 9).unwrap();
        assert_eq!(s.blocks.len(), 3);
        assert_eq!(kv.num_free_blocks(), 1);
        let err = kv.reserve(&mut s, 17).unwrap_err();
        assert!(matches!(err, ReserveError::OutOfBlocks(OutOfBlocks { needed: 2, free: 1 })));
        assert_eq!(s.blocks.len(), 3, "failed reserve changes nothing");
        kv.free(&mut s);
        assert_eq!(kv.num_free_blocks(), 4);
    }

    #[test]
    fn fork_shares_blocks_and_copies_partial_block_on_write() {
        let mut kv = cache(8);
        let mut a = SeqCache::default();
        kv.reserve(&mut a, 6).unwrap();
        a.len = 6;
        // Write recognisable values into a's second block (slots of positions 4 and 5).
        let b1 = a.blocks[1] as usize;
        let vals = Tensor::new(&[[[1f32, 2.]], [[3., 4.]]], &Device::Cpu).unwrap();
        kv.k[0].slice_set(&vals, 0, b1 * 4).unwrap();
        let mut b = kv.fork(&a);
        assert_eq!(kv.allocator().ref_count(a.blocks[0]), 2);
        assert_eq!(kv.blocks_needed(&b, 7), 1, "partial shared block must be copied");
        kv.reserve(&mut b, 7).unwrap();
        assert_eq!(b.blocks[0], a.blocks[0], "full block stays shared");
        assert_ne!(b.blocks[1], a.blocks[1], "partial block copied on write");
        assert_eq!(kv.allocator().ref_count(a.blocks[1]), 1);
        let copied = kv.k[0].narrow(0, b.blocks[1] as usize * 4, 2).unwrap();
        assert_eq!(copied.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![1., 2., 3., 4.]);
        kv.free(&mut a);
        kv.free(&mut b);
        assert_eq!(kv.num_free_blocks(), 8);
    }

    #[test]
    fn truncate_releases_tail_blocks() {
        let mut kv = cache(4);
        let mut s = SeqCache::default();
        kv.reserve(&mut s, 12).unwrap();
        s.len = 12;
        kv.truncate(&mut s, 5);
        assert_eq!((s.blocks.len(), s.len), (2, 5));
        assert_eq!(kv.num_free_blocks(), 2);
    }
}
