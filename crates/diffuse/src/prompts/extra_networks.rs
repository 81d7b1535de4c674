//! AUTOMATIC1111's extra-network tags (`<lora:name:0.8>`, `<hypernet:name>`), port of
//! modules/extra_networks.py `parse_prompt` and `ExtraNetworkParams`: every match of
//! `<(\w+):([^>]+)>` is cut out of the prompt (replaced by nothing), so the tag's text never
//! reaches the tokenizer, and its arguments are split at `:` into positional values and
//! `key=value` pairs. AUTOMATIC1111 reads tags in the positive prompt only.

use std::collections::BTreeMap;

/// One `<kind:args>` tag of a prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct ExtraNetworkTag {
    /// `lora`, `lyco`, `hypernet`, ...
    pub kind: String,
    /// The arguments that are not `key=value`, in order (the first is the network's name).
    pub positional: Vec<String>,
    /// The `key=value` arguments (`te=`, `unet=`, ...).
    pub named: BTreeMap<String, String>,
    /// The tag as written, for messages.
    pub text: String,
}

impl ExtraNetworkTag {
    /// AUTOMATIC1111 loads `lyco` tags with its LoRA network too.
    pub fn is_lora(&self) -> bool {
        self.kind == "lora" || self.kind == "lyco"
    }
}

/// The prompt without its tags, and the tags in order.
pub fn parse_prompt(prompt: &str) -> (String, Vec<ExtraNetworkTag>) {
    let mut text = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find('<') {
        text.push_str(&rest[..start]);
        match tag_at(&rest[start..]) {
            Some((tag, length)) => {
                tags.push(tag);
                rest = &rest[start + length..];
            }
            None => {
                text.push('<');
                rest = &rest[start + 1..];
            }
        }
    }
    text.push_str(rest);
    (text, tags)
}

/// The tag `s` starts with, and its length in bytes: `<`, word characters (Python's `\w`:
/// letters, digits, `_`), `:`, one or more characters other than `>`, `>`.
fn tag_at(s: &str) -> Option<(ExtraNetworkTag, usize)> {
    let body = s.strip_prefix('<')?;
    let kind_end = body.find(|c: char| !(c.is_alphanumeric() || c == '_'))?;
    if kind_end == 0 || !body[kind_end..].starts_with(':') {
        return None;
    }
    let args_start = kind_end + 1;
    let args_len = body[args_start..].find('>')?;
    if args_len == 0 {
        return None;
    }
    let args = &body[args_start..args_start + args_len];
    let mut positional = Vec::new();
    let mut named = BTreeMap::new();
    for item in args.split(':') {
        // `item.split('=', 2)`: exactly two parts make a named argument.
        let parts: Vec<&str> = item.splitn(3, '=').collect();
        match parts.as_slice() {
            [key, value] => {
                named.insert(key.to_string(), value.to_string());
            }
            _ => positional.push(item.to_string()),
        }
    }
    let length = 1 + args_start + args_len + 1;
    let tag = ExtraNetworkTag { kind: body[..kind_end].to_string(), positional, named, text: s[..length].to_string() };
    Some((tag, length))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_cut_out() {
        let (text, tags) = parse_prompt("a cat, <lora:style_v2:0.8>, <hypernet:x> <b>bold</b> a<3 <lora:y:te=0.5:unet=1.5>");
        assert_eq!(text, "a cat, ,  <b>bold</b> a<3 ");
        assert_eq!(tags.len(), 3);
        assert_eq!((tags[0].kind.as_str(), tags[0].positional.clone()), ("lora", vec!["style_v2".to_string(), "0.8".to_string()]));
        assert_eq!(tags[0].text, "<lora:style_v2:0.8>");
        assert!(tags[0].is_lora() && !tags[1].is_lora());
        assert_eq!(tags[2].named.get("te").map(String::as_str), Some("0.5"));
        assert_eq!(tags[2].positional, vec!["y".to_string()]);
        // `a=b=c` is three parts: positional, as in Python.
        assert_eq!(parse_prompt("<lora:a=b=c>").1[0].positional, vec!["a=b=c".to_string()]);
        assert_eq!(parse_prompt("<lora:>x<:a>y<lora x>").0, "<lora:>x<:a>y<lora x>");
        assert_eq!(parse_prompt("ünï <lyco:名前:1>").0, "ünï ");
    }
}
