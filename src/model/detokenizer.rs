//! Streaming detokenization: turns generated ids, one at a time, into text deltas that
//! never end in a broken UTF-8 sequence (see [`IncrementalDetokenizer`]).
use super::tokenizer::TextTokenizer;
use anyhow::Result;

/// Incremental detokenizer for streaming. Push one generated id at a time and get the newly
/// completed text. A tail that is not yet complete UTF-8 (it decodes to U+FFFD) is held back
/// until the ids that complete it arrive. Special tokens are skipped.
///
/// It uses the prefix/read offset technique of vLLM and TGI: decode a small window of ids and
/// diff it against the decode of the window's already-emitted prefix. It starts with no
/// context, so the concatenation of all deltas (and of [`Self::flush`]) equals
/// `decode(generated_ids, skip_special_tokens = true)`.
#[derive(Clone, Debug, Default)]
pub struct IncrementalDetokenizer {
    ids: Vec<u32>,
    /// Start of the decode window: ids before it never influence new text.
    prefix_offset: usize,
    /// Ids before this have been emitted as text.
    read_offset: usize,
}

impl IncrementalDetokenizer {
    /// A detokenizer for a completion of `prompt_ids`. The prompt is not used as context (the
    /// deltas then add up to the decode of the generated ids alone), so this equals
    /// `IncrementalDetokenizer::default()`.
    pub fn new(prompt_ids: &[u32]) -> Self {
        let _ = prompt_ids;
        Self::default()
    }

    /// All ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Add one generated id; returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let (prefix_text, new_text) = self.window_texts(tok)?;
        if new_text.len() <= prefix_text.len() || new_text.ends_with(char::REPLACEMENT_CHARACTER) {
            // Nothing new yet, or an incomplete UTF-8 sequence at the end: wait for more ids.
            return Ok(String::new());
        }
        let delta = text_after(&prefix_text, &new_text);
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(delta)
    }

    /// End of stream: return whatever is still held back (a genuinely invalid tail is emitted
    /// as U+FFFD), and leave the detokenizer as if everything had been emitted.
    pub fn flush(&mut self, tok: &TextTokenizer) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let (prefix_text, new_text) = self.window_texts(tok)?;
        let delta = text_after(&prefix_text, &new_text);
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(delta)
    }

    /// Decodes of the window's emitted prefix and of the whole window.
    fn window_texts(&self, tok: &TextTokenizer) -> Result<(String, String)> {
        let prefix_text = tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let new_text = tok.decode(&self.ids[self.prefix_offset..], true)?;
        Ok((prefix_text, new_text))
    }
}

/// The part of `new_text` after what it shares with `prefix_text` (normally all of the prefix).
fn text_after(prefix_text: &str, new_text: &str) -> String {
    if let Some(rest) = new_text.strip_prefix(prefix_text) {
        return rest.to_owned();
    }
    let common: usize = prefix_text
        .chars()
        .zip(new_text.chars())
        .take_while(|(a, b)| a == b)
        .map(|(a, _)| a.len_utf8())
        .sum();
    new_text[common..].to_owned()
}
