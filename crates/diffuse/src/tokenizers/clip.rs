//! CLIP's byte-level BPE tokenizer, loaded from a Stable Diffusion `tokenizer/` folder.
//!
//! Port of transformers 5.x `CLIPTokenizer` (transformers/models/clip/tokenization_clip.py), as
//! `CLIPTokenizer.from_pretrained(folder)` loads it and as diffusers' pipelines call it:
//! `tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)`.
//!
//! The folder is the one SD 1.x/2.x have on the hub: `vocab.json`, `merges.txt`,
//! `tokenizer_config.json`, `special_tokens_map.json` (the last two optional, as in
//! transformers), plus `added_tokens.json` when textual-inversion tokens were saved with it.
//!
//! A prompt goes through these steps (`tokenization_clip.py` builds the same pipeline):
//! 1. Added tokens (`<|startoftext|>`, `<|endoftext|>`, the pad token, textual-inversion tokens)
//!    are cut out of the raw text first; those whose `normalized` flag is set are looked for
//!    again in the cleaned text, so there they match in any case.
//! 2. Clean-up: Unicode NFC, each run of whitespace becomes one space, lower-casing char by char
//!    (so a final capital sigma becomes `σ`, not `ς`).
//! 3. Pre-tokenizer: CLIP's regex [`CLIP_PRETOKENIZER_PATTERN`] keeps its matches and drops the
//!    rest (spaces). Each piece is split again by GPT-2's byte-level regex, which changes only a
//!    `<|startoftext|>`/`<|endoftext|>` that got this far (not cut out in step 1): `<|`, the word,
//!    `|>`. The piece's UTF-8 bytes are then mapped to GPT-2's printable characters.
//! 4. BPE: the pieces' symbols are merged by the ranks of `merges.txt`; a word's last symbol
//!    carries the `</w>` suffix.
//! 5. BOS, the first `model_max_length - 2` tokens, EOS, then the pad token up to
//!    `model_max_length`; the attention mask is 1 from BOS to EOS and 0 on the padding.
//!
//! Consequences worth knowing, all shared with transformers:
//! - SD 2.x pads with `!` (id 0). That registers `!` as a special token, so every `!` in an SD 2.x
//!   prompt becomes id 0 rather than the `!</w>` (256) that SD 1.x gets.
//! - SD 1.x's config makes `<|endoftext|>` non-normalized (its pad token is a plain string), so a
//!   typed `<|ENDOFTEXT|>` is text there, while SD 2.x matches it as the token in any case.
//! - HTML entities (`&amp;`) are not unescaped, and nothing is fixed by ftfy.
//!
//! # transformers 5.x, not the slow tokenizer of transformers 4.x
//! We match transformers 5.x, which is what diffusers runs with today, and whose `CLIPTokenizer`
//! is also transformers 4.x's `CLIPTokenizerFast`. diffusers with transformers 4.x used the slow
//! `CLIPTokenizer`, which agrees on everyday prompts (plain English, punctuation, digits,
//! a1111 weighting syntax, long prompts) but not on all text. On our 84 fixture prompts,
//! transformers 4.57 gives other ids for 14 with ftfy installed and 11 without
//! (`tools/fixtures/clip_tokenizer_v4_diff.py` lists them):
//! - with ftfy it runs `ftfy.fix_text` first, which unescapes HTML entities (`&amp;` → `&`),
//!   straightens curly quotes and turns full-width letters and ligatures into ASCII (`ﬁ` → `fi`);
//!   without ftfy it runs BERT's `BasicTokenizer` instead, which puts spaces around each CJK
//!   ideograph (`日本語のプロンプト` is read as `日 本 語 のプロンプト`);
//! - both drop control and format characters (`\x00`, U+FEFF, `\x0b`), which 5.x keeps as
//!   byte-level tokens (or, for `\x0b`, as whitespace), and lower-case with Python's
//!   `str.lower()`, which writes a word-final `σ` as `ς`;
//! - they match the regex case-insensitively (`'ſ` is a contraction like `'s`) and match
//!   `<|ENDOFTEXT|>` in any case with SD 1.x's files.
//!
//! # Why the `tokenizers` crate
//! It is Hugging Face's own implementation, the very code transformers 5.x runs underneath, so
//! the BPE, the byte-level mapping and the intricate added-token matching are the same code, not
//! a re-implementation. It costs no build time: candle-core already depends on it with the same
//! features (`default-features = false`, `fancy-regex`). Its regexes run on fancy-regex (the
//! `regex` crate) here instead of Oniguruma in the Python wheel; for these patterns (`\s`,
//! `\p{L}`, `\p{N}`) both use Unicode's definitions. What transformers does in Python — which
//! config file wins, the flags of each special token, truncation and padding — is ported here.
//!
//! Deliberate divergences: a missing `model_max_length` means 77 (transformers would use 10^30
//! and then fail to pad); `padding_side`/`truncation_side` other than `"right"` are rejected;
//! `decode` never applies `clean_up_tokenization_spaces` (transformers 5.x does not for BPE
//! tokenizers either); named extra tokens (`extra_special_tokens` as a dict, custom `*_token`
//! keys) are ignored.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use ::tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use ::tokenizers::models::bpe::{Merges, Vocab, BPE};
use ::tokenizers::normalizers::replace::ReplacePattern;
use ::tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use ::tokenizers::pre_tokenizers::byte_level::ByteLevel;
use ::tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use ::tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use ::tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};
use candle_core::{Device, Tensor};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::loading::config::{parse_config, read_json_object};
use crate::{Error, Result};

/// CLIP's pre-tokenizer: the special tokens, English contractions, runs of letters, single
/// digits, runs of anything else but whitespace. (The original CLIP code compiles it
/// case-insensitively; transformers 5.x applies it, case-sensitively, to lower-cased text.)
pub const CLIP_PRETOKENIZER_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The context length of every CLIP text encoder in Stable Diffusion.
const DEFAULT_MODEL_MAX_LENGTH: usize = 77;

/// Longest `model_max_length` we agree to pad to (configs use 10^30 to mean "no limit").
const MAX_MODEL_MAX_LENGTH: usize = 1 << 16;

/// transformers' named special tokens, in the order it registers them (a later registration of
/// the same text wins).
const NAMED_SPECIAL_TOKENS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// `CLIPTokenizer.__init__`'s defaults.
fn clip_default_token(key: &str) -> Option<&'static str> {
    match key {
        "bos_token" => Some("<|startoftext|>"),
        "eos_token" | "unk_token" | "pad_token" => Some("<|endoftext|>"),
        _ => None,
    }
}

/// A special token in a config file: plain text, or an `AddedToken` object with flags.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "a string or an AddedToken object with a `content`")]
enum TokenSpec {
    Content(String),
    Token(TokenFlags),
}

impl TokenSpec {
    fn content(&self) -> &str {
        match self {
            TokenSpec::Content(content) => content,
            TokenSpec::Token(flags) => &flags.content,
        }
    }
}

/// An `AddedToken` as serialised by transformers (`"__type": "AddedToken"` is ignored).
/// Unset `normalized`/`special` take the defaults of the place the token comes from.
#[derive(Debug, Clone, Deserialize)]
struct TokenFlags {
    content: String,
    #[serde(default)]
    single_word: bool,
    #[serde(default)]
    lstrip: bool,
    #[serde(default)]
    rstrip: bool,
    normalized: Option<bool>,
    special: Option<bool>,
}

impl TokenFlags {
    fn plain(content: &str) -> Self {
        TokenFlags {
            content: content.to_string(),
            single_word: false,
            lstrip: false,
            rstrip: false,
            normalized: None,
            special: None,
        }
    }

    /// The token with `special` decided; python's `AddedToken` computes an unset `normalized`
    /// from `special` when the token is registered.
    fn to_added_token(&self, special: bool) -> AddedToken {
        AddedToken {
            content: self.content.clone(),
            single_word: self.single_word,
            lstrip: self.lstrip,
            rstrip: self.rstrip,
            normalized: self.normalized.unwrap_or(!special),
            special,
        }
    }
}

/// The special-token keys shared by `tokenizer_config.json` and `special_tokens_map.json`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SpecialTokens {
    bos_token: Option<TokenSpec>,
    eos_token: Option<TokenSpec>,
    unk_token: Option<TokenSpec>,
    sep_token: Option<TokenSpec>,
    pad_token: Option<TokenSpec>,
    cls_token: Option<TokenSpec>,
    mask_token: Option<TokenSpec>,
    additional_special_tokens: Option<Vec<TokenSpec>>,
}

impl SpecialTokens {
    fn named(&self, key: &str) -> Option<&TokenSpec> {
        match key {
            "bos_token" => self.bos_token.as_ref(),
            "eos_token" => self.eos_token.as_ref(),
            "unk_token" => self.unk_token.as_ref(),
            "sep_token" => self.sep_token.as_ref(),
            "pad_token" => self.pad_token.as_ref(),
            "cls_token" => self.cls_token.as_ref(),
            "mask_token" => self.mask_token.as_ref(),
            _ => None,
        }
    }
}

/// `tokenizer_config.json`, the keys we use besides its [`SpecialTokens`].
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TokenizerConfig {
    /// transformers 5.x's name for `additional_special_tokens` (a list; a dict is ignored).
    extra_special_tokens: Option<Value>,
    /// id (as a string) → token; written by transformers ≥ 4.34.
    added_tokens_decoder: Option<BTreeMap<String, TokenFlags>>,
    model_max_length: Option<usize>,
    padding_side: Option<String>,
    truncation_side: Option<String>,
}

/// `tokenizer.json`, the parts we use: the BPE model's tables and the added tokens (its
/// normalizer and pre-tokenizer are CLIP's, which we build ourselves as transformers does).
#[derive(Debug, Deserialize)]
struct TokenizerJson {
    model: TokenizerJsonModel,
    #[serde(default)]
    added_tokens: Vec<TokenizerJsonAddedToken>,
}

#[derive(Debug, Deserialize)]
struct TokenizerJsonModel {
    #[serde(rename = "type")]
    kind: Option<String>,
    vocab: HashMap<String, u32>,
    merges: Vec<MergeSpec>,
}

/// A merge as tokenizers writes it: `["a", "b"]`, or `"a b"` in older files.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a merge: [\"left\", \"right\"] or \"left right\"")]
enum MergeSpec {
    Pair(String, String),
    Joined(String),
}

#[derive(Debug, Deserialize)]
struct TokenizerJsonAddedToken {
    id: u32,
    #[serde(flatten)]
    flags: TokenFlags,
}

/// One prompt, tokenized for the text encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClipEncoding {
    /// `model_max_length` ids: BOS, the prompt's tokens, EOS, then the pad token.
    pub input_ids: Vec<u32>,
    /// 1 from BOS to EOS, 0 on the padding.
    pub attention_mask: Vec<u32>,
    /// The prompt's tokens that did not fit, in order (diffusers warns "The following part of
    /// your input was truncated": `decode` them to show what).
    pub truncated_ids: Vec<u32>,
}

impl ClipEncoding {
    /// Whether the prompt was longer than the model takes.
    pub fn was_truncated(&self) -> bool {
        !self.truncated_ids.is_empty()
    }
}

/// CLIP's tokenizer as a Stable Diffusion folder configures it.
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos_token_id: u32,
    eos_token_id: u32,
    pad_token_id: u32,
    model_max_length: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_id", &self.eos_token_id)
            .field("pad_token_id", &self.pad_token_id)
            .field("model_max_length", &self.model_max_length)
            .finish()
    }
}

impl ClipTokenizer {
    /// Loads a `tokenizer/` folder: vocab.json and merges.txt (or, as transformers 5.x saves it,
    /// tokenizer.json, which wins when both are there, as in transformers), and the optional
    /// tokenizer_config.json, special_tokens_map.json, added_tokens.json.
    pub fn from_folder(folder: impl AsRef<Path>) -> Result<Self> {
        let folder = folder.as_ref();
        let config_path = folder.join("tokenizer_config.json");
        let (config, config_special): (TokenizerConfig, SpecialTokens) = match read_optional_json(&config_path)? {
            Some(map) => (parse_config(&map, &config_path)?, parse_config(&map, &config_path)?),
            None => Default::default(),
        };
        let map_path = folder.join("special_tokens_map.json");
        // transformers reads special_tokens_map.json only for configs without `added_tokens_decoder`.
        let special_map: Option<SpecialTokens> = match &config.added_tokens_decoder {
            Some(_) => None,
            None => read_optional_json(&map_path)?.map(|map| parse_config(&map, &map_path)).transpose()?,
        };
        let (vocab, merges, tokenizer_json_tokens) = read_vocab_and_merges(folder)?;
        // Tokens by id that transformers reads only when the config has no added_tokens_decoder.
        let mut legacy_tokens = BTreeMap::new();
        if config.added_tokens_decoder.is_none() {
            legacy_tokens.extend(read_added_tokens_json(&folder.join("added_tokens.json"))?);
            legacy_tokens.extend(tokenizer_json_tokens);
        }
        Self::configure(vocab, merges, config, config_special, &config_path, special_map, legacy_tokens, folder)
    }

    /// A tokenizer from a vocabulary and merges already in memory, configured by a
    /// `tokenizer_config.json` and a `special_tokens_map.json` embedded in the library (as
    /// from_folder reads them); `origin` names them in errors. For the built-in tokenizers.
    pub(crate) fn from_parts(
        vocab: Vocab,
        merges: Merges,
        tokenizer_config: &'static str,
        special_tokens_map: &'static str,
        origin: &Path,
    ) -> Result<Self> {
        let config_path = origin.join("tokenizer_config.json");
        let config_map = crate::configs::parse(tokenizer_config);
        let (config, config_special): (TokenizerConfig, SpecialTokens) =
            (parse_config(&config_map, &config_path)?, parse_config(&config_map, &config_path)?);
        let special_map: Option<SpecialTokens> = match &config.added_tokens_decoder {
            Some(_) => None,
            None => Some(parse_config(&crate::configs::parse(special_tokens_map), &origin.join("special_tokens_map.json"))?),
        };
        Self::configure(vocab, merges, config, config_special, &config_path, special_map, BTreeMap::new(), origin)
    }

    /// What from_folder and from_parts share once the files are read: transformers' choice of
    /// special tokens, the tokenizers pipeline, and the ids of the named tokens.
    #[allow(clippy::too_many_arguments)]
    fn configure(
        vocab: Vocab,
        merges: Merges,
        config: TokenizerConfig,
        config_special: SpecialTokens,
        config_path: &Path,
        special_map: Option<SpecialTokens>,
        legacy_tokens: BTreeMap<u32, TokenFlags>,
        folder: &Path,
    ) -> Result<Self> {
        for (key, side) in [("padding_side", &config.padding_side), ("truncation_side", &config.truncation_side)] {
            if let Some(side) = side.as_deref().filter(|&side| side != "right") {
                return Err(Error::config(config_path, format!("`{key}`: only \"right\" is supported, got {side:?}")));
            }
        }
        let model_max_length = config.model_max_length.unwrap_or(DEFAULT_MODEL_MAX_LENGTH);
        if !(2..=MAX_MODEL_MAX_LENGTH).contains(&model_max_length) {
            return Err(Error::config(
                config_path,
                format!("`model_max_length`: {model_max_length} is not a usable length (2..={MAX_MODEL_MAX_LENGTH})"),
            ));
        }
        let tokens = resolve_added_tokens(&config, &config_special, config_path, special_map.as_ref(), legacy_tokens)?;
        let tokenizer = build_pipeline(vocab, merges, &tokens, folder)?;

        let id_of = |key: &str| -> Result<u32> {
            let content = &tokens.named[key];
            tokenizer
                .token_to_id(content)
                .ok_or_else(|| Error::config(config_path, format!("`{key}` {content:?} has no id")))
        };
        Ok(ClipTokenizer {
            bos_token_id: id_of("bos_token")?,
            eos_token_id: id_of("eos_token")?,
            pad_token_id: id_of("pad_token")?,
            model_max_length,
            tokenizer,
        })
    }

    /// The start-of-text token `<|startoftext|>`.
    pub fn bos_token_id(&self) -> u32 {
        self.bos_token_id
    }
    /// The end-of-text token `<|endoftext|>`.
    pub fn eos_token_id(&self) -> u32 {
        self.eos_token_id
    }
    /// The padding token (the EOS for SD 1.x's tokenizer, `!` for SD 2.x's).
    pub fn pad_token_id(&self) -> u32 {
        self.pad_token_id
    }
    /// The length every encoding is padded or truncated to (77 for Stable Diffusion).
    pub fn model_max_length(&self) -> usize {
        self.model_max_length
    }

    /// The prompt's token ids, without BOS/EOS and without truncation.
    pub fn tokenize(&self, prompt: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|e| Error::invalid(format!("cannot tokenize {prompt:?}: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// BOS + the prompt's tokens + EOS, without truncation or padding (diffusers' "untruncated
    /// ids"; also what long-prompt schemes split into chunks).
    pub fn encode_untruncated(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut ids = vec![self.bos_token_id];
        ids.extend(self.tokenize(prompt)?);
        ids.push(self.eos_token_id);
        Ok(ids)
    }

    /// One prompt as the text encoder takes it: truncated and padded to `model_max_length`.
    pub fn encode(&self, prompt: &str) -> Result<ClipEncoding> {
        let mut tokens = self.tokenize(prompt)?;
        let room = self.model_max_length - 2;
        let truncated_ids = tokens.split_off(room.min(tokens.len()));
        let mut input_ids = Vec::with_capacity(self.model_max_length);
        input_ids.push(self.bos_token_id);
        input_ids.extend(tokens);
        input_ids.push(self.eos_token_id);
        let mut attention_mask = vec![1; input_ids.len()];
        attention_mask.resize(self.model_max_length, 0);
        input_ids.resize(self.model_max_length, self.pad_token_id);
        Ok(ClipEncoding { input_ids, attention_mask, truncated_ids })
    }

    /// A batch of prompts, each as [`encode`](Self::encode) gives it.
    pub fn encode_batch<S: AsRef<str>>(&self, prompts: &[S]) -> Result<Vec<ClipEncoding>> {
        prompts.iter().map(|prompt| self.encode(prompt.as_ref())).collect()
    }

    /// Text for ids, as transformers' `decode`: byte-level decoding, `</w>` read as a space,
    /// surrounding whitespace stripped. Ids outside the vocabulary are skipped.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text = self
            .tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::invalid(format!("cannot decode {ids:?}: {e}")))?;
        Ok(python_strip(&text.replace("</w>", " ")).to_string())
    }
}

/// The input ids of a batch as a `(batch, model_max_length)` u32 tensor.
pub fn input_ids_tensor(encodings: &[ClipEncoding], device: &Device) -> Result<Tensor> {
    stack_rows(encodings.iter().map(|e| e.input_ids.as_slice()).collect(), device)
}

/// The attention masks of a batch as a `(batch, model_max_length)` u32 tensor.
pub fn attention_mask_tensor(encodings: &[ClipEncoding], device: &Device) -> Result<Tensor> {
    stack_rows(encodings.iter().map(|e| e.attention_mask.as_slice()).collect(), device)
}

fn stack_rows(rows: Vec<&[u32]>, device: &Device) -> Result<Tensor> {
    let width = rows.first().map_or(0, |row| row.len());
    Ok(Tensor::from_vec(rows.concat(), (rows.len(), width), device)?)
}

/// Python's `str.strip()`: it also strips U+001C..U+001F, which Rust's `trim` keeps.
fn python_strip(text: &str) -> &str {
    text.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

fn read_optional_json(path: &Path) -> Result<Option<Map<String, Value>>> {
    if path.exists() {
        read_json_object(path).map(Some)
    } else {
        Ok(None)
    }
}

/// The BPE vocabulary and merges, from tokenizer.json if there is one, else from vocab.json and
/// merges.txt; plus tokenizer.json's added tokens by id.
fn read_vocab_and_merges(folder: &Path) -> Result<(Vocab, Merges, BTreeMap<u32, TokenFlags>)> {
    let json_path = folder.join("tokenizer.json");
    if json_path.exists() {
        let file: TokenizerJson = parse_config(&read_json_object(&json_path)?, &json_path)?;
        if file.model.kind.as_deref().is_some_and(|kind| kind != "BPE") {
            return Err(Error::config(&json_path, format!("`model.type`: expected \"BPE\", got {:?}", file.model.kind)));
        }
        let vocab: Vocab = file.model.vocab.into_iter().collect();
        let mut merges = Merges::new();
        for (index, merge) in file.model.merges.into_iter().enumerate() {
            let (left, right) = match merge {
                MergeSpec::Pair(left, right) => (left, right),
                MergeSpec::Joined(line) => split_merge(&line)
                    .map(|(left, right)| (left.to_string(), right.to_string()))
                    .ok_or_else(|| Error::config(&json_path, format!("`model.merges[{index}]`: {line:?} is not two symbols")))?,
            };
            check_merge(&vocab, &left, &right)
                .map_err(|what| Error::config(&json_path, format!("`model.merges[{index}]`: {what}")))?;
            merges.push((left, right));
        }
        let added = file.added_tokens.into_iter().map(|token| (token.id, token.flags)).collect();
        return Ok((vocab, merges, added));
    }
    let vocab = read_vocab(&folder.join("vocab.json"))?;
    let merges = read_merges(&folder.join("merges.txt"), &vocab)?;
    Ok((vocab, merges, BTreeMap::new()))
}

/// `vocab.json`: token → id.
fn read_vocab(path: &Path) -> Result<Vocab> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let vocab: HashMap<String, u32> = serde_json::from_str(&text)
        .map_err(|e| Error::config(path, format!("expected a JSON object of token → id: {e}")))?;
    Ok(vocab.into_iter().collect())
}

/// `merges.txt`: a `#version` header, then one merge a line, "left right", highest priority
/// first.
fn read_merges(path: &Path, vocab: &Vocab) -> Result<Merges> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_merges(&text, vocab, path)
}

/// The text of a `merges.txt`; `path` names it in errors.
pub(crate) fn parse_merges(text: &str, vocab: &Vocab, path: &Path) -> Result<Merges> {
    let mut merges = Merges::new();
    for (index, line) in text.lines().enumerate() {
        // Only the header is a comment: "# #" is a real merge (of two '#').
        if line.starts_with("#version") || line.is_empty() {
            continue;
        }
        let bad = |what: String| Error::config(path, format!("line {}: {what}", index + 1));
        let (left, right) =
            split_merge(line).ok_or_else(|| bad(format!("expected two symbols separated by one space, got {line:?}")))?;
        check_merge(vocab, left, right).map_err(bad)?;
        merges.push((left.to_string(), right.to_string()));
    }
    Ok(merges)
}

fn split_merge(line: &str) -> Option<(&str, &str)> {
    line.split_once(' ').filter(|(left, right)| !left.is_empty() && !right.is_empty() && !right.contains(' '))
}

/// Both symbols of a merge and their concatenation must be in the vocabulary.
fn check_merge(vocab: &Vocab, left: &str, right: &str) -> std::result::Result<(), String> {
    for symbol in [left.to_string(), right.to_string(), format!("{left}{right}")] {
        if !vocab.contains_key(&symbol) {
            return Err(format!("{symbol:?} is not in the vocabulary"));
        }
    }
    Ok(())
}

/// The legacy `added_tokens.json`: text → id. Such a token is special (and then not normalized)
/// only if a named token has its text.
fn read_added_tokens_json(path: &Path) -> Result<BTreeMap<u32, TokenFlags>> {
    let Some(map) = read_optional_json(path)? else {
        return Ok(BTreeMap::new());
    };
    let mut tokens = BTreeMap::new();
    for (content, id) in map {
        let id = id
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| Error::config(path, format!("{content:?}: {id} is not a token id")))?;
        tokens.insert(id, TokenFlags::plain(&content));
    }
    Ok(tokens)
}

/// The added tokens in the order transformers registers them, and the text of each named one.
struct AddedTokens {
    in_order: Vec<AddedToken>,
    /// bos_token, eos_token, unk_token, pad_token (always), and any other named one the files give.
    named: HashMap<&'static str, String>,
}

/// Which special tokens a folder defines and with which flags, as transformers 5.x's
/// `from_pretrained` (tokenization_utils_base.py `_from_pretrained`), `TokenizersBackend.__init__`
/// and `_post_init` work it out:
/// - `special_tokens_map.json` overrides `tokenizer_config.json`, unless the config has an
///   `added_tokens_decoder`, in which case the map file is not read at all;
/// - a named token whose text is in `added_tokens_decoder` (or else in added_tokens.json or
///   tokenizer.json's `added_tokens`) takes that entry's flags;
/// - named tokens are special; given as plain text they are not `normalized`;
/// - tokens are registered in the order: added_tokens_decoder (by id), named ones (bos, eos,
///   unk, sep, pad, cls, mask), additional special tokens; a later registration of the same text
///   replaces the earlier one's flags.
fn resolve_added_tokens(
    config: &TokenizerConfig,
    config_special: &SpecialTokens,
    config_path: &Path,
    special_map: Option<&SpecialTokens>,
    legacy_tokens: BTreeMap<u32, TokenFlags>,
) -> Result<AddedTokens> {
    // Tokens by id: added_tokens_decoder, or else added_tokens.json and tokenizer.json's.
    let mut by_id = legacy_tokens;
    if let Some(decoder) = &config.added_tokens_decoder {
        for (id, flags) in decoder {
            let id = id.parse::<u32>().map_err(|_| {
                Error::config(config_path, format!("`added_tokens_decoder`: key {id:?} is not a token id"))
            })?;
            by_id.insert(id, flags.clone());
        }
    }
    let by_text: HashMap<&str, &TokenFlags> = by_id.values().map(|flags| (flags.content.as_str(), flags)).collect();

    // Named tokens: the map file wins over the config; an entry by id with the same text
    // replaces them; CLIP's defaults fill the gaps.
    let mut named_specs: Vec<(&'static str, TokenSpec)> = Vec::new();
    for key in NAMED_SPECIAL_TOKENS {
        let given = special_map.and_then(|map| map.named(key)).or_else(|| config_special.named(key));
        let spec = match given {
            Some(spec) => match by_text.get(spec.content()) {
                Some(flags) => TokenSpec::Token((*flags).clone()),
                None => spec.clone(),
            },
            None => match clip_default_token(key) {
                Some(content) => TokenSpec::Content(content.to_string()),
                None => continue,
            },
        };
        named_specs.push((key, spec));
    }
    let named: HashMap<&'static str, String> =
        named_specs.iter().map(|(key, spec)| (*key, spec.content().to_string())).collect();
    let named_texts: HashSet<&str> = named.values().map(String::as_str).collect();

    let mut in_order = Vec::new();
    for flags in by_id.values() {
        let special = flags.special.unwrap_or(false) || named_texts.contains(flags.content.as_str());
        in_order.push(flags.to_added_token(special));
    }
    for (_, spec) in &named_specs {
        in_order.push(match spec {
            TokenSpec::Content(content) => AddedToken::from(content.clone(), true),
            TokenSpec::Token(flags) => flags.to_added_token(true),
        });
    }
    // Additional special tokens: the config's list, then those of the map file it lacks.
    // Plain text is special; an object is special only if it says so (from the config) or
    // always (from the map file, which transformers reads with `special=True`).
    let config_extras = match (&config_special.additional_special_tokens, &config.extra_special_tokens) {
        (Some(list), _) => list.clone(),
        (None, Some(value @ Value::Array(_))) => serde_json::from_value(value.clone())
            .map_err(|e| Error::config(config_path, format!("`extra_special_tokens`: {e}")))?,
        _ => Vec::new(),
    };
    let map_extras = special_map.and_then(|map| map.additional_special_tokens.clone()).unwrap_or_default();
    let mut seen = HashSet::new();
    let extras = config_extras.iter().map(|spec| (spec, false)).chain(map_extras.iter().map(|spec| (spec, true)));
    for (spec, from_map) in extras {
        if !seen.insert(spec.content().to_string()) {
            continue;
        }
        in_order.push(match spec {
            TokenSpec::Content(content) => AddedToken::from(content.clone(), true),
            TokenSpec::Token(flags) => flags.to_added_token(from_map || flags.special.unwrap_or(false)),
        });
    }
    Ok(AddedTokens { in_order, named })
}

/// The `tokenizers` pipeline of tokenization_clip.py's `CLIPTokenizer.__init__`.
fn build_pipeline(vocab: Vocab, merges: Merges, tokens: &AddedTokens, folder: &Path) -> Result<Tokenizer> {
    let fail = |what: &str, e: ::tokenizers::Error| Error::config(PathBuf::from(folder), format!("{what}: {e}"));
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(tokens.named["unk_token"].clone())
        .end_of_word_suffix("</w>".to_string())
        .build()
        .map_err(|e| fail("cannot build the BPE model from vocab.json and merges.txt", e))?;
    let mut tokenizer = Tokenizer::new(bpe);

    let collapse_whitespace = Replace::new(ReplacePattern::Regex(r"\s+".to_string()), " ").map_err(|e| fail("regex", e))?;
    let clean_up = NormalizerSequence::new(vec![NFC.into(), collapse_whitespace.into(), Lowercase.into()]);
    // Before the added tokens: their normalized forms are computed with it.
    tokenizer.with_normalizer(Some(clean_up)).map_err(|e| fail("normalizer", e))?;

    let clip_split = Split::new(
        SplitPattern::Regex(CLIP_PRETOKENIZER_PATTERN.to_string()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| fail("regex", e))?;
    // Python's `ByteLevel(add_prefix_space=False)`: trim_offsets and use_regex default to true.
    let byte_level = ByteLevel::new(false, true, true);
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![clip_split.into(), byte_level.into()])));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    tokenizer
        .add_tokens(tokens.in_order.iter().cloned())
        .map_err(|e| fail("cannot register the added tokens", e))?;
    Ok(tokenizer)
}
