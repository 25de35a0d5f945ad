//! Synchronised BatchNorm for data-parallel training: in training mode every BatchNorm takes
//! its batch mean and variance over the images of all replicas (processes training one model
//! on disjoint parts of a batch), so that W replicas with batch b compute what one process
//! with batch W·b would.
//!
//! The replicas' sums are exchanged by a [`CrossReplicaSum`] the caller provides (the training
//! crate's MPI or NCCL collective); this crate knows nothing of processes. It is switched on
//! per thread for the duration of a closure ([`with_sync_batch_norm`]), so a model needs no
//! rebuilding and its layers no extra field; the forward pass reads it, and the backward pass
//! needs nothing, because each exchange is a graph node that exchanges its gradient too.
//!
//! The statistics take two exchanges per layer, `(Σx, count)` and then `Σ(x − μ)²`, rather
//! than one of `(Σx, Σx²)`, whose difference loses digits when the mean is large beside the
//! standard deviation; each rank's sums are accumulated in f64. The normalisation is the reference composition of Candle ops, not the
//! fused kernel (the kernel computes its statistics itself).

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use sae_kernels::BatchNormOutput;
use std::cell::RefCell;
use std::sync::Arc;

/// Sums `f32` values elementwise over all replicas.
pub trait CrossReplicaSum: Send + Sync {
    /// Replaces `values` by their elementwise sum over all replicas; every replica calls it
    /// with the same length, in the same order, and gets the same result.
    fn sum(&self, values: &mut [f32]) -> Result<()>;
}

thread_local! {
    static SYNC: RefCell<Option<Arc<dyn CrossReplicaSum>>> = const { RefCell::new(None) };
}

/// Runs `f` with every training-mode BatchNorm called on this thread synchronised over the
/// replicas of `sum`. The backward pass of what `f` built may run later, outside.
pub fn with_sync_batch_norm<R>(sum: Arc<dyn CrossReplicaSum>, f: impl FnOnce() -> R) -> R {
    /// Restores the previous setting, also when `f` panics.
    struct Restore(Option<Arc<dyn CrossReplicaSum>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            SYNC.with(|s| *s.borrow_mut() = self.0.take());
        }
    }
    let _restore = Restore(SYNC.with(|s| s.borrow_mut().replace(sum)));
    f()
}

/// The synchronisation in force on this thread, if any.
pub(crate) fn current() -> Option<Arc<dyn CrossReplicaSum>> {
    SYNC.with(|s| s.borrow().clone())
}

/// BatchNorm of `x` (N, C, H, W) with statistics over all replicas of `sum` (then a ReLU
/// when `relu` is set); the returned mean and biased variance are those global statistics.
/// `count` in the output's variance is the global M = Σ N·H·W.
pub(crate) fn batch_norm_train_synced(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
    sum: &Arc<dyn CrossReplicaSum>,
) -> Result<(BatchNormOutput, usize)> {
    let (n, c, h, w) = x.dims4()?;
    if x.dtype() != DType::F32 {
        bail!("synchronised batch_norm: f32 only, got {:?}", x.dtype())
    }
    let all_reduce = |t: &Tensor| t.apply_op1(AllReduceSum(sum.clone()));
    // Sums in f64, as the fused kernel accumulates them: in f32 a channel's sum over a large
    // batch loses enough digits that small-batch BatchNorm amplifies them into the gradients.
    let per_channel = |t: &Tensor| {
        t.to_dtype(DType::F64)?.sum_keepdim(0)?.sum_keepdim(2)?.sum_keepdim(3)?.flatten_all()?.to_dtype(DType::F32)
    };
    let local_count = Tensor::new(&[(n * h * w) as f32], x.device())?;
    let first = all_reduce(&Tensor::cat(&[per_channel(x)?, local_count], 0)?)?;
    let count = first.narrow(0, c, 1)?.to_dtype(DType::F32)?.to_vec1::<f32>()?[0] as usize;
    let mean = (first.narrow(0, 0, c)? / count as f64)?.reshape((1, c, 1, 1))?;
    let centred = x.broadcast_sub(&mean)?;
    let variance = (all_reduce(&per_channel(&centred.sqr()?)?)? / count as f64)?.reshape((1, c, 1, 1))?;
    let normalised = centred.broadcast_div(&(variance.clone() + eps)?.sqrt()?)?;
    let mut output =
        normalised.broadcast_mul(&weight.reshape((1, c, 1, 1))?)?.broadcast_add(&bias.reshape((1, c, 1, 1))?)?;
    if relu {
        output = output.relu()?;
    }
    let (mean, variance) = (mean.flatten_all()?.detach(), variance.flatten_all()?.detach());
    Ok((BatchNormOutput { output, mean, variance }, count))
}

/// `y = Σ_replicas x`, whose gradient is `Σ_replicas dy`: each replica's loss depends on every
/// replica's input through the sum.
struct AllReduceSum(Arc<dyn CrossReplicaSum>);

impl AllReduceSum {
    fn reduce(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else { bail!("all-reduce: f32 only") };
        let mut values: Vec<f32> = match layout.contiguous_offsets() {
            Some((start, end)) => data[start..end].to_vec(),
            None => bail!("all-reduce: the input must be contiguous"),
        };
        self.0.sum(&mut values)?;
        Ok((CpuStorage::F32(values), layout.shape().clone()))
    }
}

impl CustomOp1 for AllReduceSum {
    fn name(&self) -> &'static str {
        "all-reduce-sum"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.reduce(storage, layout)
    }

    /// Through host memory: the statistics are a few thousand numbers per layer.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        let (host, shape) = self.reduce(&storage.to_cpu_storage()?, layout)?;
        Ok((storage.device().storage_from_cpu_storage(&host)?, shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1(AllReduceSum(self.0.clone()))?))
    }
}
