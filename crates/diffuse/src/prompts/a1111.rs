//! The AUTOMATIC1111 web UI's prompts: attention weights and prompts of any length. Ported from
//! stable-diffusion-webui's modules/prompt_parser.py (`parse_prompt_attention`),
//! modules/sd_hijack_clip.py (`TextConditionalModel.tokenize_line`, `process_tokens`) and
//! modules/sd_emphasis.py (`EmphasisOriginal`), with that UI's default settings.
//!
//! 1. [`parse_prompt_attention`] reads `(text)` as weight ×1.1, `[text]` as ÷1.1, `(text:1.3)` as
//!    ×1.3 (brackets nest and multiply), `\(` `\)` `\[` `\]` `\\` as literal characters, and a
//!    standalone `BREAK` as the end of a chunk.
//! 2. [`chunk_prompt`] tokenizes each weighted piece on its own (no BOS/EOS) and fills chunks of
//!    75 tokens. A chunk that fills up while a comma lies within its last 20 tokens
//!    (A1111's `comma_padding_backtrack`) ends after that comma and the tokens after it start
//!    the next chunk. Each chunk is padded with EOS to 75 and framed as BOS + 75 + EOS = 77.
//! 3. [`encode_prompt`] runs the text encoder on each chunk (for SD 2.x, whose pad token is not
//!    EOS, every token after the first EOS becomes the pad token), multiplies each token's
//!    embedding by its weight, rescales the chunk so that its mean over all values is the one it
//!    had before weighting (`z * (original_mean / new_mean)`), and concatenates the chunks along
//!    the sequence: `[1, 77 · chunks, hidden]`. The UNet's cross-attention takes any length.
//! 4. With guidance, the prompt and the negative prompt may have different numbers of chunks:
//!    [`pad_to_same_length`] appends the empty prompt's encoding to the shorter, which is A1111's
//!    "Pad prompt/negative prompt" setting (`pad_cond_uncond`). (Its default instead runs the
//!    two through the UNet separately; padding lets one batched pass serve both, as diffusers
//!    batches them.)
//!
//! Deliberate differences: `[a:b:0.5]` prompt editing, `[a|b]` alternation and `AND` are not
//! supported (their text stays as written, with the brackets read as weights); textual-inversion
//! embeddings are not looked up; the weight's digits are ASCII (Python's `\d` also takes other
//! scripts' digits). Clip skip stays the pipeline's (diffusers': the prompt only, while A1111's
//! "Clip skip" also applies to the negative prompt).

use candle_core::{DType, Tensor};

use crate::models::clip_text::ClipTextModel;
use crate::tokenizers::clip::ClipTokenizer;
use crate::{Error, Result};

/// Tokens of prompt text per chunk (77 with BOS and EOS).
pub const CHUNK_LENGTH: usize = 75;
/// A1111's `comma_padding_backtrack` default: how far back a full chunk looks for a comma.
pub const COMMA_PADDING_BACKTRACK: usize = 20;
/// `(text)` multiplies the weight by this, `[text]` divides by it.
const ROUND_BRACKET_MULTIPLIER: f64 = 1.1;
/// A1111 marks a BREAK as this text with weight -1 among the parsed pieces.
const BREAK_TEXT: &str = "BREAK";
const BREAK_WEIGHT: f64 = -1.0;

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

/// One lexical item of `re_attention`, in the order its alternatives are tried.
enum Item<'a> {
    /// `\(`, `\)`, `\[`, `\]`, `\\` give their second character; a lone `\` gives nothing.
    Escaped(&'a str),
    OpenRound,
    OpenSquare,
    /// `:` weight `)`, e.g. `:1.3)` or `: -0.5 )`: the weight's text.
    WeightedClose(&'a str),
    CloseRound,
    CloseSquare,
    /// A run of anything but `\ ( ) [ ] :`, or a `:` that does not start a weight.
    Text,
}

/// Python's `\s` on str: Unicode whitespace and the separators U+001C..U+001F.
fn is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `\w` on str, for `\b`.
fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The item at the start of `rest` (non-empty) and its length in bytes.
fn next_item(rest: &str) -> (Item<'_>, usize) {
    let mut chars = rest.chars();
    let first = chars.next().expect("next_item is called on non-empty text");
    match first {
        '\\' => match chars.next() {
            Some(c @ ('(' | ')' | '[' | ']' | '\\')) => (Item::Escaped(&rest[1..1 + c.len_utf8()]), 2),
            _ => (Item::Escaped(""), 1),
        },
        '(' => (Item::OpenRound, 1),
        '[' => (Item::OpenSquare, 1),
        ':' => match weighted_close(rest) {
            Some((weight, length)) => (Item::WeightedClose(weight), length),
            None => (Item::Text, 1),
        },
        ')' => (Item::CloseRound, 1),
        ']' => (Item::CloseSquare, 1),
        _ => {
            let length = rest.find(['\\', '(', ')', '[', ']', ':']).unwrap_or(rest.len());
            (Item::Text, length)
        }
    }
}

/// `:\s*([+-]?[.\d]+)\s*\)` at the start of `rest`: the weight's text and the match's length.
fn weighted_close(rest: &str) -> Option<(&str, usize)> {
    let skip_spaces = |at: usize| at + rest[at..].find(|c: char| !is_space(c)).unwrap_or(rest.len() - at);
    let start = skip_spaces(1);
    let mut end = start;
    if rest[end..].starts_with(['+', '-']) {
        end += 1;
    }
    let digits = rest[end..].find(|c: char| c != '.' && !c.is_ascii_digit()).unwrap_or(rest.len() - end);
    if digits == 0 {
        return None;
    }
    end += digits;
    let close = skip_spaces(end);
    rest[close..].starts_with(')').then(|| (&rest[start..end], close + 1))
}

/// `re.split(r"\s*\bBREAK\b\s*", text)`: the text around each standalone `BREAK`, with the
/// whitespace on both sides of it removed.
fn split_at_breaks(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut part_start = 0;
    let mut search = 0;
    while let Some(found) = text[search..].find(BREAK_TEXT) {
        let at = search + found;
        let end = at + BREAK_TEXT.len();
        let standalone = !text[..at].chars().next_back().is_some_and(is_word)
            && !text[end..].chars().next().is_some_and(is_word);
        if !standalone {
            search = at + 1; // past the ASCII `B`
            continue;
        }
        // The match starts where the whitespace before BREAK starts (but not in the previous match).
        let before = text[part_start..at].trim_end_matches(is_space);
        let after = text[end..].trim_start_matches(is_space);
        parts.push(before);
        part_start = text.len() - after.len();
        search = part_start;
    }
    parts.push(&text[part_start..]);
    parts
}

/// A1111's `parse_prompt_attention`: the prompt as runs of text with their weights, runs of
/// equal weight merged; a `BREAK` is the piece `("BREAK", -1.0)`. Fails only on a weight like
/// `(word:1.2.3)`, which A1111 cannot read either.
pub fn parse_prompt_attention(text: &str) -> Result<Vec<(String, f64)>> {
    let mut res: Vec<(String, f64)> = Vec::new();
    let mut round_brackets: Vec<usize> = Vec::new();
    let mut square_brackets: Vec<usize> = Vec::new();
    let multiply_range = |res: &mut Vec<(String, f64)>, start: usize, multiplier: f64| {
        for piece in &mut res[start..] {
            piece.1 *= multiplier;
        }
    };

    let mut position = 0;
    while position < text.len() {
        let (item, length) = next_item(&text[position..]);
        let matched = &text[position..position + length];
        position += length;
        match item {
            Item::Escaped(literal) => res.push((literal.to_string(), 1.0)),
            Item::OpenRound => round_brackets.push(res.len()),
            Item::OpenSquare => square_brackets.push(res.len()),
            Item::WeightedClose(weight) if !round_brackets.is_empty() => {
                let weight: f64 = weight.parse().map_err(|_| {
                    Error::invalid(format!("prompt weight `{weight}` is not a number (in `(text:{weight})`)"))
                })?;
                let start = round_brackets.pop().expect("checked non-empty");
                multiply_range(&mut res, start, weight);
            }
            Item::CloseRound if !round_brackets.is_empty() => {
                let start = round_brackets.pop().expect("checked non-empty");
                multiply_range(&mut res, start, ROUND_BRACKET_MULTIPLIER);
            }
            Item::CloseSquare if !square_brackets.is_empty() => {
                let start = square_brackets.pop().expect("checked non-empty");
                multiply_range(&mut res, start, 1.0 / ROUND_BRACKET_MULTIPLIER);
            }
            // Plain text, and closing brackets or weights with nothing open, are text.
            Item::Text | Item::WeightedClose(_) | Item::CloseRound | Item::CloseSquare => push_text(&mut res, matched),
        }
    }
    // Brackets left open apply to the end of the prompt.
    for start in round_brackets {
        multiply_range(&mut res, start, ROUND_BRACKET_MULTIPLIER);
    }
    for start in square_brackets {
        multiply_range(&mut res, start, 1.0 / ROUND_BRACKET_MULTIPLIER);
    }
    if res.is_empty() {
        res.push((String::new(), 1.0));
    }
    // Merge runs of identical weights (exact comparison, as A1111's).
    let mut merged: Vec<(String, f64)> = Vec::with_capacity(res.len());
    for (piece, weight) in res {
        match merged.last_mut() {
            Some(last) if last.1 == weight => last.0.push_str(&piece),
            _ => merged.push((piece, weight)),
        }
    }
    Ok(merged)
}

/// Text (any match that is not a bracket in use, e.g. `:1.2)` with no `(` open), with a BREAK
/// marker between its parts.
fn push_text(res: &mut Vec<(String, f64)>, text: &str) {
    for (i, part) in split_at_breaks(text).into_iter().enumerate() {
        if i > 0 {
            res.push((BREAK_TEXT.to_string(), BREAK_WEIGHT));
        }
        res.push((part.to_string(), 1.0));
    }
}

// ---------------------------------------------------------------------------------------------
// Chunking
// ---------------------------------------------------------------------------------------------

/// One chunk of a prompt: BOS, 75 token slots (EOS-padded), EOS, and each token's weight.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptChunk {
    /// The 77 token ids.
    pub tokens: Vec<u32>,
    /// Each token's weight (1 for BOS, EOS and padding).
    pub multipliers: Vec<f64>,
}

/// The tokens chunking needs to know.
#[derive(Clone, Copy, Debug)]
pub struct ChunkTokens {
    /// The start-of-text token.
    pub bos: u32,
    /// The end-of-text (and padding) token.
    pub eos: u32,
    /// `,</w>`, where chunks prefer to break.
    pub comma: Option<u32>,
}

impl ChunkTokens {
    /// Reads the tokens from `tokenizer`.
    pub fn of(tokenizer: &ClipTokenizer) -> Result<Self> {
        let comma = tokenizer.tokenize(",")?;
        Ok(ChunkTokens {
            bos: tokenizer.bos_token_id(),
            eos: tokenizer.eos_token_id(),
            comma: (comma.len() == 1).then(|| comma[0]),
        })
    }

    /// A1111's `empty_chunk`: BOS, then EOS to the end, all of weight 1.
    pub fn empty_chunk(&self) -> PromptChunk {
        let mut tokens = vec![self.bos];
        tokens.resize(CHUNK_LENGTH + 2, self.eos);
        PromptChunk { tokens, multipliers: vec![1.0; CHUNK_LENGTH + 2] }
    }
}

/// The chunk being filled, as `tokenize_line` keeps it.
struct ChunkBuilder {
    ids: ChunkTokens,
    chunks: Vec<PromptChunk>,
    tokens: Vec<u32>,
    multipliers: Vec<f64>,
    /// Where the last comma of the current chunk is.
    last_comma: Option<usize>,
    token_count: usize,
}

impl ChunkBuilder {
    /// `next_chunk`: pad the current chunk with EOS, frame it with BOS/EOS and start a new one.
    /// A closing chunk (`is_last`) counts its real tokens, every other one 75.
    fn next_chunk(&mut self, is_last: bool) {
        self.token_count += if is_last { self.tokens.len() } else { CHUNK_LENGTH };
        let mut tokens = Vec::with_capacity(CHUNK_LENGTH + 2);
        tokens.push(self.ids.bos);
        tokens.append(&mut self.tokens);
        tokens.resize(CHUNK_LENGTH + 1, self.ids.eos);
        tokens.push(self.ids.eos);
        let mut multipliers = Vec::with_capacity(CHUNK_LENGTH + 2);
        multipliers.push(1.0);
        multipliers.append(&mut self.multipliers);
        multipliers.resize(CHUNK_LENGTH + 2, 1.0);
        self.last_comma = None;
        self.chunks.push(PromptChunk { tokens, multipliers });
    }

    fn push(&mut self, token: u32, weight: f64) {
        if Some(token) == self.ids.comma {
            self.last_comma = Some(self.tokens.len());
        } else if let Some(comma) = self.last_comma.filter(|&comma| {
            self.tokens.len() == CHUNK_LENGTH && self.tokens.len() - comma <= COMMA_PADDING_BACKTRACK
        }) {
            // The chunk is full and a comma is near its end: end it after the comma and carry
            // the rest over.
            let moved_tokens = self.tokens.split_off(comma + 1);
            let moved_multipliers = self.multipliers.split_off(comma + 1);
            self.next_chunk(false);
            self.tokens = moved_tokens;
            self.multipliers = moved_multipliers;
        }
        if self.tokens.len() == CHUNK_LENGTH {
            self.next_chunk(false);
        }
        self.tokens.push(token);
        self.multipliers.push(weight);
    }
}

/// A1111's `tokenize_line`: the chunks of a parsed prompt and its token count (75 per full
/// chunk plus the tokens of the last). `tokenize` gives a piece's ids without BOS/EOS.
pub fn chunk_prompt(
    parsed: &[(String, f64)],
    ids: ChunkTokens,
    mut tokenize: impl FnMut(&str) -> Result<Vec<u32>>,
) -> Result<(Vec<PromptChunk>, usize)> {
    let mut builder =
        ChunkBuilder { ids, chunks: Vec::new(), tokens: Vec::new(), multipliers: Vec::new(), last_comma: None, token_count: 0 };
    for (text, weight) in parsed {
        if text == BREAK_TEXT && *weight == BREAK_WEIGHT {
            builder.next_chunk(false);
            continue;
        }
        for token in tokenize(text)? {
            builder.push(token, *weight);
        }
    }
    if !builder.tokens.is_empty() || builder.chunks.is_empty() {
        builder.next_chunk(true);
    }
    Ok((builder.chunks, builder.token_count))
}

/// The text encoder's input for a chunk: with a pad token other than EOS (SD 2.x), every token
/// after the first EOS becomes the pad token (`process_tokens`).
pub fn chunk_input_ids(chunk: &PromptChunk, eos: u32, pad: u32) -> Vec<u32> {
    let mut ids = chunk.tokens.clone();
    if let Some(first_eos) = ids.iter().position(|&id| id == eos) {
        for id in &mut ids[first_eos + 1..] {
            *id = pad;
        }
    }
    ids
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

/// `EmphasisOriginal.after_transformers`: each token's embedding times its weight, then the
/// whole chunk rescaled to its original mean. `z` is `[1, 77, hidden]`; computed in f32 (the
/// weights are a float32 tensor in A1111, which promotes half-precision embeddings).
pub fn apply_emphasis(z: &Tensor, multipliers: &[f64]) -> Result<Tensor> {
    let z = z.to_dtype(DType::F32)?;
    let weights: Vec<f32> = multipliers.iter().map(|&m| m as f32).collect();
    let weights = Tensor::from_vec(weights, (1, multipliers.len(), 1), z.device())?;
    let original_mean = z.mean_all()?;
    let weighted = z.broadcast_mul(&weights)?;
    let new_mean = weighted.mean_all()?;
    Ok(weighted.broadcast_mul(&(original_mean / new_mean)?)?)
}

/// A prompt's embeddings as the A1111 UI makes them, `[1, 77 · chunks, hidden]` in f32.
/// `clip_skip` as [`ClipTextModel::encode`].
pub fn encode_prompt(
    tokenizer: &ClipTokenizer,
    text_encoder: &ClipTextModel,
    prompt: &str,
    clip_skip: Option<usize>,
) -> Result<Tensor> {
    let parsed = parse_prompt_attention(prompt)?;
    let (chunks, _) = chunk_prompt(&parsed, ChunkTokens::of(tokenizer)?, |text| tokenizer.tokenize(text))?;
    encode_chunks(tokenizer, text_encoder, &chunks, clip_skip)
}

/// A prompt's embeddings for SDXL as the A1111 UI makes them: the same chunks through each
/// encoder (`hidden_states[-(clip_skip + 2)]`, as diffusers' SDXL pipelines take them), each
/// chunk's emphasis applied, concatenated along the sequence and then across the encoders
/// (`[1, 77 · chunks, Σ hidden]`); and the pooled projection of the first chunk from the
/// encoder that has one (A1111 takes `zs[0].pooled`).
pub fn encode_prompt_xl(
    encoders: &[(&ClipTokenizer, &ClipTextModel)],
    prompt: &str,
    clip_skip: Option<usize>,
) -> Result<(Tensor, Option<Tensor>)> {
    let parsed = parse_prompt_attention(prompt)?;
    let mut per_encoder = Vec::with_capacity(encoders.len());
    let mut pooled = None;
    for (tokenizer, text_encoder) in encoders {
        let (chunks, _) = chunk_prompt(&parsed, ChunkTokens::of(tokenizer)?, |text| tokenizer.tokenize(text))?;
        let mut encoded = Vec::with_capacity(chunks.len());
        for (i, chunk) in chunks.iter().enumerate() {
            let ids = chunk_input_ids(chunk, tokenizer.eos_token_id(), tokenizer.pad_token_id());
            let ids = Tensor::from_vec(ids, (1, CHUNK_LENGTH + 2), text_encoder.device())?;
            let (z, chunk_pooled) = text_encoder.encode_penultimate(&ids, clip_skip)?;
            if i == 0 && pooled.is_none() {
                pooled = chunk_pooled;
            }
            encoded.push(apply_emphasis(&z, &chunk.multipliers)?);
        }
        per_encoder.push(Tensor::cat(&encoded, 1)?);
    }
    Ok((Tensor::cat(&per_encoder, 2)?, pooled))
}

/// The chunks through the text encoder and the emphasis, concatenated along the sequence.
pub fn encode_chunks(
    tokenizer: &ClipTokenizer,
    text_encoder: &ClipTextModel,
    chunks: &[PromptChunk],
    clip_skip: Option<usize>,
) -> Result<Tensor> {
    let mut encoded = Vec::with_capacity(chunks.len());
    for chunk in chunks {
        let ids = chunk_input_ids(chunk, tokenizer.eos_token_id(), tokenizer.pad_token_id());
        let ids = Tensor::from_vec(ids, (1, CHUNK_LENGTH + 2), text_encoder.device())?;
        let z = text_encoder.encode(&ids, clip_skip)?;
        encoded.push(apply_emphasis(&z, &chunk.multipliers)?);
    }
    Ok(Tensor::cat(&encoded, 1)?)
}

/// A1111's `pad_cond_uncond`: the shorter of two `[N, 77 · k, hidden]` embeddings gets the
/// empty prompt's `[1, 77, hidden]` (encoded as that side was) appended until the lengths match.
pub fn pad_to_same_length(
    cond: Tensor,
    uncond: Tensor,
    empty_for_cond: impl FnOnce() -> Result<Tensor>,
    empty_for_uncond: impl FnOnce() -> Result<Tensor>,
) -> Result<(Tensor, Tensor)> {
    let pad = |short: Tensor, long_length: usize, empty: Tensor| -> Result<Tensor> {
        let (batch, length, _) = short.dims3()?;
        let repeats = (long_length - length) / empty.dim(1)?;
        let padding = empty.to_dtype(short.dtype())?.repeat((batch, repeats, 1))?;
        Ok(Tensor::cat(&[short, padding], 1)?)
    };
    let (cond_length, uncond_length) = (cond.dim(1)?, uncond.dim(1)?);
    Ok(match cond_length.cmp(&uncond_length) {
        std::cmp::Ordering::Less => (pad(cond, uncond_length, empty_for_cond()?)?, uncond),
        std::cmp::Ordering::Greater => (cond, pad(uncond, cond_length, empty_for_uncond()?)?),
        std::cmp::Ordering::Equal => (cond, uncond),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Vec<(String, f64)> {
        parse_prompt_attention(text).unwrap()
    }

    fn pieces(expected: &[(&str, f64)]) -> Vec<(String, f64)> {
        expected.iter().map(|(text, weight)| (text.to_string(), *weight)).collect()
    }

    /// The doctests of A1111's parse_prompt_attention (weights as Python prints them).
    #[test]
    fn a1111_doctests() {
        assert_eq!(parsed("normal text"), pieces(&[("normal text", 1.0)]));
        assert_eq!(parsed("an (important) word"), pieces(&[("an ", 1.0), ("important", 1.1), (" word", 1.0)]));
        assert_eq!(parsed("(unbalanced"), pieces(&[("unbalanced", 1.1)]));
        assert_eq!(parsed(r"\(literal\]"), pieces(&[("(literal]", 1.0)]));
        assert_eq!(parsed("(unnecessary)(parens)"), pieces(&[("unnecessaryparens", 1.1)]));
        assert_eq!(
            parsed("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            pieces(&[
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ])
        );
    }

    /// Results of A1111's function (run on these prompts) for the rest of its syntax.
    #[test]
    fn weights_escapes_and_breaks() {
        assert_eq!(parsed("[word]"), pieces(&[("word", 0.9090909090909091)]));
        assert_eq!(parsed("((word))"), pieces(&[("word", 1.2100000000000002)]));
        assert_eq!(parsed("[[word]]"), pieces(&[("word", 0.8264462809917354)]));
        assert_eq!(parsed("a (word:1.3) b"), pieces(&[("a ", 1.0), ("word", 1.3), (" b", 1.0)]));
        assert_eq!(parsed("( word : 0.5 )"), pieces(&[(" word ", 0.5)]));
        assert_eq!(parsed("(word:-1)"), pieces(&[("word", -1.0)]));
        assert_eq!(parsed("(word:.5)"), pieces(&[("word", 0.5)]));
        // A weight with nothing open, an unmatched `)`, a colon: text.
        assert_eq!(parsed("a:1.5) b) c: d]"), pieces(&[("a:1.5) b) c: d]", 1.0)]));
        assert_eq!(parsed(r"a \ b \\ c \) d"), pieces(&[(r"a  b \ c ) d", 1.0)]));
        assert_eq!(parsed(""), pieces(&[("", 1.0)]));
        assert_eq!(parsed("a BREAK b"), pieces(&[("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]));
        assert_eq!(parsed("a\n BREAK\tb"), pieces(&[("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]));
        assert_eq!(parsed("BREAK"), pieces(&[("", 1.0), ("BREAK", -1.0), ("", 1.0)]));
        assert_eq!(
            parsed("a BREAK BREAK b"),
            pieces(&[("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)])
        );
        // Not standalone: part of a word, or lower case.
        assert_eq!(parsed("BREAKS xBREAK break"), pieces(&[("BREAKS xBREAK break", 1.0)]));
        assert_eq!(parsed("a,BREAK,b"), pieces(&[("a,", 1.0), ("BREAK", -1.0), (",b", 1.0)]));
        // Inside brackets the marker is weighted too, and then no longer a BREAK (as in A1111).
        assert_eq!(parsed("(a BREAK b)"), pieces(&[("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]));
        assert_eq!(
            parsed("x (a [b (c:0.7) d] e:1.4) (( f [g BREAK h] i"),
            pieces(&[
                ("x ", 1.0),
                ("a ", 1.4),
                ("b ", 1.2727272727272727),
                ("c", 0.8909090909090909),
                (" d", 1.2727272727272727),
                (" e", 1.4),
                (" ", 1.0),
                (" f ", 1.2100000000000002),
                ("g", 1.1),
                ("BREAK", -1.1),
                ("h", 1.1),
                (" i", 1.2100000000000002),
            ])
        );
        assert_eq!(parsed("(a:1.5 ) :2) [b:3]"), pieces(&[("a", 1.5), (" :2) ", 1.0), ("b:3", 0.9090909090909091)]));
        assert_eq!(parsed("\\"), pieces(&[("", 1.0)]));
        // Python's float() refuses it too.
        assert!(parse_prompt_attention("(a:1.2.3)").unwrap_err().to_string().contains("1.2.3"));
    }

    /// A tokenizer for chunking tests: each whitespace-separated word is its number (`7` → 7),
    /// `,` is the comma token 267.
    fn fake_tokenize(text: &str) -> Result<Vec<u32>> {
        Ok(text.split_whitespace().map(|word| if word == "," { 267 } else { word.parse().unwrap() }).collect())
    }

    const IDS: ChunkTokens = ChunkTokens { bos: 49406, eos: 49407, comma: Some(267) };

    fn words(range: std::ops::Range<u32>) -> String {
        range.map(|i| i.to_string()).collect::<Vec<_>>().join(" ")
    }

    fn chunks_of(parsed: &[(String, f64)]) -> (Vec<PromptChunk>, usize) {
        chunk_prompt(parsed, IDS, fake_tokenize).unwrap()
    }

    fn body(chunk: &PromptChunk) -> Vec<u32> {
        assert_eq!(chunk.tokens.len(), 77);
        assert_eq!(chunk.multipliers.len(), 77);
        assert_eq!((chunk.tokens[0], chunk.tokens[76]), (49406, 49407));
        chunk.tokens[1..76].iter().copied().filter(|&t| t != 49407).collect()
    }

    #[test]
    fn chunks_of_75_tokens() {
        let (chunks, count) = chunks_of(&[(String::new(), 1.0)]);
        assert_eq!((chunks, count), (vec![IDS.empty_chunk()], 0));

        let (chunks, count) = chunks_of(&[(words(1..76), 1.0)]);
        assert_eq!((chunks.len(), count), (1, 75));
        assert_eq!(body(&chunks[0]), (1..76).collect::<Vec<_>>());

        let (chunks, count) = chunks_of(&[(words(1..77), 1.0)]);
        assert_eq!((chunks.len(), count), (2, 76));
        assert_eq!(body(&chunks[1]), vec![76]);
        assert_eq!(chunks[1].tokens[2..], [49407; 75]);

        let (chunks, count) = chunks_of(&[(words(1..201), 1.0)]);
        assert_eq!((chunks.len(), count), (3, 200));
    }

    #[test]
    fn weights_follow_their_tokens() {
        let (chunks, _) = chunks_of(&[("1 2".into(), 1.0), ("3".into(), 1.5), ("4".into(), 0.5)]);
        assert_eq!(chunks[0].multipliers[..6], [1.0, 1.0, 1.0, 1.5, 0.5, 1.0]);
        assert!(chunks[0].multipliers[6..].iter().all(|&m| m == 1.0));
    }

    #[test]
    fn a_full_chunk_ends_after_a_near_comma() {
        // A comma as the 60th token: 15 tokens after it when the chunk fills, within 20.
        let text = format!("{} , {}", words(1..60), words(60..100));
        let (chunks, count) = chunks_of(&[(text, 1.0)]);
        assert_eq!(body(&chunks[0]), (1..60).chain([267]).collect::<Vec<_>>());
        assert_eq!(body(&chunks[1]), (60..100).collect::<Vec<_>>());
        // The first chunk counts 75 (with its padding), the last its 40 tokens.
        assert_eq!(count, 115);

        // A comma as the 50th token is 25 back when the chunk fills: no backtracking.
        let text = format!("{} , {}", words(1..50), words(50..100));
        let (chunks, _) = chunks_of(&[(text, 1.0)]);
        assert_eq!(body(&chunks[0]), (1..50).chain([267]).chain(50..75).collect::<Vec<_>>());
        assert_eq!(body(&chunks[1]), (75..100).collect::<Vec<_>>());

        // A comma as the 75th token: the chunk is full exactly at it, nothing moves.
        let text = format!("{} , {}", words(1..75), words(75..80));
        let (chunks, _) = chunks_of(&[(text, 1.0)]);
        assert_eq!(body(&chunks[0]), (1..75).chain([267]).collect::<Vec<_>>());
        assert_eq!(body(&chunks[1]), (75..80).collect::<Vec<_>>());

        // Weights move with their tokens.
        let parsed = vec![(format!("{} ,", words(1..70)), 1.0), (words(70..80), 1.3)];
        let (chunks, _) = chunks_of(&parsed);
        assert_eq!(body(&chunks[1]), (70..80).collect::<Vec<_>>());
        assert_eq!(chunks[1].multipliers[1..11], [1.3; 10]);
    }

    #[test]
    fn break_starts_a_new_chunk() {
        let (chunks, count) = chunks_of(&parsed("1 2 BREAK 3"));
        assert_eq!(chunks.len(), 2);
        assert_eq!((body(&chunks[0]), body(&chunks[1])), (vec![1, 2], vec![3]));
        assert_eq!(count, 76);
        // A leading BREAK gives an empty first chunk.
        let (chunks, _) = chunks_of(&parsed("BREAK 1"));
        assert_eq!((chunks[0].clone(), body(&chunks[1])), (IDS.empty_chunk(), vec![1]));
    }

    #[test]
    fn sd2_pads_after_the_first_eos() {
        let (chunks, _) = chunks_of(&[("1 2".into(), 1.0)]);
        let ids = chunk_input_ids(&chunks[0], 49407, 0);
        assert_eq!(ids[..4], [49406, 1, 2, 49407]);
        assert!(ids[4..].iter().all(|&id| id == 0));
        assert_eq!(chunk_input_ids(&chunks[0], 49407, 49407), chunks[0].tokens);
    }
}
