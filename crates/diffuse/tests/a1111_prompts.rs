//! AUTOMATIC1111 prompt syntax through the Stable Diffusion pipeline (prompts/a1111.rs), on the
//! tiny SD 1.x / 2.x folders of tests/fixtures/sd with the real CLIP vocabulary. The parser and
//! the chunking rules are unit-tested in the module; here: a plain short prompt gives exactly
//! diffusers' embeddings, weights act as A1111's formula says (computed here from the unweighted
//! encoder output), long prompts are encoded chunk by chunk, the shorter of prompt and negative
//! prompt is padded with the empty prompt's chunk, and the UNet takes the longer context.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use diffuse::pipelines::stable_diffusion::{PhaseTimes, StableDiffusionPipeline, TextToImageOptions};
use diffuse::prompts::a1111::{self, chunk_prompt, parse_prompt_attention, ChunkTokens};
use diffuse::prompts::PromptSyntax;
use diffuse::rng::TorchGenerator;

fn pipeline(model: &str) -> StableDiffusionPipeline {
    let dir = fixtures_dir().join("sd").join(model);
    StableDiffusionPipeline::load(&dir, None, &[], None, &Device::Cpu, DType::F32).unwrap()
}

fn options(prompt: &str, negative: Option<&str>, syntax: PromptSyntax) -> TextToImageOptions {
    TextToImageOptions {
        prompt: prompt.to_string(),
        negative_prompt: negative.map(str::to_string),
        num_inference_steps: 2,
        height: Some(64),
        width: Some(64),
        prompt_syntax: syntax,
        ..Default::default()
    }
}

fn encode(pipeline: &StableDiffusionPipeline, options: &TextToImageOptions) -> Tensor {
    pipeline.encode_prompt(options, &mut |_| {}).unwrap().hidden
}

fn max_abs_difference(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// The plain embeddings `[1, 77, hidden]` of token ids.
fn encode_ids(pipeline: &StableDiffusionPipeline, ids: &[u32], clip_skip: Option<usize>) -> Tensor {
    let ids = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
    pipeline.text_encoder.encode(&ids, clip_skip).unwrap()
}

/// "a very detailed painting of item number 0, item number 1, ...": 40 items, 194 tokens (CLIP
/// reads each digit as a token).
fn long_prompt() -> String {
    let items: Vec<String> = (0..40).map(|i| format!("item number {i}")).collect();
    format!("a very detailed painting of {}", items.join(", "))
}

#[test]
fn a_short_plain_prompt_gives_the_diffusers_embeddings() {
    for model in ["sd1", "sd2"] {
        let pipeline = pipeline(model);
        for (prompt, negative, clip_skip) in
            [("a photo of a cat", Some("blurry, low quality"), None), ("", None, None), ("a red car, city", None, Some(1))]
        {
            let mut diffusers = options(prompt, negative, PromptSyntax::Diffusers);
            diffusers.clip_skip = clip_skip;
            let a1111 = TextToImageOptions { prompt_syntax: PromptSyntax::A1111, ..diffusers.clone() };
            let expected = encode(&pipeline, &diffusers);
            let actual = encode(&pipeline, &a1111);
            assert_eq!(actual.dims(), [2, 77, 16]);
            assert_eq!(max_abs_difference(&actual, &expected), 0.0, "{model} {prompt:?}");
        }
    }
}

/// `z * w` then rescaled to z's mean: A1111's EmphasisOriginal, in f64 from the plain output.
fn emphasis_expected(z: &Tensor, weights: &[f64]) -> Vec<f32> {
    let (_, tokens, hidden) = z.dims3().unwrap();
    let values = to_vec_f64(z);
    let weighted: Vec<f64> = values.iter().enumerate().map(|(i, v)| v * weights[i / hidden]).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let ratio = mean(&values) / mean(&weighted);
    assert_eq!(weights.len(), tokens);
    weighted.iter().map(|v| (v * ratio) as f32).collect()
}

#[test]
fn weights_multiply_token_embeddings_and_keep_the_mean() {
    for model in ["sd1", "sd2"] {
        let pipeline = pipeline(model);
        let prompt = "a ((photo)) of a [cat], (sunset:1.4)";
        // The weighted pieces tokenize to the plain prompt's tokens.
        let plain = pipeline.tokenizer.encode("a photo of a cat, sunset").unwrap();
        let parsed = parse_prompt_attention(prompt).unwrap();
        let ids = ChunkTokens::of(&pipeline.tokenizer).unwrap();
        let (chunks, count) = chunk_prompt(&parsed, ids, |text| pipeline.tokenizer.tokenize(text)).unwrap();
        assert_eq!((chunks.len(), count), (1, 7));
        let chunk_ids = a1111::chunk_input_ids(&chunks[0], pipeline.tokenizer.eos_token_id(), pipeline.tokenizer.pad_token_id());
        assert_eq!(chunk_ids, plain.input_ids, "{model}");

        // BOS, a, photo ×1.21, of, a, cat ÷1.1, ",", sunset ×1.4, EOS, padding.
        let mut weights = vec![1.0; 77];
        weights[2] = 1.1 * 1.1;
        weights[5] = 1.0 / 1.1;
        weights[7] = 1.4;
        assert_eq!(chunks[0].multipliers, weights, "{model}");

        let z = encode_ids(&pipeline, &plain.input_ids, None);
        let expected = Tensor::from_vec(emphasis_expected(&z, &weights), (1, 77, 16), &Device::Cpu).unwrap();
        let actual = a1111::encode_prompt(&pipeline.tokenizer, &pipeline.text_encoder, prompt, None).unwrap();
        assert_close(&actual, &expected, 1e-5, &format!("{model}: weighted embeddings"));
        assert!(max_abs_difference(&actual, &z) > 1e-3, "{model}: the weights changed nothing");
    }
}

#[test]
fn long_prompts_are_encoded_chunk_by_chunk() {
    for model in ["sd1", "sd2"] {
        let pipeline = pipeline(model);
        let tokenizer = &pipeline.tokenizer;
        let prompt = long_prompt();
        let tokens = tokenizer.tokenize(&prompt).unwrap();
        assert_eq!(tokens.len(), 194);
        let ids = ChunkTokens::of(tokenizer).unwrap();
        let (chunks, count) = chunk_prompt(&[(prompt.clone(), 1.0)], ids, |text| tokenizer.tokenize(text)).unwrap();
        // Each full chunk ends at its last comma (an item is at most 5 tokens with its comma),
        // so that no item is split between chunks; the prompt's tokens are all there, in order.
        assert_eq!(chunks.len(), 3);
        let bodies: Vec<Vec<u32>> = chunks
            .iter()
            .map(|c| c.tokens[1..76].iter().copied().filter(|&t| t != tokenizer.eos_token_id()).collect())
            .collect();
        assert_eq!(*bodies[0].last().unwrap(), ids.comma.unwrap());
        assert_eq!(*bodies[1].last().unwrap(), ids.comma.unwrap());
        assert_eq!(bodies.concat(), tokens);
        assert_eq!(count, 150 + bodies[2].len());

        let embeddings = a1111::encode_prompt(tokenizer, &pipeline.text_encoder, &prompt, None).unwrap();
        assert_eq!(embeddings.dims(), [1, 3 * 77, 16]);
        for (i, chunk) in chunks.iter().enumerate() {
            let chunk_ids = a1111::chunk_input_ids(chunk, tokenizer.eos_token_id(), tokenizer.pad_token_id());
            let expected = encode_ids(&pipeline, &chunk_ids, None);
            let actual = embeddings.narrow(1, 77 * i, 77).unwrap();
            assert_eq!(max_abs_difference(&actual, &expected), 0.0, "{model}: chunk {i}");
        }
    }
}

/// Chunk sizes and weights that A1111's tokenize_line gives for this prompt with SD 1.5's
/// tokenizer (its code run on these tokens): the BREAK ends the third chunk early, each full
/// chunk before it ends at a comma, and the weights land on their tokens.
#[test]
fn a_weighted_long_prompt_with_break_chunks_as_a1111() {
    let pipeline = pipeline("sd1");
    let tokenizer = &pipeline.tokenizer;
    let items: Vec<String> = (0..40).map(|i| format!("item number {i}")).collect();
    let items = items.join(", ");
    let prompt = format!("(masterpiece:1.2), best quality, {items} BREAK [ugly], ((sharp)), {items}");
    let parsed = parse_prompt_attention(&prompt).unwrap();
    let ids = ChunkTokens::of(tokenizer).unwrap();
    let (chunks, count) = chunk_prompt(&parsed, ids, |text| tokenizer.tokenize(text)).unwrap();
    let eos = tokenizer.eos_token_id();
    let lengths: Vec<usize> = chunks.iter().map(|c| c.tokens[1..76].iter().filter(|&&t| t != eos).count()).collect();
    assert_eq!((lengths, count), (vec![75, 75, 44, 74, 75, 44], 419));
    assert_eq!(chunks[0].multipliers[..3], [1.0, 1.2, 1.0]);
    assert_eq!(chunks[3].multipliers[..5], [1.0, 1.0 / 1.1, 1.0, 1.1 * 1.1, 1.0]);
    assert_eq!(chunks[3].tokens[1..5], [tokenizer.tokenize("ugly").unwrap()[0], 267, tokenizer.tokenize("sharp").unwrap()[0], 267]);
    let embeddings = a1111::encode_prompt(tokenizer, &pipeline.text_encoder, &prompt, None).unwrap();
    assert_eq!(embeddings.dims(), [1, 6 * 77, 16]);
}

#[test]
fn the_shorter_prompt_is_padded_with_empty_chunks() {
    let pipeline = pipeline("sd1");
    let long = long_prompt();
    let encode_a1111 = |prompt: &str, clip_skip| a1111::encode_prompt(&pipeline.tokenizer, &pipeline.text_encoder, prompt, clip_skip).unwrap();
    let empty = |clip_skip| encode_a1111("", clip_skip);

    // Long prompt, short negative prompt, two images: [negative ×2; prompt ×2].
    let mut request = options(&long, Some("blurry"), PromptSyntax::A1111);
    request.num_images_per_prompt = 2;
    request.clip_skip = Some(1);
    let embeddings = encode(&pipeline, &request);
    assert_eq!(embeddings.dims(), [4, 3 * 77, 16]);
    let negative = Tensor::cat(&[encode_a1111("blurry", None), empty(None), empty(None)], 1).unwrap();
    let positive = encode_a1111(&long, Some(1));
    for (row, expected) in [(0, &negative), (1, &negative), (2, &positive), (3, &positive)] {
        assert_eq!(max_abs_difference(&embeddings.narrow(0, row, 1).unwrap(), expected), 0.0, "row {row}");
    }

    // The other way round: the prompt (with its clip skip) is padded.
    let mut request = options("a cat", Some(&long), PromptSyntax::A1111);
    request.clip_skip = Some(1);
    let embeddings = encode(&pipeline, &request);
    let positive = Tensor::cat(&[encode_a1111("a cat", Some(1)), empty(Some(1)), empty(Some(1))], 1).unwrap();
    assert_eq!(max_abs_difference(&embeddings.narrow(0, 1, 1).unwrap(), &positive), 0.0);
    assert_eq!(max_abs_difference(&embeddings.narrow(0, 0, 1).unwrap(), &encode_a1111(&long, None)), 0.0);

    // diffusers' syntax truncates instead, and says so.
    let mut warnings = Vec::new();
    let truncated = pipeline.encode_prompt(&options(&long, None, PromptSyntax::Diffusers), &mut |w| warnings.push(w)).unwrap();
    assert_eq!(truncated.hidden.dims(), [2, 77, 16]);
    assert!(warnings.iter().any(|w| w.contains("truncated")), "{warnings:?}");
}

#[test]
fn the_unet_attends_over_several_chunks() {
    for model in ["sd1", "sd2"] {
        let mut pipeline = pipeline(model);
        // Context [z; z] holds each key twice: attention gives the same average as over [z].
        let z = encode_ids(&pipeline, &pipeline.tokenizer.encode("a photo of a cat").unwrap().input_ids, None);
        let twice = Tensor::cat(&[&z, &z], 1).unwrap();
        let sample = TorchGenerator::new(0).randn_tensor(&[1, 4, 8, 8], &Device::Cpu).unwrap();
        let t = Tensor::new(&[500f32], &Device::Cpu).unwrap();
        let once = pipeline.unet.forward(&sample, &t, &z).unwrap();
        let doubled = pipeline.unet.forward(&sample, &t, &twice).unwrap();
        assert_close(&doubled, &once, 1e-5, &format!("{model}: UNet with 154 context tokens"));

        // A whole generation with a 3-chunk prompt and a 1-chunk negative prompt.
        let request = options(&long_prompt(), Some("blurry"), PromptSyntax::A1111);
        let mut generator = TorchGenerator::new(1);
        let images = pipeline
            .generate(&request, &mut generator, &mut |_, _| {}, &mut |_| {}, &mut PhaseTimes::default())
            .unwrap();
        assert_eq!(images.dims(), [1, 3, 64, 64]);
        assert!(to_vec_f32(&images).iter().all(|v| v.is_finite()));
    }
}
