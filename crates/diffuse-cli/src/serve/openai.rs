//! OpenAI's Images API: `POST /v1/images/generations`, `POST /v1/images/edits` (multipart:
//! the image, an optional mask whose transparent pixels are repainted, as OpenAI's) and
//! `GET /v1/models`. Images come back as `b64_json`; `response_format: "url"` is refused with
//! a 400 (the server keeps no image store). diffuse's own settings are accepted as extra
//! fields: negative_prompt, steps, seed, guidance_scale, sampler (an AUTOMATIC1111 name) or
//! scheduler (a diffuse name).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::multipart::MultipartRejection;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Multipart, State};
use axum::http::StatusCode;
use axum::Json;
use diffuse::pipelines::image_processor::Image8;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::a1111::run_to_end;
use super::http::{parse_json, ApiError};
use super::jobs::{GenerateRequest, InitImage, Origin, Shared};
use super::native::{check, map_sampler, model_index, seed, whole};

#[derive(Deserialize, Default)]
struct Generation {
    model: Option<String>,
    prompt: Option<String>,
    n: Option<i64>,
    size: Option<String>,
    response_format: Option<String>,
    negative_prompt: Option<String>,
    steps: Option<i64>,
    seed: Option<Value>,
    guidance_scale: Option<f64>,
    sampler: Option<String>,
    scheduler: Option<String>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

fn openai_param(name: &'static str) -> &'static str {
    match name {
        "batch_size" => "n",
        "width" | "height" => "size",
        "strength" => "strength",
        other => other,
    }
}

/// `WxH` (or `auto`, the model's own size).
fn parse_size(size: Option<&str>) -> Result<(Option<usize>, Option<usize>), ApiError> {
    let Some(size) = size.filter(|s| *s != "auto") else { return Ok((None, None)) };
    let parsed = size.split_once(['x', 'X']).and_then(|(w, h)| Some((w.trim().parse::<usize>().ok()?, h.trim().parse::<usize>().ok()?)));
    match parsed {
        Some((w, h)) => Ok((Some(w), Some(h))),
        None => Err(ApiError::bad("size", format!("size must be WIDTHxHEIGHT (e.g. 512x512) or auto, got `{size}`"))),
    }
}

impl Generation {
    fn into_request(self, shared: &Shared) -> Result<GenerateRequest, ApiError> {
        if self.response_format.as_deref().is_some_and(|f| f != "b64_json") {
            return Err(ApiError::bad(
                "response_format",
                format!("response_format `{}` is not served: this server answers with b64_json only", self.response_format.unwrap_or_default()),
            ));
        }
        let prompt = self.prompt.ok_or_else(|| ApiError::bad("prompt", "prompt is required"))?;
        let model = model_index(shared, self.model.as_deref(), "model")?;
        let mut request = GenerateRequest::new(shared, model);
        request.prompt = prompt;
        request.negative_prompt = self.negative_prompt;
        request.batch_size = whole("n", self.n, 1, 1)?;
        (request.width, request.height) = parse_size(self.size.as_deref())?;
        request.steps = whole("steps", self.steps, request.steps, 0)?;
        request.guidance_scale = self.guidance_scale.unwrap_or(request.guidance_scale);
        if let Some(seed) = seed("seed", self.seed.as_ref())? {
            request.seed = seed;
        }
        match (self.scheduler, self.sampler) {
            (Some(name), _) => request.scheduler = Some(name),
            (None, Some(sampler)) => map_sampler(&mut request, &sampler, None, "sampler", "sampler")?,
            (None, None) => {}
        }
        request.ignored_fields = self.extra.keys().cloned().collect();
        Ok(request)
    }
}

async fn answer(shared: Arc<Shared>, request: GenerateRequest) -> Result<Json<Value>, ApiError> {
    check(&shared, &request, &openai_param)?;
    let job = run_to_end(&shared, request, Origin::OpenAi).await?;
    let state = job.state();
    let data: Vec<Value> = state
        .images
        .iter()
        .map(|image| json!({ "b64_json": image.base64(), "revised_prompt": null, "seed": image.seed, "infotext": image.infotext }))
        .collect();
    let created = job.created.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    drop(state);
    job.forget_images();
    Ok(Json(json!({ "created": created, "data": data })))
}

/// POST /v1/images/generations.
pub async fn generations(State(shared): State<Arc<Shared>>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let generation: Generation = parse_json(body)?;
    let request = generation.into_request(&shared)?;
    answer(shared, request).await
}

/// The mask OpenAI means: where the mask (or the image itself) is transparent is repainted.
/// diffuse's masks are white where repainted; a mask without transparency is taken as one.
fn mask_from(param: &str, bytes: &[u8]) -> Result<Option<Image8>, ApiError> {
    let decoded = image::load_from_memory(bytes).map_err(|e| ApiError::bad(param, format!("{param}: cannot decode the image: {e}")))?;
    let (width, height) = (decoded.width() as usize, decoded.height() as usize);
    if decoded.color().has_alpha() {
        let rgba = decoded.into_rgba8();
        if rgba.pixels().all(|p| p.0[3] == 255) {
            return if param == "image" { Ok(None) } else { Image8::decode_rgb(bytes, param).map(Some).map_err(|e| ApiError::bad(param, e.to_string())) };
        }
        let pixels = rgba.pixels().flat_map(|p| [255 - p.0[3]; 3]).collect();
        return Ok(Some(Image8 { width, height, channels: 3, pixels }));
    }
    if param == "image" {
        return Ok(None);
    }
    Image8::decode_rgb(bytes, param).map(Some).map_err(|e| ApiError::bad(param, e.to_string()))
}

/// POST /v1/images/edits (multipart/form-data: image, mask, prompt, n, size, model, ...).
pub async fn edits(State(shared): State<Arc<Shared>>, multipart: Result<Multipart, MultipartRejection>) -> Result<Json<Value>, ApiError> {
    let mut multipart = multipart.map_err(|e| ApiError::bad("body", format!("the body must be multipart/form-data: {}", e.body_text())))?;
    let mut fields = Map::new();
    let (mut image, mut mask) = (None, None);
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiError { param: Some("body".into()), ..ApiError::new(e.status(), "request_too_large", "the request body is larger than the server's --max-body-mb") })
            }
            Err(e) => return Err(ApiError::bad("body", format!("cannot read the multipart body: {}", e.body_text()))),
        };
        let name = field.name().unwrap_or_default().trim_end_matches("[]").to_string();
        let bytes = field.bytes().await.map_err(|e| ApiError::bad(&name, format!("cannot read the field {name}: {}", e.body_text())))?;
        match name.as_str() {
            "image" if image.is_none() => image = Some(bytes),
            "image" => {}
            "mask" => mask = Some(bytes),
            _ => {
                let text = String::from_utf8_lossy(&bytes).into_owned();
                let value = match name.as_str() {
                    "n" | "steps" | "seed" => text.trim().parse::<i64>().map(Value::from).map_err(|_| ApiError::bad(&name, format!("{name} must be a whole number, got `{text}`")))?,
                    "guidance_scale" => text.trim().parse::<f64>().map(Value::from).map_err(|_| ApiError::bad(&name, format!("{name} must be a number, got `{text}`")))?,
                    _ => Value::String(text),
                };
                fields.insert(name, value);
            }
        }
    }
    let image_bytes = image.ok_or_else(|| ApiError::bad("image", "image is required: the image to edit, as a multipart file"))?;
    let strength = match fields.remove("strength") {
        Some(value) => Some(value.as_str().and_then(|s| s.trim().parse::<f64>().ok()).ok_or_else(|| ApiError::bad("strength", "strength must be a number"))?),
        None => None,
    };
    let generation: Generation = super::http::from_value(Value::Object(fields))?;
    let mut request = generation.into_request(&shared)?;
    // Decoding images is work for a blocking thread, not the async runtime's.
    let decoded = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let init = Image8::decode_rgb(&image_bytes, "image").map_err(|e| ApiError::bad("image", e.to_string()))?;
        let mask = match &mask {
            Some(bytes) => mask_from("mask", bytes)?,
            None => mask_from("image", &image_bytes)?,
        };
        Ok((init, mask))
    })
    .await
    .map_err(|e| ApiError::internal(format!("the image decode failed: {e}")))?;
    let (init, mask) = decoded?;
    let strength = strength.unwrap_or(if mask.is_some() { 1.0 } else { 0.8 });
    request.init = Some(InitImage { image: init, mask, strength });
    answer(shared, request).await
}

/// GET /v1/models: the loaded models.
pub async fn models(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let data: Vec<Value> = shared.models().iter().map(|(_, m)| json!({ "id": m.name, "object": "model", "created": 0, "owned_by": "diffuse", "width": m.default_size.1, "height": m.default_size.0, "title": m.title() })).collect();
    Json(json!({ "object": "list", "data": data }))
}
