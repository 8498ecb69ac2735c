//! The per-step token -> adapter map (`LoraBatch`): built once per engine step from the
//! slot of each token, shared read-only by every layer and LoRA site of that step.
//!
//! Invariants: `sorted_tokens` lists every (token, adapter) entry exactly once, ordered by
//! slot and, within a slot, by token index (a stable sort); `segments` are the maximal runs
//! of one slot in that order, non-empty, in increasing slot order, and together cover
//! `sorted_tokens` exactly, so there is one segment per distinct slot. Tokens without an
//! adapter (slot -1) appear in neither.
//!
//! Adapter mixtures: each token owns a CSR row of `(slot, weight)` entries
//! (`entry_starts`, `entry_slots`, `entry_weights`). [`LoraBatch::new`] gives a token at
//! most one entry, of weight 1.0; [`LoraBatch::from_weighted`] gives a mixture token
//! several: the token then appears once per entry in `sorted_tokens` (in the segment of
//! each of its slots), `sorted_weights` carries each entry's weight (the kernels multiply
//! it into the adapter's scale), and [`LoraBatch::max_entries_per_token`] becomes > 1,
//! which tells the kernels that two segments may write the same output row (the CPU
//! kernel then adds on one thread). `slots()` returns the first entry's slot.

/// A run of `len` entries of `sorted_tokens`, from `start`, that share adapter `slot`: the
/// unit of SGMV (segmented gather matrix-vector) work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub slot: u32,
    pub start: u32,
    pub len: u32,
}

impl Segment {
    /// The range of `sorted_tokens` (and `sorted_weights`) this segment covers.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.start as usize..(self.start + self.len) as usize
    }

    /// This segment cut into pieces of at most `tile` tokens (same slot, consecutive
    /// ranges, in order): one unit of parallel work each in a kernel that gives every
    /// segment its own thread blocks.
    pub fn tiles(self, tile: u32) -> impl Iterator<Item = Segment> {
        let tile = tile.max(1);
        (0..self.len.div_ceil(tile)).map(move |k| Segment {
            slot: self.slot,
            start: self.start + k * tile,
            len: tile.min(self.len - k * tile),
        })
    }
}

/// Token -> adapter metadata of one step. Indices are `u32`: a step has far fewer than
/// 2^32 tokens.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoraBatch {
    /// `slots[t]`: the (first) adapter slot of token t, or -1.
    slots: Vec<i32>,
    /// CSR row starts, `num_tokens + 1` long: token t owns entries
    /// `entry_starts[t]..entry_starts[t + 1]`.
    entry_starts: Vec<u32>,
    entry_slots: Vec<u32>,
    entry_weights: Vec<f32>,
    /// Token of each entry, sorted by (slot, token).
    sorted_tokens: Vec<u32>,
    /// Weight of each entry, in `sorted_tokens` order.
    sorted_weights: Vec<f32>,
    segments: Vec<Segment>,
    max_entries_per_token: u32,
}

impl LoraBatch {
    /// `slots[t]` is the adapter slot of token t, or -1 for none (any negative value is
    /// read as none). Tokens of one sequence are contiguous in the batch.
    pub fn new(slots: &[i32]) -> Self {
        let mut entry_starts = Vec::with_capacity(slots.len() + 1);
        let mut entry_slots = Vec::with_capacity(slots.len());
        entry_starts.push(0);
        for &s in slots {
            if s >= 0 {
                entry_slots.push(s as u32);
            }
            entry_starts.push(entry_slots.len() as u32);
        }
        let entry_weights = vec![1.0; entry_slots.len()];
        let slots = slots.iter().map(|&s| s.max(-1)).collect();
        Self::from_csr(slots, entry_starts, entry_slots, entry_weights)
    }

    /// A batch where token t carries the weighted adapters `entries[t]` (a mixture;
    /// see the module docs).
    pub fn from_weighted(entries: &[Vec<(u32, f32)>]) -> Self {
        let mut entry_starts = vec![0];
        let (mut entry_slots, mut entry_weights) = (Vec::new(), Vec::new());
        for row in entries {
            for &(s, w) in row {
                entry_slots.push(s);
                entry_weights.push(w);
            }
            entry_starts.push(entry_slots.len() as u32);
        }
        let slots = entries
            .iter()
            .map(|row| row.first().map_or(-1, |&(s, _)| s as i32))
            .collect();
        Self::from_csr(slots, entry_starts, entry_slots, entry_weights)
    }

    fn from_csr(
        slots: Vec<i32>,
        entry_starts: Vec<u32>,
        entry_slots: Vec<u32>,
        entry_weights: Vec<f32>,
    ) -> Self {
        // (slot, token, entry) for every entry; sorting by (slot, token) is stable.
        let mut order: Vec<(u32, u32, u32)> = Vec::with_capacity(entry_slots.len());
        let mut max_entries_per_token = 0;
        for (t, w) in entry_starts.windows(2).enumerate() {
            max_entries_per_token = max_entries_per_token.max(w[1] - w[0]);
            for e in w[0]..w[1] {
                order.push((entry_slots[e as usize], t as u32, e));
            }
        }
        order.sort_unstable_by_key(|&(s, t, _)| (s, t));
        let sorted_tokens = order.iter().map(|&(_, t, _)| t).collect();
        let sorted_weights = order
            .iter()
            .map(|&(_, _, e)| entry_weights[e as usize])
            .collect();
        let mut segments: Vec<Segment> = Vec::new();
        for (i, &(slot, _, _)) in order.iter().enumerate() {
            match segments.last_mut() {
                Some(seg) if seg.slot == slot => seg.len += 1,
                _ => segments.push(Segment {
                    slot,
                    start: i as u32,
                    len: 1,
                }),
            }
        }
        Self {
            slots,
            entry_starts,
            entry_slots,
            entry_weights,
            sorted_tokens,
            sorted_weights,
            segments,
            max_entries_per_token,
        }
    }

    /// Tokens in the step, with or without an adapter.
    pub fn num_tokens(&self) -> usize {
        self.slots.len()
    }

    /// True when no token has an adapter: the kernels return at once.
    pub fn is_empty(&self) -> bool {
        self.sorted_tokens.is_empty()
    }

    /// Runs of `sorted_tokens` sharing one slot, in increasing slot order.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Token indices of the adapter entries, sorted by slot (stable).
    pub fn sorted_tokens(&self) -> &[u32] {
        &self.sorted_tokens
    }

    /// The weight of each entry of `sorted_tokens` (1.0 today).
    pub fn sorted_weights(&self) -> &[f32] {
        &self.sorted_weights
    }

    /// The slot map this batch was built from (-1: no adapter).
    pub fn slots(&self) -> &[i32] {
        &self.slots
    }

    /// The `(slot, weight)` entries of token `t` (empty for a token without an adapter).
    pub fn token_entries(&self, t: usize) -> impl Iterator<Item = (u32, f32)> + '_ {
        let range = match (self.entry_starts.get(t), self.entry_starts.get(t + 1)) {
            (Some(&a), Some(&b)) => a as usize..b as usize,
            _ => 0..0,
        };
        self.entry_slots[range.clone()]
            .iter()
            .copied()
            .zip(self.entry_weights[range].iter().copied())
    }

    /// The most adapter entries any one token has: 0 or 1 today (see the module docs).
    pub fn max_entries_per_token(&self) -> usize {
        self.max_entries_per_token as usize
    }

    /// Number of adapter entries (the length of `sorted_tokens`).
    pub fn num_entries(&self) -> usize {
        self.sorted_tokens.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_a_segment_in_order() {
        let seg = |slot, start, len| Segment { slot, start, len };
        let tiles: Vec<Segment> = [seg(3, 0, 20), seg(1, 20, 8), seg(0, 28, 2)]
            .into_iter()
            .flat_map(|s| s.tiles(8))
            .collect();
        assert_eq!(
            tiles,
            [
                seg(3, 0, 8),
                seg(3, 8, 8),
                seg(3, 16, 4),
                seg(1, 20, 8),
                seg(0, 28, 2)
            ]
        );
        assert_eq!(seg(0, 5, 0).tiles(8).count(), 0);
    }

    #[test]
    fn segments_sort_stably_by_slot() {
        let b = LoraBatch::new(&[2, 2, -1, 0, 2, -1, 0, 5]);
        assert_eq!(b.num_tokens(), 8);
        assert!(!b.is_empty());
        assert_eq!(b.sorted_tokens(), &[3, 6, 0, 1, 4, 7]);
        assert_eq!(
            b.segments(),
            &[
                Segment {
                    slot: 0,
                    start: 0,
                    len: 2
                },
                Segment {
                    slot: 2,
                    start: 2,
                    len: 3
                },
                Segment {
                    slot: 5,
                    start: 5,
                    len: 1
                },
            ]
        );
        assert_eq!(b.sorted_weights(), &[1.0; 6]);
        assert_eq!(b.max_entries_per_token(), 1);
        assert_eq!(b.token_entries(4).collect::<Vec<_>>(), vec![(2, 1.0)]);
        assert_eq!(b.token_entries(2).count(), 0);
        assert_eq!(b.token_entries(99).count(), 0);
    }

    #[test]
    fn no_adapter_tokens_is_empty() {
        for slots in [&[][..], &[-1, -1, -1][..]] {
            let b = LoraBatch::new(slots);
            assert!(b.is_empty());
            assert!(b.segments().is_empty());
            assert_eq!(b.num_tokens(), slots.len());
            assert_eq!(b.max_entries_per_token(), 0);
        }
    }

    #[test]
    fn weighted_entries_repeat_tokens_across_segments() {
        let b = LoraBatch::from_weighted(&[vec![(1, 0.5), (0, 0.5)], vec![], vec![(1, 1.0)]]);
        assert_eq!(b.slots(), &[1, -1, 1]);
        assert_eq!(b.sorted_tokens(), &[0, 0, 2]);
        assert_eq!(b.sorted_weights(), &[0.5, 0.5, 1.0]);
        assert_eq!(b.segments().len(), 2);
        assert_eq!(b.max_entries_per_token(), 2);
    }
}
