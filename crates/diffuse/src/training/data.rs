//! Training data: IDX files (the MNIST / Fashion-MNIST format, gzipped or not, with a labels
//! file) and image folders (with captions from diffusers' `metadata.jsonl` or kohya-style
//! sidecar `.txt` files, and optional class labels from sub-folder names), read one example at
//! a time; and the loader that shuffles them with a seed per epoch, converts them to the
//! model's channels and size, flips them at random, and batches them.
//!
//! Nothing holds the pixels of the whole dataset: an IDX file is read at the offset of each
//! example (a gzipped one is first decompressed to a cache file), an image folder keeps only
//! file names and captions.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::{bail, Error, Result};

/// An 8-bit image as stored: `channels` interleaved values per pixel (1 gray, 2 gray + alpha,
/// 3 RGB, 4 RGBA), rows top to bottom.
#[derive(Debug, Clone, PartialEq)]
pub struct RawImage {
    /// Pixels per row.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// Values per pixel (1 to 4).
    pub channels: usize,
    /// `height × width × channels` bytes.
    pub pixels: Vec<u8>,
}

/// One training example as a dataset returns it.
#[derive(Debug, Clone)]
pub struct Example {
    /// The image as stored.
    pub image: RawImage,
    /// The class label, when the data has labels.
    pub label: Option<usize>,
    /// The caption, when the data has captions.
    pub caption: Option<String>,
    /// What to call the example in errors (a file name, or `FILE[index]`).
    pub name: String,
}

/// A source of examples with random access.
pub trait Dataset: Send {
    /// The number of examples.
    fn len(&self) -> usize;
    /// Whether there are no examples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The example at `index` (below `len()`).
    fn get(&mut self, index: usize) -> Result<Example>;
    /// The number of classes, when examples have labels.
    fn num_classes(&self) -> Option<usize>;
    /// The class names, when the data names them (image folders' sub-folders).
    fn class_names(&self) -> Option<Vec<String>> {
        None
    }
    /// One line saying what the data is, for logs.
    fn describe(&self) -> String;
}

// ---- IDX files ----

/// The header of an IDX file: the element type code and the dimensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxHeader {
    /// The element type (0x08: unsigned bytes).
    pub type_code: u8,
    /// The dimensions, outermost first.
    pub dims: Vec<usize>,
}

impl IdxHeader {
    /// Magic (two zero bytes, the type, the number of dimensions), then each dimension as a
    /// big-endian u32.
    pub fn read(reader: &mut impl Read, origin: &Path) -> Result<Self> {
        let mut magic = [0u8; 4];
        reader.read_exact(&mut magic).map_err(|e| idx_error(origin, format!("cannot read the IDX header: {e}")))?;
        if magic[0] != 0 || magic[1] != 0 || magic[3] == 0 {
            return Err(idx_error(origin, format!("not an IDX file (magic bytes {magic:02x?})")));
        }
        let mut dims = Vec::with_capacity(magic[3] as usize);
        for _ in 0..magic[3] {
            let mut bytes = [0u8; 4];
            reader.read_exact(&mut bytes).map_err(|e| idx_error(origin, format!("truncated IDX header: {e}")))?;
            dims.push(u32::from_be_bytes(bytes) as usize);
        }
        Ok(Self { type_code: magic[2], dims })
    }

    /// The header's size in bytes.
    pub fn len(&self) -> usize {
        4 + 4 * self.dims.len()
    }

    /// Never: a header has at least its magic.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The number of data bytes that follow the header (unsigned bytes only); `None` when the
    /// dimensions' product overflows.
    pub fn data_len(&self) -> Option<u64> {
        self.dims.iter().try_fold(1u64, |product, &dim| product.checked_mul(dim as u64))
    }

    /// The length of the whole file the header describes, checked before anything is sized by
    /// the dimensions (a header can claim gigabytes in a file of a few bytes).
    fn file_len(&self, origin: &Path) -> Result<u64> {
        self.data_len()
            .and_then(|data| data.checked_add(self.len() as u64))
            .ok_or_else(|| idx_error(origin, format!("its header's dimensions {:?} overflow", self.dims)))
    }

    fn check_unsigned_bytes(&self, origin: &Path) -> Result<()> {
        if self.type_code != 0x08 {
            return Err(idx_error(
                origin,
                format!("IDX element type 0x{:02x} is not supported (only unsigned bytes, 0x08, as in MNIST)", self.type_code),
            ));
        }
        Ok(())
    }
}

fn idx_error(path: &Path, message: impl Into<String>) -> Error {
    Error::invalid(format!("{}: {}", path.display(), message.into()))
}

fn is_gzip(path: &Path) -> Result<bool> {
    let mut magic = [0u8; 2];
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    Ok(matches!(file.read(&mut magic), Ok(2)) && magic == [0x1f, 0x8b])
}

/// A plain IDX file: opens `path`, or for a gzipped file its decompressed copy in
/// `cache_dir` (made once, reused while its header and length match).
fn plain_idx_file(path: &Path, cache_dir: &Path) -> Result<(PathBuf, IdxHeader)> {
    if !is_gzip(path)? {
        let mut file = BufReader::new(File::open(path).map_err(|e| Error::io(path, e))?);
        let header = IdxHeader::read(&mut file, path)?;
        return Ok((path.to_path_buf(), header));
    }
    let open_gz = || -> Result<flate2::read::GzDecoder<BufReader<File>>> {
        Ok(flate2::read::GzDecoder::new(BufReader::new(File::open(path).map_err(|e| Error::io(path, e))?)))
    };
    let header = IdxHeader::read(&mut open_gz()?, path)?;
    header.check_unsigned_bytes(path)?;
    let stem = path.file_name().map(|n| n.to_string_lossy().trim_end_matches(".gz").to_string()).unwrap_or_default();
    let cached = cache_dir.join(format!("{stem}.idx"));
    let expected_len = header.file_len(path)?;
    if let Ok(metadata) = std::fs::metadata(&cached) {
        if metadata.len() == expected_len {
            let mut file = File::open(&cached).map_err(|e| Error::io(&cached, e))?;
            if IdxHeader::read(&mut file, &cached).ok().as_ref() == Some(&header) {
                return Ok((cached, header));
            }
        }
    }
    std::fs::create_dir_all(cache_dir).map_err(|e| Error::io(cache_dir, e))?;
    crate::files::write_streamed_atomically(&cached, |out| {
        // One byte more than the header promises is enough to tell that it lies.
        let mut decoder = open_gz()?.take(expected_len + 1);
        let copied = std::io::copy(&mut decoder, out).map_err(|e| idx_error(path, format!("cannot decompress: {e}")))?;
        if copied != expected_len {
            let copied = if copied > expected_len { "more than that".to_string() } else { copied.to_string() };
            return Err(idx_error(path, format!("holds {copied} bytes after decompression; its header {:?} needs {expected_len}", header.dims)));
        }
        Ok(())
    })?;
    Ok((cached, header))
}

/// Reads a whole IDX labels file (`[N]` unsigned bytes; small, so kept in memory).
pub fn read_idx_labels(path: &Path) -> Result<Vec<u8>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let actual_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let gzip = is_gzip(path)?;
    let file = BufReader::new(file);
    let mut reader: Box<dyn Read> = if gzip { Box::new(flate2::read::GzDecoder::new(file)) } else { Box::new(file) };
    let header = IdxHeader::read(&mut reader, path)?;
    header.check_unsigned_bytes(path)?;
    if header.dims.len() != 1 {
        return Err(idx_error(path, format!("a labels file has one dimension, this one has {:?}", header.dims)));
    }
    let expected_len = header.file_len(path)?;
    if !gzip && actual_len != expected_len {
        return Err(idx_error(path, format!("is {actual_len} bytes long; its header {:?} needs {expected_len}", header.dims)));
    }
    // A gzipped file's length says nothing of its contents: it is read (up to one byte more
    // than the header promises) rather than sized from the header.
    let mut labels = Vec::new();
    reader.take(header.dims[0] as u64 + 1).read_to_end(&mut labels).map_err(|e| idx_error(path, format!("cannot read: {e}")))?;
    if labels.len() != header.dims[0] {
        let count = if labels.len() > header.dims[0] { "more".to_string() } else { labels.len().to_string() };
        return Err(idx_error(path, format!("holds {count} labels; its header says {}", header.dims[0])));
    }
    Ok(labels)
}

/// The labels file beside an MNIST-style images file: `*-images-idx3-ubyte[.gz]` →
/// `*-labels-idx1-ubyte[.gz]`, either compressed or not.
pub fn guess_idx_labels_path(images: &Path) -> Option<PathBuf> {
    let name = images.file_name()?.to_str()?;
    if !name.contains("images-idx3") {
        return None;
    }
    let base = name.replace("images-idx3", "labels-idx1");
    let base = base.trim_end_matches(".gz");
    [format!("{base}.gz"), base.to_string()].into_iter().map(|n| images.with_file_name(n)).find(|p| p.is_file())
}

/// Grayscale images `[N, rows, cols]` from an IDX file, with labels from a second one.
pub struct IdxDataset {
    source: PathBuf,
    file: File,
    header_len: u64,
    count: usize,
    rows: usize,
    cols: usize,
    labels: Option<Vec<u8>>,
    num_classes: Option<usize>,
}

impl IdxDataset {
    /// Opens `images` (gzipped files are decompressed into `cache_dir` first) and, if given,
    /// `labels`, which must hold one label per image.
    pub fn open(images: &Path, labels: Option<&Path>, cache_dir: &Path) -> Result<Self> {
        let (plain, header) = plain_idx_file(images, cache_dir)?;
        header.check_unsigned_bytes(images)?;
        if header.dims.len() != 3 {
            return Err(idx_error(images, format!("an images file has three dimensions [N, rows, columns], this one has {:?}", header.dims)));
        }
        let file = File::open(&plain).map_err(|e| Error::io(&plain, e))?;
        let actual_len = file.metadata().map_err(|e| Error::io(&plain, e))?.len();
        let expected_len = header.file_len(images)?;
        if actual_len != expected_len {
            return Err(idx_error(images, format!("is {actual_len} bytes long; its header {:?} needs {expected_len}", header.dims)));
        }
        let (count, rows, cols) = (header.dims[0], header.dims[1], header.dims[2]);
        if count == 0 || rows == 0 || cols == 0 {
            return Err(idx_error(images, format!("holds no images (dimensions {:?})", header.dims)));
        }
        let labels = match labels {
            Some(path) => {
                let labels = read_idx_labels(path)?;
                if labels.len() != count {
                    return Err(idx_error(path, format!("holds {} labels for the {count} images of {}", labels.len(), images.display())));
                }
                Some(labels)
            }
            None => None,
        };
        let num_classes = labels.as_ref().map(|l| l.iter().copied().max().unwrap_or(0) as usize + 1);
        Ok(Self { source: images.to_path_buf(), file, header_len: header.len() as u64, count, rows, cols, labels, num_classes })
    }
}

impl Dataset for IdxDataset {
    fn len(&self) -> usize {
        self.count
    }

    fn get(&mut self, index: usize) -> Result<Example> {
        if index >= self.count {
            bail!("{}: example {index} is out of range ({} images)", self.source.display(), self.count);
        }
        let size = self.rows * self.cols;
        let mut pixels = vec![0u8; size];
        self.file
            .seek(SeekFrom::Start(self.header_len + (index * size) as u64))
            .and_then(|_| self.file.read_exact(&mut pixels))
            .map_err(|e| Error::io(&self.source, e))?;
        Ok(Example {
            image: RawImage { width: self.cols, height: self.rows, channels: 1, pixels },
            label: self.labels.as_ref().map(|l| l[index] as usize),
            caption: None,
            name: format!("{}[{index}]", self.source.display()),
        })
    }

    fn num_classes(&self) -> Option<usize> {
        self.num_classes
    }

    fn describe(&self) -> String {
        let labels = match self.num_classes {
            Some(n) => format!(", {n} classes"),
            None => String::new(),
        };
        format!("{}: {} grayscale images of {}×{}{labels}", self.source.display(), self.count, self.cols, self.rows)
    }
}

// ---- Image folders ----

/// Where an image folder's captions come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Captions {
    /// Not needed: neither `metadata.jsonl` texts nor sidecar files are read.
    Ignore,
    /// Every image must have one: from `metadata.jsonl` when the folder has it, else from
    /// `IMAGE.txt` beside each image.
    Required,
}

/// The image file extensions a folder's images may have.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp"];

struct FolderEntry {
    path: PathBuf,
    caption: Option<String>,
    label: Option<usize>,
}

/// Images in a folder (and its sub-folders), in name order, or in the order of
/// `metadata.jsonl` when present.
pub struct ImageFolderDataset {
    root: PathBuf,
    entries: Vec<FolderEntry>,
    class_names: Option<Vec<String>>,
}

impl ImageFolderDataset {
    /// Lists the images under `root`. With `labels_from_subfolders`, each image's label is the
    /// index of its top-level sub-folder among their sorted names (as torchvision's and
    /// diffusers' image folders infer them).
    pub fn open(root: &Path, captions: Captions, labels_from_subfolders: bool) -> Result<Self> {
        if !root.is_dir() {
            bail!("{}: not a folder", root.display());
        }
        let metadata_path = root.join("metadata.jsonl");
        let mut entries = if metadata_path.is_file() {
            read_metadata_jsonl(root, &metadata_path, captions)?
        } else {
            let mut paths = Vec::new();
            list_images(root, &mut paths)?;
            paths.sort();
            let mut entries = Vec::with_capacity(paths.len());
            for path in paths {
                let caption = match captions {
                    Captions::Ignore => None,
                    Captions::Required => Some(read_sidecar_caption(&path)?),
                };
                entries.push(FolderEntry { path, caption, label: None });
            }
            entries
        };
        if entries.is_empty() {
            bail!("{}: no images found (looked for {} files{})", root.display(), IMAGE_EXTENSIONS.join(", "), if metadata_path.is_file() { " listed in metadata.jsonl" } else { "" });
        }
        let class_names = if labels_from_subfolders {
            let class_of = |path: &Path| -> Option<String> {
                let relative = path.strip_prefix(root).ok()?;
                let mut components = relative.components();
                let first = components.next()?;
                components.next()?;
                Some(first.as_os_str().to_string_lossy().into_owned())
            };
            let mut names: Vec<String> = Vec::new();
            for entry in &entries {
                match class_of(&entry.path) {
                    Some(name) => names.push(name),
                    None => bail!(
                        "{}: class labels come from sub-folder names, but this image is not in a sub-folder of {}",
                        entry.path.display(),
                        root.display()
                    ),
                }
            }
            names.sort();
            names.dedup();
            for entry in &mut entries {
                let name = class_of(&entry.path).unwrap_or_default();
                entry.label = names.iter().position(|n| *n == name);
            }
            Some(names)
        } else {
            None
        };
        Ok(Self { root: root.to_path_buf(), entries, class_names })
    }
}

fn has_image_extension(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())).unwrap_or(false)
}

fn list_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let hidden = path.file_name().and_then(|n| n.to_str()).map(|n| n.starts_with('.')).unwrap_or(false);
        if hidden {
            continue;
        }
        if path.is_dir() {
            list_images(&path, out)?;
        } else if has_image_extension(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// kohya-style captions: `photo.png`'s caption is the text of `photo.txt`, trimmed.
fn read_sidecar_caption(image: &Path) -> Result<String> {
    let path = image.with_extension("txt");
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{}: caption file {} is missing (every image needs one, or a metadata.jsonl in the folder)", image.display(), path.display())
        }
        Err(e) => return Err(Error::io(&path, e)),
    };
    match String::from_utf8(bytes) {
        Ok(text) => Ok(text.trim().to_string()),
        Err(e) => bail!("{}: caption file is not UTF-8 (invalid byte at offset {})", path.display(), e.utf8_error().valid_up_to()),
    }
}

/// diffusers' image-folder metadata: one JSON object per line with `file_name` (relative to
/// the folder) and the caption in `text`.
fn read_metadata_jsonl(root: &Path, metadata: &Path, captions: Captions) -> Result<Vec<FolderEntry>> {
    let file = BufReader::new(File::open(metadata).map_err(|e| Error::io(metadata, e))?);
    let mut entries = Vec::new();
    for (number, line) in file.split(b'\n').enumerate() {
        let line_number = number + 1;
        let line = line.map_err(|e| Error::io(metadata, e))?;
        let Ok(line) = String::from_utf8(line) else {
            bail!("{}: line {line_number} is not UTF-8", metadata.display());
        };
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| Error::invalid(format!("{}: line {line_number} is not valid JSON: {e}", metadata.display())))?;
        let Some(file_name) = value.get("file_name").and_then(|v| v.as_str()) else {
            bail!("{}: line {line_number} has no `file_name` string", metadata.display());
        };
        // The metadata names the folder's own images: `../x` or an absolute path would train on
        // (and so copy into a model) files from anywhere.
        if !Path::new(file_name).components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)) {
            bail!("{}: line {line_number} names {file_name}, which is not a file inside {}", metadata.display(), root.display());
        }
        let path = root.join(file_name);
        if !path.is_file() {
            bail!("{}: line {line_number} names {file_name}, which does not exist", metadata.display());
        }
        let caption = match captions {
            Captions::Ignore => None,
            Captions::Required => match value.get("text").and_then(|v| v.as_str()) {
                Some(text) => Some(text.to_string()),
                None => bail!("{}: line {line_number} ({file_name}) has no `text` caption", metadata.display()),
            },
        };
        entries.push(FolderEntry { path, caption, label: None });
    }
    Ok(entries)
}

/// Decodes an image file to 8 bits per channel, keeping its mode (gray, gray + alpha, RGB,
/// RGBA; 16-bit and float images are reduced to 8 bits).
pub fn read_image(path: &Path) -> Result<RawImage> {
    let image = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?
        .decode()
        .map_err(|e| Error::invalid(format!("{}: cannot decode the image: {e}", path.display())))?;
    let (width, height) = (image.width() as usize, image.height() as usize);
    let (channels, pixels) = match image.color().channel_count() {
        1 => (1, image.into_luma8().into_raw()),
        2 => (2, image.into_luma_alpha8().into_raw()),
        3 => (3, image.into_rgb8().into_raw()),
        _ => (4, image.into_rgba8().into_raw()),
    };
    Ok(RawImage { width, height, channels, pixels })
}

impl Dataset for ImageFolderDataset {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn get(&mut self, index: usize) -> Result<Example> {
        let Some(entry) = self.entries.get(index) else {
            bail!("{}: example {index} is out of range ({} images)", self.root.display(), self.entries.len());
        };
        Ok(Example {
            image: read_image(&entry.path)?,
            label: entry.label,
            caption: entry.caption.clone(),
            name: entry.path.display().to_string(),
        })
    }

    fn num_classes(&self) -> Option<usize> {
        self.class_names.as_ref().map(Vec::len)
    }

    fn class_names(&self) -> Option<Vec<String>> {
        self.class_names.clone()
    }

    fn describe(&self) -> String {
        let classes = match &self.class_names {
            Some(names) => format!(" in {} classes", names.len()),
            None => String::new(),
        };
        format!("{}: {} images{classes}", self.root.display(), self.entries.len())
    }
}

// ---- Converting examples to the model's input ----

/// How an image whose size differs from the model's is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageFit {
    /// Refused, naming the file.
    Exact,
    /// Centred on a black canvas of the model's size (smaller images only).
    Pad,
    /// The shorter side resized to the model's (bilinear), then the centre cropped, as
    /// diffusers' training scripts do.
    Resize,
}

impl ImageFit {
    /// Parses `exact`, `pad` or `resize`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "exact" => Ok(Self::Exact),
            "pad" => Ok(Self::Pad),
            "resize" => Ok(Self::Resize),
            other => bail!("image fit `{other}` is not one of exact, pad, resize"),
        }
    }
}

/// What the model takes: channels (1 or 3), height and width, and how images are fitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSpec {
    /// 1 (gray) or 3 (RGB).
    pub channels: usize,
    /// Rows of the model's input.
    pub height: usize,
    /// Columns of the model's input.
    pub width: usize,
    /// How images of another size are fitted.
    pub fit: ImageFit,
}

/// PIL's RGB → L conversion (ITU-R 601-2 luma in 16-bit fixed point, rounded).
fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

/// Converts an image to `channels` (1: luma, alpha dropped; 3: RGB, gray replicated, alpha
/// dropped), as PIL's `convert("L")` / `convert("RGB")` do.
pub fn convert_channels(image: &RawImage, channels: usize) -> Result<RawImage> {
    if image.channels == channels {
        return Ok(image.clone());
    }
    let pixels: Vec<u8> = match (image.channels, channels) {
        (2, 1) => image.pixels.chunks_exact(2).map(|p| p[0]).collect(),
        (3 | 4, 1) => image.pixels.chunks_exact(image.channels).map(|p| luma(p[0], p[1], p[2])).collect(),
        (1 | 2, 3) => image.pixels.chunks_exact(image.channels).flat_map(|p| [p[0], p[0], p[0]]).collect(),
        (4, 3) => image.pixels.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
        (from, to) => bail!("cannot convert a {from}-channel image to {to} channels"),
    };
    Ok(RawImage { width: image.width, height: image.height, channels, pixels })
}

fn fit_size(image: RawImage, spec: &ImageSpec, name: &str) -> Result<RawImage> {
    let (width, height) = (spec.width, spec.height);
    if image.width == width && image.height == height {
        return Ok(image);
    }
    match spec.fit {
        ImageFit::Exact => bail!(
            "{name}: the image is {}×{}, the model takes {width}×{height} (use `ImageFit::Pad` or `ImageFit::Resize` to convert)",
            image.width,
            image.height
        ),
        ImageFit::Pad => {
            if image.width > width || image.height > height {
                bail!("{name}: the image is {}×{}, larger than the model's {width}×{height}, so it cannot be padded (use `ImageFit::Resize`)", image.width, image.height);
            }
            let (left, top) = ((width - image.width) / 2, (height - image.height) / 2);
            let c = image.channels;
            let mut pixels = vec![0u8; width * height * c];
            for row in 0..image.height {
                let source = &image.pixels[row * image.width * c..(row + 1) * image.width * c];
                let start = ((top + row) * width + left) * c;
                pixels[start..start + image.width * c].copy_from_slice(source);
            }
            Ok(RawImage { width, height, channels: c, pixels })
        }
        ImageFit::Resize => {
            let ((new_width, new_height), (top, left)) = resize_and_crop(image.width, image.height, spec);
            let resized = resize_bilinear(&image, new_width, new_height, name)?;
            let c = image.channels;
            let mut pixels = Vec::with_capacity(width * height * c);
            for row in top..top + height {
                pixels.extend_from_slice(&resized.pixels[(row * new_width + left) * c..(row * new_width + left + width) * c]);
            }
            Ok(RawImage { width, height, channels: c, pixels })
        }
    }
}

/// `ImageFit::Resize` of a `width`×`height` image to `spec`'s size: the shorter side to the
/// target's larger side, then the centre crop. Returns the resized (width, height) and the
/// crop's (top, left).
fn resize_and_crop(width: usize, height: usize, spec: &ImageSpec) -> ((usize, usize), (usize, usize)) {
    let scale = (spec.width as f64 / width as f64).max(spec.height as f64 / height as f64);
    let new_width = ((width as f64 * scale).round() as usize).max(spec.width);
    let new_height = ((height as f64 * scale).round() as usize).max(spec.height);
    ((new_width, new_height), ((new_height - spec.height) / 2, (new_width - spec.width) / 2))
}

/// Where the model's image was cut from the resized one, (top, left): SDXL's
/// `crops_coords_top_left` for an example of `width`×`height` ((0, 0) unless it was resized
/// and cropped).
pub fn crop_top_left(width: usize, height: usize, spec: &ImageSpec) -> (usize, usize) {
    match spec.fit {
        ImageFit::Resize if (width, height) != (spec.width, spec.height) => resize_and_crop(width, height, spec).1,
        _ => (0, 0),
    }
}

fn resize_bilinear(image: &RawImage, width: usize, height: usize, name: &str) -> Result<RawImage> {
    use image::imageops::{resize, FilterType};
    let (w, h) = (image.width as u32, image.height as u32);
    let error = || Error::invalid(format!("{name}: image buffer does not match its size"));
    let pixels = match image.channels {
        1 => resize(&image::GrayImage::from_raw(w, h, image.pixels.clone()).ok_or_else(error)?, width as u32, height as u32, FilterType::Triangle).into_raw(),
        3 => resize(&image::RgbImage::from_raw(w, h, image.pixels.clone()).ok_or_else(error)?, width as u32, height as u32, FilterType::Triangle).into_raw(),
        c => bail!("{name}: cannot resize a {c}-channel image"),
    };
    Ok(RawImage { width, height, channels: image.channels, pixels })
}

/// An example's image as the model's input: converted to `spec`'s channels, fitted to its
/// size, as `[C, H, W]` values in [-1, 1] (`(x / 255 - 0.5) / 0.5`, torchvision's `ToTensor`
/// then `Normalize([0.5], [0.5])`), mirrored left to right if `flip`.
pub fn prepare(example: &Example, spec: &ImageSpec, flip: bool) -> Result<Vec<f32>> {
    let image = &example.image;
    if image.pixels.len() != image.width * image.height * image.channels {
        bail!("{}: image data does not match its size", example.name);
    }
    let image = fit_size(convert_channels(image, spec.channels)?, spec, &example.name)?;
    let (width, height, channels) = (image.width, image.height, image.channels);
    let mut values = vec![0f32; channels * height * width];
    for y in 0..height {
        for x in 0..width {
            let source_x = if flip { width - 1 - x } else { x };
            for c in 0..channels {
                let byte = image.pixels[(y * width + source_x) * channels + c];
                values[(c * height + y) * width + x] = (byte as f32 / 255.0 - 0.5) / 0.5;
            }
        }
    }
    Ok(values)
}

// ---- The loader ----

/// Where the loader is in the data: the epoch and how many examples of it were used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DataPosition {
    /// Epochs completed.
    pub epoch: u64,
    /// Examples of the current epoch already used.
    pub index: u64,
}

/// A batch of model inputs.
pub struct Batch {
    /// `[B, C, H, W]` in [-1, 1].
    pub images: Tensor,
    /// Class labels, one per image, when the data has them.
    pub labels: Option<Vec<u32>>,
    /// Captions, one per image, when the data has them.
    pub captions: Option<Vec<String>>,
    /// Each example's size before it was fitted to the model's, (height, width), and where it
    /// was cropped, (top, left): SDXL's micro-conditioning, as diffusers' SDXL training scripts
    /// record them.
    pub original_sizes: Vec<(usize, usize)>,
    /// Where each example was cropped, (top, left) in pixels (SDXL's `crops_coords_top_left`).
    pub crops_top_left: Vec<(usize, usize)>,
}

/// SplitMix64: a strong 64-bit mix, used to derive each epoch's order and each flip from
/// the seed and the position alone (so the position is all a checkpoint needs).
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The permutation of `len` examples for `epoch`: Fisher–Yates driven by SplitMix64.
pub fn epoch_order(seed: u64, epoch: u64, len: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..len as u32).collect();
    let mut state = splitmix64(seed ^ splitmix64(epoch.wrapping_add(0x5EED)));
    for i in (1..len).rev() {
        state = splitmix64(state);
        let j = (state % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// Batches of shuffled examples, epoch after epoch: a batch that reaches the end of an epoch
/// continues into the next one's new order, so every batch is full.
pub struct DataLoader {
    dataset: Box<dyn Dataset>,
    spec: ImageSpec,
    seed: u64,
    random_flip: bool,
    position: DataPosition,
    order: Vec<u32>,
}

impl DataLoader {
    /// Refuses an empty dataset and a spec the models cannot take.
    pub fn new(dataset: Box<dyn Dataset>, spec: ImageSpec, seed: u64, random_flip: bool) -> Result<Self> {
        if dataset.is_empty() {
            bail!("{}: the dataset is empty", dataset.describe());
        }
        if spec.channels != 1 && spec.channels != 3 {
            bail!("training images must have 1 or 3 channels, not {}", spec.channels);
        }
        if spec.width == 0 || spec.height == 0 {
            bail!("the image size must not be 0");
        }
        let order = epoch_order(seed, 0, dataset.len());
        Ok(Self { dataset, spec, seed, random_flip, position: DataPosition::default(), order })
    }

    /// The dataset read from.
    pub fn dataset(&self) -> &dyn Dataset {
        self.dataset.as_ref()
    }

    /// What images are fitted to.
    pub fn spec(&self) -> &ImageSpec {
        &self.spec
    }

    /// The number of examples.
    pub fn len(&self) -> usize {
        self.dataset.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.dataset.is_empty()
    }

    /// Where the loader is, for checkpoints.
    pub fn position(&self) -> DataPosition {
        self.position
    }

    /// Continues from a saved position (of a dataset of the same length).
    pub fn set_position(&mut self, position: DataPosition) -> Result<()> {
        if position.index > self.dataset.len() as u64 {
            bail!("data position {} is beyond the {} examples of the dataset", position.index, self.dataset.len());
        }
        self.order = epoch_order(self.seed, position.epoch, self.dataset.len());
        self.position = position;
        Ok(())
    }

    /// The next example (index into the dataset, flip) and the position after it.
    fn advance(&mut self) -> (usize, bool) {
        if self.position.index as usize >= self.order.len() {
            self.position = DataPosition { epoch: self.position.epoch + 1, index: 0 };
            self.order = epoch_order(self.seed, self.position.epoch, self.dataset.len());
        }
        let index = self.order[self.position.index as usize] as usize;
        let flip = self.random_flip
            && splitmix64(self.seed ^ splitmix64(self.position.epoch ^ splitmix64(self.position.index ^ 0xF11B))) & 1 == 1;
        self.position.index += 1;
        (index, flip)
    }

    /// The next `batch_size` examples as model inputs on `device`.
    pub fn next_batch(&mut self, batch_size: usize, device: &Device) -> Result<Batch> {
        if batch_size == 0 {
            bail!("the batch size must be at least 1");
        }
        let spec = self.spec;
        // The batch size is the caller's number: sized with checked arithmetic, and reserved
        // fallibly, so that an impossible batch is an error rather than an abort.
        let len = [spec.channels, spec.height, spec.width].iter().try_fold(batch_size, |product, &n| product.checked_mul(n));
        let mut values = Vec::new();
        if len.is_none_or(|len| values.try_reserve_exact(len).is_err()) {
            bail!("a batch of {batch_size} images of {}×{}×{} is too large for this machine's memory", spec.channels, spec.height, spec.width);
        }
        let mut labels = Vec::with_capacity(batch_size);
        let mut captions = Vec::with_capacity(batch_size);
        let (mut original_sizes, mut crops_top_left) = (Vec::with_capacity(batch_size), Vec::with_capacity(batch_size));
        for _ in 0..batch_size {
            let (index, flip) = self.advance();
            let example = self.dataset.get(index)?;
            values.extend(prepare(&example, &spec, flip)?);
            let (width, height) = (example.image.width, example.image.height);
            original_sizes.push((height, width));
            crops_top_left.push(crop_top_left(width, height, &spec));
            if let Some(label) = example.label {
                labels.push(label as u32);
            }
            if let Some(caption) = example.caption {
                captions.push(caption);
            }
        }
        let images = Tensor::from_vec(values, (batch_size, spec.channels, spec.height, spec.width), device)?;
        Ok(Batch {
            images,
            labels: (labels.len() == batch_size).then_some(labels),
            captions: (captions.len() == batch_size).then_some(captions),
            original_sizes,
            crops_top_left,
        })
    }
}
