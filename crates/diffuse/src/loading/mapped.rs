//! Safetensors files, mapped read-only, each tensor converted to the requested type straight
//! from the mapping in one parallel pass and its pages then unmapped again (`MADV_DONTNEED`):
//! a model converted as it loads (an f32 folder loaded as bf16) never holds an f32 copy, and
//! the files' pages never stay in the process's memory (candle's `MmapedSafetensors` copies
//! each tensor in its own type first, and keeps every page it touched mapped until the model
//! is built). Reading the bytes with `read` instead costs a copy out of the page cache, 4 GB
//! for SD 1.5 in f32: most of a second of kernel time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;

use crate::{Error, Result};

/// Where one tensor's bytes lie.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
}

/// The tensors of one or more safetensors files, by name.
pub struct MappedTensors {
    files: Vec<MappedFile>,
    entries: HashMap<String, Entry>,
}

impl MappedTensors {
    /// Maps and indexes `files` (a later file's tensor of the same name wins, as in candle).
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        let mut mapped = Vec::with_capacity(files.len());
        let mut entries = HashMap::new();
        for (index, path) in files.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: a read-only mapping of a file diffuse never writes while it is mapped; a
            // file changed by another process meanwhile can give wrong values, never UB in
            // safe code that only reads bytes.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let tensors = safetensors::SafeTensors::deserialize(&mmap)
                .map_err(|e| Error::weights(path, format!("not a valid safetensors file (truncated or corrupt?): {e}")))?;
            let base = mmap.as_ptr() as usize;
            for (name, view) in tensors.tensors() {
                // A shape whose size overflows (possible with a zero dimension) is refused here,
                // before anything computes its strides.
                super::weights::check_shape(path, &name, view.shape())?;
                let start = view.data().as_ptr() as usize - base;
                let entry = Entry { file: index, dtype: view.dtype(), shape: view.shape().to_vec(), start, end: start + view.data().len() };
                entries.insert(name, entry);
            }
            mapped.push(MappedFile { path: path.clone(), mmap });
        }
        Ok(Self { files: mapped, entries })
    }

    /// Every tensor's name and shape.
    pub fn shapes(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.entries.iter().map(|(name, entry)| (name.as_str(), entry.shape.as_slice()))
    }

    /// Whether the files hold a tensor named `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The type tensor `name` is stored in, where candle has it.
    pub fn stored_dtype(&self, name: &str) -> Option<DType> {
        candle_dtype(self.entries.get(name)?.dtype)
    }

    /// The file `name` comes from.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.entries.get(name).map(|entry| self.files[entry.file].path.as_path())
    }

    /// Tensor `name` in `dtype` on `device`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let entry = self.entries.get(name).ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() }.bt())?;
        let file = &self.files[entry.file];
        let shape = Shape::from(entry.shape.as_slice());
        let in_file = |e: String| candle_core::Error::Msg(format!("{}: tensor `{name}`: {e}", file.path.display()));
        let in_file_candle = |e: candle_core::Error| in_file(crate::error::first_line(&e));
        let len = entry.end - entry.start;
        // The conversion reads the range once, in order: ask for read-ahead (advice only).
        #[cfg(unix)]
        let _ = file.mmap.advise_range(memmap2::Advice::WillNeed, entry.start, len);
        let tensor = convert(&file.mmap[entry.start..entry.end], entry.dtype, dtype, shape, device);
        // SAFETY: the mapping is shared and read-only, so dropping its pages from this process
        // loses nothing (a later read faults them in again from the file), and no borrow of
        // these bytes outlives `convert`, which copied what it needed.
        #[cfg(unix)]
        let _ = unsafe { file.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, entry.start, len) };
        tensor.map_err(in_file_candle)
    }
}

/// Values per parallel chunk of a conversion.
const CHUNK: usize = 1 << 16;

/// `bytes` (little-endian values of `from`) as a tensor of `to`: float types converted in one
/// parallel pass, anything else through candle.
fn convert(bytes: &[u8], from: safetensors::Dtype, to: DType, shape: Shape, device: &Device) -> candle_core::Result<Tensor> {
    use safetensors::Dtype as St;
    let size = match from {
        St::F32 => 4,
        St::F16 | St::BF16 => 2,
        _ => return candle_via_raw(bytes, from, to, shape, device),
    };
    if bytes.len() != shape.elem_count() * size {
        candle_core::bail!("{} bytes do not hold {:?} of {from:?}", bytes.len(), shape.dims());
    }
    // Written into fresh memory: zeroing it first (`half`'s types are not known to be zero
    // bits, so `vec!` would fill them one by one) was a tenth of loading SD 1.5 in bf16.
    fn map<T: Send + Copy, const SIZE: usize>(bytes: &[u8], f: impl Fn([u8; SIZE]) -> T + Sync) -> Vec<T> {
        let len = bytes.len() / SIZE;
        let (values, _) = bytes.as_chunks::<SIZE>();
        let mut out = Vec::with_capacity(len);
        out.spare_capacity_mut()[..len].par_chunks_mut(CHUNK).zip(values.par_chunks(CHUNK)).for_each(|(out, values)| {
            for (value, &bytes) in out.iter_mut().zip(values) {
                value.write(f(bytes));
            }
        });
        // SAFETY: `values` has `len` elements, split into chunks of the same lengths as the
        // first `len` slots of the spare capacity, so the loop above wrote every one of them.
        unsafe { out.set_len(len) };
        out
    }
    let f32_of = f32::from_le_bytes;
    let f16_of = |b| f16::from_le_bytes(b).to_f32();
    let bf16_of = |b| bf16::from_le_bytes(b).to_f32();
    match (from, to) {
        (St::F32, DType::F32) => Tensor::from_vec(map(bytes, f32_of), shape, device),
        (St::F32, DType::BF16) => Tensor::from_vec(map(bytes, |b| bf16::from_bits(bf16_bits(u32::from_le_bytes(b)))), shape, device),
        (St::F32, DType::F16) => Tensor::from_vec(map(bytes, |b| f16::from_f32(f32_of(b))), shape, device),
        (St::F16, DType::F16) => Tensor::from_vec(map(bytes, f16::from_le_bytes), shape, device),
        (St::F16, DType::F32) => Tensor::from_vec(map(bytes, f16_of), shape, device),
        (St::F16, DType::BF16) => Tensor::from_vec(map(bytes, |b| bf16::from_f32(f16_of(b))), shape, device),
        (St::BF16, DType::BF16) => Tensor::from_vec(map(bytes, bf16::from_le_bytes), shape, device),
        (St::BF16, DType::F32) => Tensor::from_vec(map(bytes, bf16_of), shape, device),
        (St::BF16, DType::F16) => Tensor::from_vec(map(bytes, |b| f16::from_f32(bf16_of(b))), shape, device),
        _ => candle_via_raw(bytes, from, to, shape, device),
    }
}

/// The bf16 nearest to the f32 with these bits (ties to even; NaN stays a quiet NaN), as
/// `half`'s `bf16::from_f32`, in integer arithmetic that vectorises (the conversion of an f32
/// checkpoint loaded in bf16 was most of its loading time). `ops` has the same rounding for
/// the kernels, but `loading` sits beside `ops` and may not import it (tests/layers.rs).
#[inline(always)]
fn bf16_bits(bits: u32) -> u16 {
    if bits & 0x7FFF_FFFF > 0x7F80_0000 {
        ((bits >> 16) | 0x0040) as u16
    } else {
        (bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16) as u16
    }
}

/// The candle type of a safetensors type, where candle has one.
fn candle_dtype(dtype: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as St;
    Some(match dtype {
        St::U8 => DType::U8,
        St::U32 => DType::U32,
        St::I64 => DType::I64,
        St::F64 => DType::F64,
        St::F32 => DType::F32,
        St::F16 => DType::F16,
        St::BF16 => DType::BF16,
        _ => return None,
    })
}

fn candle_via_raw(bytes: &[u8], from: safetensors::Dtype, to: DType, shape: Shape, device: &Device) -> candle_core::Result<Tensor> {
    let Some(dtype) = candle_dtype(from) else {
        candle_core::bail!("values of type {from:?} are not supported");
    };
    Tensor::from_raw_buffer(bytes, dtype, shape.dims(), device)?.to_dtype(to)
}

/// A candle-nn `SimpleBackend` over [`MappedTensors`]: a `VarBuilder` that checks shapes.
pub struct MappedBackend(pub std::sync::Arc<MappedTensors>);

impl candle_nn::var_builder::SimpleBackend for MappedBackend {
    fn get(&self, shape: Shape, name: &str, _: candle_nn::Init, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let tensor = self.0.load(name, dtype, device)?;
        if tensor.shape() != &shape {
            return Err(candle_core::Error::UnexpectedShape { msg: format!("shape mismatch for {name}"), expected: shape, got: tensor.shape().clone() }.bt());
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        self.0.load(name, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every float type to every float type, against candle's own conversion.
    #[test]
    fn conversions_match_candle() {
        let dir = std::env::temp_dir().join(format!("diffuse-mapped-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let values = Tensor::arange(0f32, 300_000f32, &Device::Cpu).unwrap().affine(1.37e-3, -200.0).unwrap();
        let mut tensors = HashMap::new();
        for (name, dtype) in [("f32", DType::F32), ("f16", DType::F16), ("bf16", DType::BF16)] {
            tensors.insert(name.to_string(), values.to_dtype(dtype).unwrap().reshape((300, 1000)).unwrap());
        }
        let path = dir.join("t.safetensors");
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let mapped = MappedTensors::open(std::slice::from_ref(&path)).unwrap();
        for (name, source) in &tensors {
            for to in [DType::F32, DType::F16, DType::BF16, DType::F64] {
                let got = mapped.load(name, to, &Device::Cpu).unwrap();
                let want = source.to_dtype(to).unwrap();
                assert_eq!(got.dims(), [300, 1000]);
                let difference = (got.to_dtype(DType::F64).unwrap() - want.to_dtype(DType::F64).unwrap()).unwrap().abs().unwrap();
                assert_eq!(difference.max_all().unwrap().to_scalar::<f64>().unwrap(), 0.0, "{name} → {to:?}");
            }
        }
        assert!(mapped.load("missing", DType::F32, &Device::Cpu).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
