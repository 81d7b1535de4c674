//! Prompt syntaxes: how a prompt's text becomes the text encoder's input.

pub mod a1111;
pub mod extra_networks;

use crate::{Error, Result};

/// How prompts are read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PromptSyntax {
    /// diffusers': the text as it is, truncated to the tokenizer's 77 tokens (with a warning).
    #[default]
    Diffusers,
    /// The AUTOMATIC1111 web UI's: `(word)`, `[word]`, `(word:1.3)` weights, `BREAK`, and
    /// prompts of any length in 75-token chunks ([`a1111`]).
    A1111,
}

impl PromptSyntax {
    /// The names [`PromptSyntax::name`] gives, for help and errors.
    pub const NAMES: [&'static str; 2] = ["diffusers", "a1111"];

    /// The syntax's name: `diffusers` or `a1111`.
    pub fn name(self) -> &'static str {
        match self {
            PromptSyntax::Diffusers => "diffusers",
            PromptSyntax::A1111 => "a1111",
        }
    }
}

impl std::str::FromStr for PromptSyntax {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        match name {
            "diffusers" => Ok(PromptSyntax::Diffusers),
            "a1111" => Ok(PromptSyntax::A1111),
            other => Err(Error::invalid(format!(
                "unknown prompt syntax `{other}`; valid names: {}",
                PromptSyntax::NAMES.join(", ")
            ))),
        }
    }
}
