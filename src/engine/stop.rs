//! Stop-string matching on a streamed text: decides which decoded text is safe to emit,
//! holds back any tail that could still become a stop string, and reports the stop.

/// Result of feeding one text delta to a [`StopMatcher`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// No stop string yet; `emit` is the text that is now safe to send (may be empty).
    Continue { emit: String },
    /// A stop string completed. `emit` is the remaining text before it (the stop string
    /// itself is excluded, like OpenAI/vLLM); `matched` is the stop string.
    Stopped { emit: String, matched: String },
}

/// Streaming stop-string matcher.
///
/// Invariant between calls: `held` is the longest suffix of the text seen so far that
/// is a proper prefix of some stop string (so everything before it is safe to emit),
/// and no stop string occurs in the text seen so far. Hence every possible match starts
/// inside `held`, and the result does not depend on how the text is split into deltas.
///
/// Match rule: the stop string that completes first in the stream wins; if several
/// complete at the same position, the earliest-starting (longest) one wins. This is
/// "earliest start wins" except when a stop lies strictly inside a longer one that
/// began earlier, where the shorter one necessarily completes (and stops the stream)
/// before the longer one could be seen.
#[derive(Clone, Debug)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    /// Set once a stop string matched; nothing is emitted afterwards.
    matched: Option<String>,
}

impl StopMatcher {
    /// Empty stop strings are ignored (the request validator rejects them earlier).
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            stops,
            held: String::new(),
            matched: None,
        }
    }

    /// The stop string that ended the stream, if any.
    pub fn matched(&self) -> Option<&str> {
        self.matched.as_deref()
    }

    /// Feed the next decoded text delta and get the text that is now safe to emit.
    /// After a `Stopped` outcome, every further call returns `Stopped` again with an
    /// empty `emit` and the same `matched` string.
    pub fn push(&mut self, delta: &str) -> StopOutcome {
        if let Some(matched) = &self.matched {
            return StopOutcome::Stopped {
                emit: String::new(),
                matched: matched.clone(),
            };
        }
        self.held.push_str(delta);
        if self.stops.is_empty() {
            return StopOutcome::Continue {
                emit: std::mem::take(&mut self.held),
            };
        }

        // The earliest occurrence of each stop is also its earliest end; pick the
        // smallest end, then the smallest start.
        let mut best: Option<(usize, usize, usize)> = None; // (end, start, stop index)
        for (i, stop) in self.stops.iter().enumerate() {
            if let Some(start) = self.held.find(stop.as_str()) {
                let key = (start + stop.len(), start, i);
                if best.is_none_or(|b| (key.0, key.1) < (b.0, b.1)) {
                    best = Some(key);
                }
            }
        }
        if let Some((_, start, i)) = best {
            let matched = self.stops[i].clone();
            self.held.truncate(start);
            self.matched = Some(matched.clone());
            return StopOutcome::Stopped {
                emit: std::mem::take(&mut self.held),
                matched,
            };
        }

        let cut = self.held.len() - self.partial_tail_len();
        let tail = self.held.split_off(cut);
        StopOutcome::Continue {
            emit: std::mem::replace(&mut self.held, tail),
        }
    }

    /// End of stream (length / EOS): release any held-back text. Returns an empty
    /// string after a stop string matched.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length in bytes of the longest suffix of `held` that is a proper prefix of some
    /// stop string. Only prefixes ending on a char boundary of the stop string are
    /// tried; such a prefix starts with a char's first byte, so a byte-level suffix
    /// match also starts on a char boundary of `held`.
    fn partial_tail_len(&self) -> usize {
        let held = self.held.as_bytes();
        let mut best = 0;
        for stop in &self.stops {
            let longest = (stop.len() - 1).min(held.len());
            for len in (best + 1..=longest).rev() {
                if stop.is_char_boundary(len) && held.ends_with(&stop.as_bytes()[..len]) {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(stops.iter().map(|s| s.to_string()).collect())
    }

    /// Feed `deltas`, then `finish()` unless stopped. Returns every emitted piece
    /// concatenated and the matched stop string.
    fn run(stops: &[&str], deltas: &[&str]) -> (String, Option<String>) {
        let mut m = matcher(stops);
        let mut out = String::new();
        for d in deltas {
            match m.push(d) {
                StopOutcome::Continue { emit } => out.push_str(&emit),
                StopOutcome::Stopped { emit, matched } => {
                    out.push_str(&emit);
                    assert_eq!(m.finish(), "");
                    return (out, Some(matched));
                }
            }
        }
        out.push_str(&m.finish());
        (out, None)
    }

    /// Reference: the first char position at which some stop string ends; among stops
    /// ending there, the longest. Returns (text before the stop, matched stop).
    fn reference(stops: &[&str], text: &str) -> (String, Option<String>) {
        for (e, _) in text.char_indices().skip(1).chain([(text.len(), ' ')]) {
            let prefix = &text[..e];
            let hit = stops
                .iter()
                .filter(|s| !s.is_empty() && prefix.ends_with(**s))
                .max_by_key(|s| s.len());
            if let Some(s) = hit {
                return (prefix[..e - s.len()].to_string(), Some(s.to_string()));
            }
        }
        (text.to_string(), None)
    }

    fn chars(s: &str) -> Vec<String> {
        s.chars().map(String::from).collect()
    }

    #[test]
    fn stop_split_across_single_char_deltas() {
        let mut m = matcher(&["</s>"]);
        let mut out = String::new();
        let mut stopped = None;
        for d in chars("hello</s>world") {
            match m.push(&d) {
                StopOutcome::Continue { emit } => {
                    assert!(!emit.contains('<'), "leaked part of the stop: {emit:?}");
                    out.push_str(&emit);
                }
                StopOutcome::Stopped { emit, matched } => {
                    out.push_str(&emit);
                    stopped = Some(matched);
                    break;
                }
            }
        }
        assert_eq!(out, "hello");
        assert_eq!(stopped.as_deref(), Some("</s>"));
        assert_eq!(m.matched(), Some("</s>"));
        // Nothing more after the stop.
        assert_eq!(
            m.push("more"),
            StopOutcome::Stopped {
                emit: String::new(),
                matched: "</s>".into()
            }
        );
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn partial_prefix_is_released_intact() {
        let mut m = matcher(&["STOP"]);
        assert_eq!(
            m.push("ab ST"),
            StopOutcome::Continue { emit: "ab ".into() }
        );
        assert_eq!(m.push("O"), StopOutcome::Continue { emit: "".into() });
        assert_eq!(
            m.push("X y"),
            StopOutcome::Continue {
                emit: "STOX y".into()
            }
        );
        // A held prefix followed by a restart of the stop string.
        assert_eq!(m.push("SSTO"), StopOutcome::Continue { emit: "S".into() });
        assert_eq!(
            m.push("P!"),
            StopOutcome::Stopped {
                emit: "".into(),
                matched: "STOP".into()
            }
        );
    }

    #[test]
    fn overlapping_stops_earliest_start_wins() {
        // "lo w" starts (and ends) before "world".
        let want = ("hel".to_string(), Some("lo w".to_string()));
        assert_eq!(run(&["world", "lo w"], &["hello world"]), want);
        assert_eq!(
            run(
                &["world", "lo w"],
                &chars("hello world")
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
            ),
            want
        );
        assert_eq!(
            run(&["cde", "bcd"], &["abcdef"]),
            ("a".into(), Some("bcd".into()))
        );
        // Both complete at the same point: the earlier-starting (longer) one wins,
        // whatever the order in the list or the split.
        for stops in [["def", "bcdef"], ["bcdef", "def"]] {
            assert_eq!(
                run(&stops, &["abcdefg"]),
                ("a".into(), Some("bcdef".into()))
            );
            assert_eq!(
                run(&stops, &["ab", "cd", "e", "fg"]),
                ("a".into(), Some("bcdef".into()))
            );
        }
        // Same start: the shorter completes first in a stream, so it wins everywhere.
        assert_eq!(
            run(&["abc", "ab"], &["xabc"]),
            ("x".into(), Some("ab".into()))
        );
        // A stop strictly inside a longer one completes first and wins regardless of
        // how the text is split (documented rule).
        assert_eq!(
            run(&["abcdef", "cd"], &["zabcdefz"]),
            ("zab".into(), Some("cd".into()))
        );
        assert_eq!(
            run(&["abcdef", "cd"], &["zab", "cdefz"]),
            ("zab".into(), Some("cd".into()))
        );
    }

    #[test]
    fn multibyte_text_and_stops() {
        let text = "naïve 日本語 →END tail";
        let pieces = chars(text);
        let deltas: Vec<&str> = pieces.iter().map(String::as_str).collect();
        assert_eq!(
            run(&["→END"], &deltas),
            ("naïve 日本語 ".into(), Some("→END".into()))
        );
        assert_eq!(
            run(&["日本"], &["こんにちは日", "本語"]),
            ("こんにちは".into(), Some("日本".into()))
        );
        // "é" and "è" share their first byte: "è" must not be held back (no split
        // inside a char), and text ending with a partial multibyte stop is held whole.
        let mut m = matcher(&["é!", "🙂🙃"]);
        assert_eq!(
            m.push("cafè"),
            StopOutcome::Continue {
                emit: "cafè".into()
            }
        );
        assert_eq!(m.push("é"), StopOutcome::Continue { emit: "".into() });
        assert_eq!(m.push("?🙂"), StopOutcome::Continue { emit: "é?".into() });
        assert_eq!(
            m.push("🙃x"),
            StopOutcome::Stopped {
                emit: "".into(),
                matched: "🙂🙃".into()
            }
        );
    }

    #[test]
    fn finish_releases_held_text() {
        let mut m = matcher(&["###"]);
        assert_eq!(
            m.push("abc##"),
            StopOutcome::Continue { emit: "abc".into() }
        );
        assert_eq!(m.finish(), "##");
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn no_stops_and_empty_stops_pass_through() {
        let mut m = matcher(&["", ""]);
        assert_eq!(m.push("abc"), StopOutcome::Continue { emit: "abc".into() });
        assert_eq!(m.push(""), StopOutcome::Continue { emit: "".into() });
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn emitted_plus_stop_plus_rest_is_the_input() {
        let input = "The answer is 42.\nUser: next question";
        let stops = ["\nUser:", "Assistant:"];
        let deltas = [
            "The ans",
            "wer is 4",
            "2.",
            "\n",
            "Us",
            "er: next",
            " question",
        ];
        assert_eq!(deltas.concat(), input);
        let (emitted, matched) = run(&stops, &deltas);
        let matched = matched.unwrap_or_default();
        let rest = &input[emitted.len() + matched.len()..];
        assert_eq!(format!("{emitted}{matched}{rest}"), input);
        assert_eq!(emitted, "The answer is 42.");
        assert_eq!(rest, " next question");
    }

    /// Tiny SplitMix64 for the property test.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_splits_match_reference() {
        // Small alphabet (with multibyte chars sharing lead bytes) so stops overlap a lot.
        let alphabet = ['a', 'b', 'é', 'è', '日', '🙂'];
        let mut rng = Rng(2024);
        for _ in 0..3_000 {
            let word = |rng: &mut Rng, len: usize| -> String {
                (0..len)
                    .map(|_| alphabet[rng.below(alphabet.len())])
                    .collect()
            };
            let len = rng.below(30);
            let text = word(&mut rng, len);
            let n_stops = rng.below(4);
            let stops: Vec<String> = (0..n_stops)
                .map(|_| {
                    let l = rng.below(4);
                    word(&mut rng, l)
                })
                .collect();
            let stop_refs: Vec<&str> = stops.iter().map(String::as_str).collect();
            let (want, want_match) = reference(&stop_refs, &text);

            // Random split at char boundaries (empty deltas included).
            let bounds: Vec<usize> = text
                .char_indices()
                .map(|(i, _)| i)
                .chain([text.len()])
                .collect();
            let mut cuts: Vec<usize> = (0..rng.below(8))
                .map(|_| bounds[rng.below(bounds.len())])
                .collect();
            cuts.push(0);
            cuts.push(text.len());
            cuts.sort_unstable();
            let deltas: Vec<&str> = cuts.windows(2).map(|w| &text[w[0]..w[1]]).collect();

            let mut m = StopMatcher::new(stops.clone());
            let mut out = String::new();
            let mut got_match = None;
            for d in &deltas {
                match m.push(d) {
                    StopOutcome::Continue { emit } => out.push_str(&emit),
                    StopOutcome::Stopped { emit, matched } => {
                        out.push_str(&emit);
                        got_match = Some(matched);
                        break;
                    }
                }
                // Never leak: what was emitted so far is a prefix of the final output.
                assert!(want.starts_with(&out), "{text:?} {stops:?} {deltas:?}");
            }
            if got_match.is_none() {
                out.push_str(&m.finish());
            }
            assert_eq!(
                (&out, &got_match),
                (&want, &want_match),
                "text {text:?} stops {stops:?} deltas {deltas:?}"
            );
            if let Some(s) = &got_match {
                assert!(text[out.len()..].starts_with(s.as_str()));
            }
        }
    }
}
