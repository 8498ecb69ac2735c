//! The ragged batch of one engine step: every scheduled token of every sequence, with
//! the per-sequence chunk boundaries attention needs and the rows whose logits are wanted.

/// Token ids from here on are virtual tokens: `VIRTUAL_TOKEN_BASE + i` is row `i` of the
/// token's adapter's virtual-token embeddings (prompt tuning), never a vocabulary entry.
pub const VIRTUAL_TOKEN_BASE: u32 = 1 << 31;

/// The virtual-token row of `id`, if it is one.
pub fn virtual_row(id: u32) -> Option<usize> {
    id.checked_sub(VIRTUAL_TOKEN_BASE).map(|i| i as usize)
}

/// One sequence's contiguous run of tokens in the batch.
#[derive(Clone, Debug)]
pub struct SeqChunk {
    /// First row of this chunk in the batch.
    pub start: usize,
    /// Number of rows.
    pub len: usize,
    /// Positions already in the KV cache before this chunk (its first token's position).
    pub context_len: usize,
    /// The sequence's KV block table, covering at least `context_len + len` positions.
    pub block_table: Vec<u32>,
}

/// All tokens of one step.
#[derive(Clone, Debug, Default)]
pub struct ForwardBatch {
    pub tokens: Vec<u32>,
    pub positions: Vec<usize>,
    pub chunks: Vec<SeqChunk>,
    /// Adapter slot of every token (-1: the base model alone); a mixture token's first
    /// member.
    pub slots: Vec<i32>,
    /// Every token's weighted adapter entries `(slot, weight)`, only when some chunk is a
    /// mixture (else empty, and `slots` says everything: weight 1).
    pub mixtures: Vec<Vec<(u32, f32)>>,
    /// Batch rows whose next-token logits are returned, in this order.
    pub logit_rows: Vec<usize>,
}

impl ForwardBatch {
    /// Appends one base-model sequence's chunk; returns its last row.
    pub fn push_chunk(&mut self, tokens: &[u32], context_len: usize, block_table: &[u32]) -> usize {
        self.push_adapter_chunk(tokens, context_len, block_table, -1)
    }

    /// Appends one sequence's chunk whose tokens use adapter `slot` (-1: none); returns
    /// its last row.
    pub fn push_adapter_chunk(
        &mut self,
        tokens: &[u32],
        context_len: usize,
        block_table: &[u32],
        slot: i32,
    ) -> usize {
        let start = self.tokens.len();
        self.slots.extend(std::iter::repeat_n(slot, tokens.len()));
        if !self.mixtures.is_empty() {
            let entries: Vec<(u32, f32)> =
                u32::try_from(slot).map(|s| (s, 1.0)).into_iter().collect();
            self.mixtures
                .extend(std::iter::repeat_n(entries, tokens.len()));
        }
        self.tokens.extend_from_slice(tokens);
        self.positions
            .extend((0..tokens.len()).map(|i| context_len + i));
        self.chunks.push(SeqChunk {
            start,
            len: tokens.len(),
            context_len,
            block_table: block_table.to_vec(),
        });
        start + tokens.len() - 1
    }

    /// Appends one sequence's chunk whose tokens use the weighted adapters `entries`
    /// (`(slot, weight)`, distinct slots); returns its last row.
    pub fn push_mixture_chunk(
        &mut self,
        tokens: &[u32],
        context_len: usize,
        block_table: &[u32],
        entries: &[(u32, f32)],
    ) -> usize {
        let prior = self.tokens.len();
        if self.mixtures.is_empty() {
            self.mixtures = self
                .slots
                .iter()
                .map(|&s| u32::try_from(s).map(|s| (s, 1.0)).into_iter().collect())
                .collect();
        }
        let first = entries.first().map_or(-1, |&(s, _)| s as i32);
        let last = self.push_adapter_chunk(tokens, context_len, block_table, first);
        self.mixtures.truncate(prior);
        self.mixtures
            .extend(std::iter::repeat_n(entries.to_vec(), tokens.len()));
        last
    }

    /// For every row, the index of the chunk it belongs to.
    pub fn row_chunks(&self) -> Vec<usize> {
        let mut out = vec![0; self.tokens.len()];
        for (c, chunk) in self.chunks.iter().enumerate() {
            out[chunk.start..chunk.start + chunk.len].fill(c);
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}
