//! Gradient checkpointing, as `torch.utils.checkpoint` and diffusers'
//! `enable_gradient_checkpointing()`: a checkpointed block (a UNet's resnets and attention
//! blocks) keeps none of its activations for the backward pass, only its inputs; its backward
//! pass runs the block again, with gradients tracked, and backpropagates through that. Memory
//! for activations drops to about one block's; the forward pass runs twice.
//!
//! candle's backward pass gives a custom op's inputs their gradients, but not the parameters
//! that the block reads: those are collected here, for the parameters the training step
//! registered with [`GradientCheckpointing::start`], and added to the step's gradients by
//! [`GradientCheckpointing::add_gradients`]. The blocks recompute bit for bit what they
//! computed, so the loss is the same and the gradients are the same up to rounding: a block's
//! inner contributions to its input's gradient arrive summed, in another order than without
//! checkpointing (as with torch's).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor, TensorId, Var};

use super::{training_precision, with_training_precision, Precision};
use crate::Result;

/// What a checkpointing training step on this thread collects.
struct Session {
    /// The parameters whose gradients are collected.
    parameters: HashSet<TensorId>,
    /// The parameters' gradients from the recomputed blocks, summed.
    grads: HashMap<TensorId, Tensor>,
    /// Inside a block that is being checkpointed: blocks within it run as they are.
    in_block: bool,
}

thread_local! {
    static SESSION: RefCell<Option<Session>> = const { RefCell::new(None) };
}

/// Gradient checkpointing for the forward and backward passes that run on this thread while
/// it lives (the guard of one training step's passes).
pub struct GradientCheckpointing {
    parameters: Vec<TensorId>,
}

impl GradientCheckpointing {
    /// Checkpoints the blocks that run from now on this thread; `parameters` are the tensors
    /// whose gradients the step needs (a model's trainable variables).
    pub fn start(parameters: &[Var]) -> Self {
        let ids: Vec<TensorId> = parameters.iter().map(|v| v.as_tensor().id()).collect();
        SESSION.with(|s| *s.borrow_mut() = Some(Session { parameters: ids.iter().copied().collect(), grads: HashMap::new(), in_block: false }));
        Self { parameters: ids }
    }

    /// Adds to `grads` (a backward pass's) the gradients that the recomputed blocks gave the
    /// parameters, and clears them for the next backward pass.
    pub fn add_gradients(&self, grads: &mut GradStore) -> Result<()> {
        let collected = SESSION.with(|s| s.borrow_mut().as_mut().map(|s| std::mem::take(&mut s.grads)).unwrap_or_default());
        for id in &self.parameters {
            if let Some(grad) = collected.get(id) {
                let sum = match grads.get_id(*id) {
                    Some(existing) => (existing + grad)?,
                    None => grad.clone(),
                };
                grads.insert_id(*id, sum);
            }
        }
        Ok(())
    }
}

impl Drop for GradientCheckpointing {
    fn drop(&mut self) {
        SESSION.with(|s| *s.borrow_mut() = None);
    }
}

/// Whether a block called now should be checkpointed: inside a [`GradientCheckpointing`]
/// step and not inside another checkpointed block.
pub fn is_active() -> bool {
    SESSION.with(|s| s.borrow().as_ref().is_some_and(|s| !s.in_block))
}

/// A block's computation from its inputs.
pub type Block = dyn Fn(&[Tensor]) -> Result<Tensor> + Send + Sync;

/// `block(inputs)`, checkpointed when [`is_active`] and some input tracks a gradient (the op
/// that carries the gradients back hangs on the inputs); plainly otherwise. `inputs` are one to
/// three CPU tensors; `block` must compute the same values each time it runs (no dropout).
pub fn checkpoint(inputs: &[&Tensor], block: Arc<Block>) -> Result<Tensor> {
    let tracked = inputs.iter().any(|t| t.track_op());
    let on_cpu = inputs.iter().all(|t| t.device().is_cpu());
    if !is_active() || !tracked || !on_cpu || inputs.is_empty() || inputs.len() > 3 {
        let inputs: Vec<Tensor> = inputs.iter().map(|&t| t.clone()).collect();
        return block(&inputs);
    }
    // The block's graph (its activations) is dropped with `output`'s tracked original.
    let (_, fresh) = fresh_inputs(inputs)?;
    let output = inside_block(|| block(&fresh))?.detach();
    let op = Checkpointed { output: Mutex::new(Some(output)), block, precision: training_precision() };
    Ok(match inputs {
        [a] => a.apply_op1(op)?,
        [a, b] => a.apply_op2(b, op)?,
        [a, b, c] => a.apply_op3(b, c, op)?,
        _ => unreachable!("one to three inputs"),
    })
}

/// The inputs cut from the graph before them, those that track a gradient as fresh variables
/// (the block takes the same code paths as it would in the graph: some kernels differ between
/// tracked and untracked operands), with those variables.
fn fresh_inputs(inputs: &[&Tensor]) -> Result<(Vec<Option<Var>>, Vec<Tensor>)> {
    let vars: Vec<Option<Var>> = inputs.iter().map(|t| t.track_op().then(|| Var::from_tensor(&t.detach())).transpose()).collect::<candle_core::Result<_>>()?;
    let tensors = inputs.iter().zip(&vars).map(|(t, v)| v.as_ref().map_or_else(|| t.detach(), |v| v.as_tensor().clone())).collect();
    Ok((vars, tensors))
}

/// Runs `f` marked as inside a checkpointed block.
fn inside_block<R>(f: impl FnOnce() -> R) -> R {
    let set = |value: bool| SESSION.with(|s| s.borrow_mut().as_mut().map(|s| std::mem::replace(&mut s.in_block, value)));
    struct Restore<F: Fn(bool) -> Option<bool>>(Option<bool>, F);
    impl<F: Fn(bool) -> Option<bool>> Drop for Restore<F> {
        fn drop(&mut self) {
            if let Some(previous) = self.0 {
                (self.1)(previous);
            }
        }
    }
    let _restore = Restore(set(true), set);
    f()
}

/// The op a checkpointed block leaves in the graph: its output, and the block to run again.
struct Checkpointed {
    /// The block's output, handed over once by the forward pass.
    output: Mutex<Option<Tensor>>,
    block: Arc<Block>,
    /// The products' precision when the block ran (the backward pass runs outside that scope).
    precision: Precision,
}

impl Checkpointed {
    fn forward(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        let output = self.output.lock().ok().and_then(|mut o| o.take()).ok_or_else(|| candle_core::Error::Msg("checkpoint: the output was taken".into()))?;
        let output = output.contiguous()?;
        let (storage, layout) = output.storage_and_layout();
        let candle_core::Storage::Cpu(storage) = &*storage else {
            candle_core::bail!("checkpoint: a CPU block gave a tensor on another device");
        };
        let values = match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(data), Some((start, end))) => CpuStorage::F32(data[start..end].to_vec()),
            (CpuStorage::F64(data), Some((start, end))) => CpuStorage::F64(data[start..end].to_vec()),
            _ => candle_core::bail!("checkpoint: blocks are checkpointed in f32 or f64"),
        };
        Ok((values, layout.shape().clone()))
    }

    /// The block run again with gradients tracked, and its backward pass from `grad_output`:
    /// the inputs' gradients (for those that track one), the parameters' collected.
    fn backward(&self, inputs: &[&Tensor], grad_output: &Tensor) -> candle_core::Result<Vec<Option<Tensor>>> {
        let (vars, tensors) = fresh_inputs(inputs).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let output = with_training_precision(self.precision, || inside_block(|| (self.block)(&tensors))).map_err(|e| candle_core::Error::Msg(format!("checkpoint: the block failed again: {e}")))?;
        let grads = (output * grad_output.detach())?.sum_all()?.backward()?;
        SESSION.with(|s| -> candle_core::Result<()> {
            if let Some(session) = s.borrow_mut().as_mut() {
                // Every tensor of the recomputed graph has a gradient: only the parameters'
                // are kept.
                for id in grads.get_ids().filter(|id| session.parameters.contains(id)) {
                    let Some(grad) = grads.get_id(*id) else { continue };
                    let sum = match session.grads.remove(id) {
                        Some(existing) => (existing + grad)?,
                        None => grad.clone(),
                    };
                    session.grads.insert(*id, sum);
                }
            }
            Ok(())
        })?;
        Ok(vars.iter().map(|v| v.as_ref().and_then(|v| grads.get(v.as_tensor()).cloned())).collect())
    }
}

impl CustomOp1 for Checkpointed {
    fn name(&self) -> &'static str {
        "checkpointed-block"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward()
    }

    fn bwd(&self, a: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(self.backward(&[a], grad)?.remove(0))
    }
}

impl CustomOp2 for Checkpointed {
    fn name(&self) -> &'static str {
        "checkpointed-block"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward()
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let mut grads = self.backward(&[a, b], grad)?.into_iter();
        Ok((grads.next().flatten(), grads.next().flatten()))
    }
}

impl CustomOp3 for Checkpointed {
    fn name(&self) -> &'static str {
        "checkpointed-block"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward()
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, c: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut grads = self.backward(&[a, b, c], grad)?.into_iter();
        Ok((grads.next().flatten(), grads.next().flatten(), grads.next().flatten()))
    }
}
