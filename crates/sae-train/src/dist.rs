//! Data parallelism: the collective operations of several processes ("ranks") training one
//! model, on the engines the field trusts: MPI for CPU clusters (feature `mpi`, the system's
//! OpenMPI through the `mpi` crate) and NCCL for GPUs (feature `nccl`, through cudarc). One
//! process, the default, is [`SingleProcess`], whose operations do nothing.
//!
//! How training uses them (see `train.rs`): rank 0's weights and optimiser state are broadcast
//! at the start, each rank reads its shard of every batch (`Loader::with_shard`), gradients are
//! summed in buckets of about [`bucket_bytes`] (not one call per tensor) and divided by the
//! world size before every optimiser step, so the ranks' weights stay identical. With
//! `sync_bn`, BatchNorm's batch statistics are summed over the ranks too
//! (`sae_models::with_sync_batch_norm`).
//!
//! A rank that stops (killed, crashed) must not leave the others waiting for ever: every MPI
//! operation waits at most [`collective_timeout`] and then ends the whole run (`MPI_Abort`)
//! with a message saying why.

use crate::optim::Optimizer;
use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Shape, Tensor, TensorId, Var};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

/// What several training processes do together. Every rank calls the same operations in the
/// same order with buffers of the same length.
pub trait Collective: Send + Sync {
    /// This process's rank, 0-based.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn world_size(&self) -> usize;
    /// The backend's name, for logs: `single`, `mpi` or `nccl`.
    fn backend(&self) -> &'static str;
    /// Replaces `values` by their elementwise sum over the ranks.
    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()>;
    /// Replaces `values` by rank `root`'s.
    fn broadcast(&self, values: &mut [f32], root: usize) -> Result<()>;
    /// Replaces `bytes` by rank `root`'s (of any length).
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()>;
    /// Waits until every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// The elementwise sum of `t` (f32 or bf16, any device) over the ranks. Through host
    /// memory by default; NCCL sums on the device.
    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor> {
        all_reduce_through_host(self, t)
    }
    /// Ends every rank of the run after a fatal error on this one (with MPI, `MPI_Abort`, so
    /// that no rank waits for this one), exiting with `code`.
    fn abort(&self, code: i32) -> !;
}

/// [`Collective::all_reduce_sum_tensor`] through host memory in f32 (MPI has no bf16 sum).
fn all_reduce_through_host<C: Collective + ?Sized>(c: &C, t: &Tensor) -> Result<Tensor> {
    if c.world_size() == 1 {
        return Ok(t.clone());
    }
    let mut values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    c.all_reduce_sum(&mut values)?;
    Ok(Tensor::from_vec(values, t.shape(), t.device())?.to_dtype(t.dtype())?)
}

/// After `result` failed on this rank of a run with several, prints the error with the rank
/// and ends every rank ([`Collective::abort`], exit status 1): the others may be waiting for
/// this one in a collective. With one process, or on success, does nothing.
pub fn abort_all_on_error<T, E: std::fmt::Display>(collective: &dyn Collective, result: &std::result::Result<T, E>) {
    if let (Err(e), true) = (result, collective.world_size() > 1) {
        eprintln!("error: rank {} of {}: {e:#}", collective.rank(), collective.world_size());
        collective.abort(1);
    }
}

/// One process: rank 0 of 1, every operation a no-op.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "single"
    }
    fn all_reduce_sum(&self, _values: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _values: &mut [f32], _root: usize) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _bytes: &mut Vec<u8>, _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// Gradients are summed in buckets of about this many bytes: few enough calls that their
/// latency does not count, small enough not to double the memory (PyTorch DDP's default).
pub const BUCKET_BYTES: usize = 25 << 20;

/// The bucket size training uses: `SAE_ALLREDUCE_BUCKET_MB` MiB, or [`BUCKET_BYTES`].
pub fn bucket_bytes() -> usize {
    let mb = std::env::var("SAE_ALLREDUCE_BUCKET_MB").ok().and_then(|s| s.parse::<f64>().ok());
    mb.filter(|m| *m > 0.0).map_or(BUCKET_BYTES, |m| (m * (1 << 20) as f64) as usize)
}

/// How long a rank waits in one collective operation before it decides that another rank has
/// stopped: `SAE_COLLECTIVE_TIMEOUT` seconds, 600 by default (rank 0 writing a large
/// checkpoint or evaluating keeps the others waiting that long at most).
pub fn collective_timeout() -> Duration {
    let seconds = std::env::var("SAE_COLLECTIVE_TIMEOUT").ok().and_then(|s| s.parse::<f64>().ok());
    Duration::from_secs_f64(seconds.filter(|s| *s > 0.0).unwrap_or(600.0))
}

/// The collective of this process: MPI when it was started by `mpirun` (or another MPI
/// launcher) and built with the `mpi` feature, otherwise a single process. Started by a
/// launcher with several processes but built without the feature, it is an error rather than
/// N independent runs writing into one directory.
pub fn from_environment() -> Result<Arc<dyn Collective>> {
    let launched = launcher_world_size();
    #[cfg(feature = "mpi")]
    if launched.is_some() {
        return Ok(Arc::new(mpi_backend::Mpi::init()?));
    }
    match launched {
        Some(n) if n > 1 => Err(Error::Distributed(format!(
            "started by an MPI launcher with {n} processes, but this build has no MPI support; \
             build with `--features mpi` (which needs OpenMPI's development files)"
        ))),
        _ => Ok(Arc::new(SingleProcess)),
    }
}

/// The collective for training on `device`: with the `nccl` feature, several ranks and a CUDA
/// device, NCCL (bootstrapped over `host`, which keeps the small host-side exchanges);
/// otherwise `host` itself.
pub fn for_device(host: Arc<dyn Collective>, device: &candle_core::Device) -> Result<Arc<dyn Collective>> {
    #[cfg(feature = "nccl")]
    if host.world_size() > 1 && device.is_cuda() {
        return Ok(Arc::new(nccl_backend::Nccl::init(host, device)?));
    }
    let _ = device;
    Ok(host)
}

/// The rank of this process among those on its machine, as MPI launchers announce it (the GPU
/// a rank uses); 0 without a launcher.
pub fn local_rank() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"]
        .iter()
        .find_map(|v| std::env::var(v).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The world size an MPI launcher (OpenMPI, MPICH, Slurm's PMI) announces in the
/// environment, if one started this process.
pub fn launcher_world_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"]
        .iter()
        .find_map(|v| std::env::var(v).ok())
        .and_then(|s| s.parse().ok())
}

/// Sums every trainable variable's gradient over the ranks and divides by the world size (the
/// gradient of the mean loss over the global batch), in buckets of about `bucket_bytes`. A
/// variable without a gradient on this rank contributes zeros.
///
/// Each gradient leaves the store as it is copied into its bucket, so that the bucket replaces
/// the gradients rather than adding to them, and on the CPU the bucket is one vector summed and
/// divided in place: concatenated as a tensor, copied out for MPI and divided into a new one,
/// each 25 MB bucket was held four times over: a SENetV2-ResNet-50 rank (32×32, batch 16)
/// peaked 138 MB above one process, now 85–108 (MPI's own buffers are most of the rest).
pub fn average_gradients(
    collective: &dyn Collective,
    grads: &mut GradStore,
    vars: &[(String, Var)],
    bucket_bytes: usize,
) -> Result<()> {
    let world = collective.world_size();
    if world == 1 {
        return Ok(());
    }
    let sizes: Vec<usize> = vars.iter().map(|(_, v)| v.elem_count()).collect();
    for range in buckets(&sizes, bucket_bytes) {
        let bucket = &vars[range];
        let taken = bucket
            .iter()
            .map(|(_, v)| match grads.remove(v) {
                Some(g) => Ok(g),
                None => v.as_tensor().zeros_like(),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        for ((_, v), mean) in bucket.iter().zip(average_bucket(collective, taken)?) {
            grads.insert(v, mean);
        }
    }
    Ok(())
}

/// Each of `grads` averaged over the ranks, in its own shape and dtype, with one all-reduce
/// for them all; each gradient is let go of once copied into the bucket.
fn average_bucket(collective: &dyn Collective, grads: Vec<Tensor>) -> Result<Vec<Tensor>> {
    let world = collective.world_size();
    let layouts: Vec<(Shape, DType)> = grads.iter().map(|g| (g.shape().clone(), g.dtype())).collect();
    let mean = match grads.iter().all(|g| g.device().is_cpu()) {
        true => {
            let mut values = Vec::with_capacity(grads.iter().map(Tensor::elem_count).sum());
            for g in grads {
                values.extend(g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
            }
            collective.all_reduce_sum(&mut values)?;
            let scale = 1.0 / world as f32;
            values.iter_mut().for_each(|v| *v *= scale);
            let len = values.len();
            Tensor::from_vec(values, len, &candle_core::Device::Cpu)?
        }
        false => {
            let flat = grads.iter().map(|g| g.flatten_all()).collect::<candle_core::Result<Vec<_>>>()?;
            let bucket_sum = collective.all_reduce_sum_tensor(&Tensor::cat(&flat, 0)?)?;
            drop((flat, grads));
            (bucket_sum / world as f64)?
        }
    };
    let mut offset = 0;
    let mut means = Vec::with_capacity(layouts.len());
    for (shape, dtype) in layouts {
        means.push(mean.narrow(0, offset, shape.elem_count())?.reshape(&shape)?.to_dtype(dtype)?);
        offset += shape.elem_count();
    }
    Ok(means)
}

/// The optimiser's update during a data-parallel backward pass (`crate::backward_with_step`):
/// gradients are taken in the order the pass completes them, into buckets of about
/// `bucket_bytes`; each full bucket is averaged over the ranks (one all-reduce, as
/// [`average_gradients`] does) and its variables updated, and what is left when the pass ends
/// goes by [`GradientBuckets::flush`]. With one process each gradient goes straight to the
/// update. Every rank's pass reaches the same variables in the same order (the order is the
/// model's graph's, whatever the batch), so every rank issues the same all-reduces.
pub(crate) struct GradientBuckets<'a> {
    collective: &'a dyn Collective,
    bucket_bytes: usize,
    pending: Vec<(TensorId, Tensor)>,
    bytes: usize,
}

impl<'a> GradientBuckets<'a> {
    pub(crate) fn new(collective: &'a dyn Collective, bucket_bytes: usize) -> Self {
        Self { collective, bucket_bytes, pending: Vec::new(), bytes: 0 }
    }

    /// Takes the gradient of the optimiser's variable `var`.
    pub(crate) fn push(&mut self, var: TensorId, grad: Tensor, optimizer: &mut dyn Optimizer) -> Result<()> {
        if self.collective.world_size() == 1 {
            optimizer.update(var, &grad)?;
            return Ok(());
        }
        self.bytes += grad.elem_count() * std::mem::size_of::<f32>();
        self.pending.push((var, grad));
        if self.bytes >= self.bucket_bytes {
            self.flush(optimizer)?;
        }
        Ok(())
    }

    /// Averages and applies the gradients taken since the last bucket.
    pub(crate) fn flush(&mut self, optimizer: &mut dyn Optimizer) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let (vars, grads): (Vec<TensorId>, Vec<Tensor>) = self.pending.drain(..).unzip();
        self.bytes = 0;
        for (var, mean) in vars.into_iter().zip(average_bucket(self.collective, grads)?) {
            optimizer.update(var, &mean)?;
        }
        Ok(())
    }
}

/// Consecutive ranges of tensors (of `sizes` f32 elements) of at most `bucket_bytes` each,
/// except that a tensor larger than that is a bucket of its own.
fn buckets(sizes: &[usize], bucket_bytes: usize) -> Vec<Range<usize>> {
    let mut ranges: Vec<Range<usize>> = Vec::new();
    let mut bytes = 0;
    for (i, size) in sizes.iter().map(|n| n * 4).enumerate() {
        match ranges.last_mut() {
            Some(last) if bytes + size <= bucket_bytes => {
                last.end = i + 1;
                bytes += size;
            }
            _ => {
                ranges.push(i..i + 1);
                bytes = size;
            }
        }
    }
    ranges
}

/// What [`time_all_reduce`] measured.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct AllReduceTiming {
    /// Processes.
    pub world_size: usize,
    /// f32 elements per all-reduce.
    pub elements: usize,
    /// Median seconds of one all-reduce.
    pub seconds: f64,
    /// Algorithm bandwidth: the buffer's bytes over the time, GB/s.
    pub algorithm_gb_per_s: f64,
    /// Bus bandwidth, `2(W − 1)/W` × the algorithm bandwidth: what a ring all-reduce moves
    /// through each link, comparable across world sizes (as NCCL's tests report it).
    pub bus_gb_per_s: f64,
}

/// Times `repeats` all-reduces of `elements` f32 (after one warm-up) and reports the median;
/// every rank calls it and gets the same numbers (rank 0's).
pub fn time_all_reduce(collective: &dyn Collective, elements: usize, repeats: usize) -> Result<AllReduceTiming> {
    let mut values: Vec<f32> = (0..elements).map(|i| (i % 7) as f32).collect();
    collective.all_reduce_sum(&mut values)?;
    let mut times = Vec::with_capacity(repeats.max(1));
    for _ in 0..repeats.max(1) {
        collective.barrier()?;
        let start = std::time::Instant::now();
        collective.all_reduce_sum(&mut values)?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let mut median = [times[times.len() / 2] as f32];
    collective.broadcast(&mut median, 0)?;
    let seconds = median[0] as f64;
    let world = collective.world_size();
    let algorithm_gb_per_s = (elements * 4) as f64 / seconds / 1e9;
    let bus_gb_per_s = algorithm_gb_per_s * 2.0 * (world as f64 - 1.0) / world as f64;
    Ok(AllReduceTiming { world_size: world, elements, seconds, algorithm_gb_per_s, bus_gb_per_s })
}

/// Sets every tensor of `vars` to rank `root`'s.
pub fn broadcast_vars(collective: &dyn Collective, vars: &[(String, Var)], root: usize) -> Result<()> {
    if collective.world_size() == 1 {
        return Ok(());
    }
    for (_, var) in vars {
        let t = var.as_tensor();
        let mut values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        collective.broadcast(&mut values, root)?;
        var.set(&Tensor::from_vec(values, t.shape(), t.device())?.to_dtype(t.dtype())?)?;
    }
    Ok(())
}

/// Sets every rank's optimiser state to rank `root`'s, one tensor at a time: a header (name,
/// dtype, shape; empty after the last), then the tensor's bytes. Rank `root` sends in the
/// order `load_state` asks for the tensors (`Optimizer::for_each_state_tensor`), so the
/// others load each as it arrives and hold one at a time. (Serialised whole, as it once was,
/// rank 0 held its state twice more and the others received it twice — ~460 MB above a
/// SENetV2-ResNet-50 run's weights and moments, more than its training step's own peak.) At
/// step 0 nothing is sent: every rank built the same optimiser (zero moments).
pub fn broadcast_optimizer_state(
    collective: &dyn Collective,
    optimizer: &mut dyn Optimizer,
    root: usize,
) -> Result<()> {
    if collective.world_size() == 1 {
        return Ok(());
    }
    let mut steps = optimizer.steps().to_le_bytes().to_vec();
    collective.broadcast_bytes(&mut steps, root)?;
    if steps.iter().all(|&b| b == 0) {
        return Ok(());
    }
    if collective.rank() == root {
        optimizer.for_each_state_tensor(&mut |name, t| send_state_tensor(collective, &name, &t, root))?;
        return collective.broadcast_bytes(&mut Vec::new(), root);
    }
    receive_optimizer_state(collective, optimizer, root)
}

/// One tensor of [`broadcast_optimizer_state`], from rank `root`.
fn send_state_tensor(collective: &dyn Collective, name: &str, t: &Tensor, root: usize) -> Result<()> {
    let mut header = serde_json::to_vec(&(name, t.dtype().as_str(), t.dims()))
        .map_err(|e| Error::Distributed(format!("optimiser state {name}: {e}")))?;
    collective.broadcast_bytes(&mut header, root)?;
    let mut data = safetensors::View::data(t).into_owned();
    collective.broadcast_bytes(&mut data, root)
}

/// The other ranks' side of [`broadcast_optimizer_state`]: `load_state` asks for each tensor
/// by name; the next header that arrives is either that tensor's (its bytes are received and
/// handed over) or a later one's (the asked tensor was not saved; the header waits for its
/// name). A header left when `load_state` has done means rank `root` sent out of that order:
/// an error, after the rest is received so that every rank's broadcasts still pair up.
fn receive_optimizer_state(collective: &dyn Collective, optimizer: &mut dyn Optimizer, root: usize) -> Result<()> {
    let bad = |what: String| Error::Distributed(format!("rank {root} sent an unreadable optimiser state: {what}"));
    // The header received and not yet asked for; `None` inside once the empty one has come.
    let mut next: Option<Option<(String, DType, Vec<usize>)>> = None;
    let receive_header = || -> Result<Option<(String, DType, Vec<usize>)>> {
        let mut header = Vec::new();
        collective.broadcast_bytes(&mut header, root)?;
        if header.is_empty() {
            return Ok(None);
        }
        let (name, dtype, dims): (String, String, Vec<usize>) =
            serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
        let dtype: DType = dtype.parse().map_err(|e| bad(format!("{name}: {e}")))?;
        Ok(Some((name, dtype, dims)))
    };
    let loaded = optimizer.load_state(
        &mut |name| {
            let header = match next.take() {
                Some(header) => header,
                None => receive_header()?,
            };
            match header {
                Some((sent, dtype, dims)) if sent == name => {
                    let mut data = Vec::new();
                    collective.broadcast_bytes(&mut data, root)?;
                    // On the CPU: `load_state` moves each tensor to its variable's device.
                    let t = Tensor::from_raw_buffer(&data, dtype, &dims, &candle_core::Device::Cpu)
                        .map_err(|e| bad(format!("{name}: {e}")))?;
                    Ok(Some(t))
                }
                other => {
                    next = Some(other);
                    Ok(None)
                }
            }
        },
        std::path::Path::new("<the optimiser state rank 0 sent>"),
    );
    // Whatever `load_state` did not take is received, and is an error.
    let mut left = Vec::new();
    let mut header = match next {
        Some(header) => header,
        None => receive_header()?,
    };
    while let Some((name, ..)) = header {
        collective.broadcast_bytes(&mut Vec::new(), root)?;
        left.push(name);
        header = receive_header()?;
    }
    loaded?;
    if !left.is_empty() {
        return Err(bad(format!("tensors out of the order the optimiser loads them in, or not its own: {left:?}")));
    }
    Ok(())
}

/// Makes `sae_models`' synchronised BatchNorm sum its statistics over the ranks.
pub(crate) struct BatchNormSum(pub Arc<dyn Collective>);

impl sae_models::CrossReplicaSum for BatchNormSum {
    fn sum(&self, values: &mut [f32]) -> candle_core::Result<()> {
        self.0.all_reduce_sum(values).map_err(candle_core::Error::wrap)
    }
}

#[cfg(feature = "mpi")]
pub use mpi_backend::Mpi;

#[cfg(feature = "mpi")]
mod mpi_backend {
    //! MPI through the `mpi` crate. Every operation is a non-blocking one (`MPI_Iallreduce`,
    //! `MPI_Ibcast`, `MPI_Ibarrier`) polled until it completes or [`collective_timeout`]
    //! passes, when the run is aborted: blocking MPI calls would wait for a dead rank for ever.

    use super::{collective_timeout, Collective};
    use crate::{Error, Result};
    use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
    use mpi::environment::Universe;
    use mpi::request::{Request, Scope};
    use mpi::topology::{Communicator, SimpleCommunicator};
    use mpi::Threading;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    /// The MPI world. MPI is initialised for serialised use from any thread (Candle runs the
    /// training step on a thread of its pool), and the mutex serialises the calls.
    pub struct Mpi {
        world: Mutex<SimpleCommunicator>,
        rank: usize,
        size: usize,
        timeout: Duration,
        // Finalises MPI when dropped; after `world`.
        _universe: Universe,
    }

    // SAFETY: the MPI handles are used only under the mutex, and MPI was initialised with at
    // least `MPI_THREAD_SERIALIZED`, which allows calls from any thread one at a time.
    unsafe impl Send for Mpi {}
    // SAFETY: as above.
    unsafe impl Sync for Mpi {}

    impl Mpi {
        /// Initialises MPI (once per process).
        pub fn init() -> Result<Self> {
            let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
                .ok_or_else(|| Error::Distributed("MPI was already initialised in this process".into()))?;
            if threading < Threading::Serialized {
                return Err(Error::Distributed(format!(
                    "this MPI library offers thread level {threading:?}; serialised calls from any thread are needed"
                )));
            }
            let world = universe.world();
            let (rank, size) = (world.rank() as usize, world.size() as usize);
            Ok(Self { world: Mutex::new(world), rank, size, timeout: collective_timeout(), _universe: universe })
        }

        fn world(&self) -> std::sync::MutexGuard<'_, SimpleCommunicator> {
            // A panic while holding it cannot leave MPI state half-changed on our side.
            self.world.lock().unwrap_or_else(|e| e.into_inner())
        }

        /// Polls `request` until it completes; past the timeout, ends the run.
        fn wait<'a, D: ?Sized, S: Scope<'a>>(
            &self,
            world: &SimpleCommunicator,
            mut request: Request<'a, D, S>,
            what: &str,
        ) {
            let start = Instant::now();
            loop {
                match request.test() {
                    Ok(_) => return,
                    Err(pending) => request = pending,
                }
                if start.elapsed() > self.timeout {
                    eprintln!(
                        "sae: rank {} of {}: {what} waited {:.0} s for the other ranks; one of them has stopped or \
                         hangs. Ending the run (resume it from its last checkpoint; SAE_COLLECTIVE_TIMEOUT sets the wait).",
                        self.rank,
                        self.size,
                        start.elapsed().as_secs_f64()
                    );
                    world.abort(3);
                }
                std::thread::yield_now();
            }
        }
    }

    impl Collective for Mpi {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.size
        }
        fn backend(&self) -> &'static str {
            "mpi"
        }
        fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()> {
            // Every rank has the same length; OpenMPI rejects an operation on nothing (MPI_ERR_ARG).
            if values.is_empty() {
                return Ok(());
            }
            let world = self.world();
            let send = values.to_vec();
            mpi::request::scope(|scope| {
                let request = world.immediate_all_reduce_into(scope, &send[..], values, SystemOperation::sum());
                self.wait(&world, request, "an all-reduce");
            });
            Ok(())
        }
        fn broadcast(&self, values: &mut [f32], root: usize) -> Result<()> {
            if values.is_empty() {
                return Ok(());
            }
            let world = self.world();
            let root = world.process_at_rank(root as i32);
            mpi::request::scope(|scope| {
                let request = root.immediate_broadcast_into(scope, values);
                self.wait(&world, request, "a broadcast");
            });
            Ok(())
        }
        fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
            // The length first, so that the other ranks can size their buffers.
            let mut len_bytes = (bytes.len() as u64).to_le_bytes();
            {
                let world = self.world();
                let process = world.process_at_rank(root as i32);
                mpi::request::scope(|scope| {
                    let request = process.immediate_broadcast_into(scope, &mut len_bytes[..]);
                    self.wait(&world, request, "a broadcast");
                });
            }
            bytes.resize(u64::from_le_bytes(len_bytes) as usize, 0);
            if bytes.is_empty() {
                // Every rank knows it now; OpenMPI rejects a broadcast of nothing (MPI_ERR_ARG).
                return Ok(());
            }
            let world = self.world();
            let process = world.process_at_rank(root as i32);
            mpi::request::scope(|scope| {
                let request = process.immediate_broadcast_into(scope, &mut bytes[..]);
                self.wait(&world, request, "a broadcast");
            });
            Ok(())
        }
        fn barrier(&self) -> Result<()> {
            let world = self.world();
            let request = world.immediate_barrier();
            self.wait(&world, request, "a barrier");
            Ok(())
        }
        fn abort(&self, code: i32) -> ! {
            self.world().abort(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn buckets_hold_consecutive_tensors_up_to_the_size() {
        // 4 bytes per element; buckets of 40 bytes = 10 elements.
        assert_eq!(buckets(&[3, 3, 3, 3, 20, 1, 9, 10], 40), vec![0..3, 3..4, 4..5, 5..7, 7..8]);
        assert_eq!(buckets(&[], 40), Vec::<Range<usize>>::new());
        assert_eq!(buckets(&[1; 5], 1 << 20), vec![0..5]);
    }

    #[test]
    fn one_process_leaves_gradients_and_weights_alone() {
        let var = Var::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let loss = (var.as_tensor() * 2.0).unwrap().sum_all().unwrap();
        let mut grads = loss.backward().unwrap();
        let vars = vec![("w".to_string(), var.clone())];
        average_gradients(&SingleProcess, &mut grads, &vars, BUCKET_BYTES).unwrap();
        broadcast_vars(&SingleProcess, &vars, 0).unwrap();
        assert_eq!(grads.get(&var).unwrap().to_vec1::<f32>().unwrap(), [2.0, 2.0, 2.0]);
        assert_eq!(var.to_vec1::<f32>().unwrap(), [1.0, 2.0, 3.0]);
        let t = Tensor::new(&[1.5f32], &Device::Cpu).unwrap();
        assert_eq!(SingleProcess.all_reduce_sum_tensor(&t).unwrap().to_vec1::<f32>().unwrap(), [1.5]);
    }

    /// Two ranks as two threads of this process: a broadcast goes through a shared slot.
    struct Threads {
        rank: usize,
        slot: Arc<(std::sync::Mutex<Vec<u8>>, std::sync::Barrier)>,
        /// Broadcasts made, to check what was sent.
        broadcasts: std::sync::atomic::AtomicUsize,
    }

    impl Collective for Threads {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            2
        }
        fn backend(&self) -> &'static str {
            "threads"
        }
        fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()> {
            let mut sum = vec![0f32; values.len()];
            for root in 0..2 {
                let mut theirs = values.to_vec();
                self.broadcast(&mut theirs, root)?;
                sum.iter_mut().zip(theirs).for_each(|(s, v)| *s += v);
            }
            values.copy_from_slice(&sum);
            Ok(())
        }
        fn broadcast(&self, values: &mut [f32], root: usize) -> Result<()> {
            let mut bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.broadcast_bytes(&mut bytes, root)?;
            values
                .iter_mut()
                .zip(bytes.chunks_exact(4))
                .for_each(|(v, b)| *v = f32::from_le_bytes(b.try_into().unwrap()));
            Ok(())
        }
        fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
            self.broadcasts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (shared, barrier) = &*self.slot;
            if self.rank == root {
                *shared.lock().unwrap() = bytes.clone();
            }
            barrier.wait();
            if self.rank != root {
                *bytes = shared.lock().unwrap().clone();
            }
            barrier.wait();
            Ok(())
        }
        fn barrier(&self) -> Result<()> {
            self.slot.1.wait();
            Ok(())
        }
        fn abort(&self, _code: i32) -> ! {
            panic!("abort")
        }
    }

    /// Rank 0's optimiser after `steps` updates and rank 1's as built, each over its own
    /// variables of the same shapes (one of them not interleaved: bf16).
    fn optimisers(config: &crate::optim::OptimizerConfig, steps: usize) -> [Box<dyn Optimizer>; 2] {
        let vars = |seed: f32| -> Vec<(String, Var)> {
            let t = |dims: &[usize], dtype| {
                let n: usize = dims.iter().product();
                let values: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect();
                Var::from_tensor(&Tensor::from_vec(values, dims, &Device::Cpu).unwrap().to_dtype(dtype).unwrap())
                    .unwrap()
            };
            vec![
                ("a".into(), t(&[3, 5], DType::F32)),
                ("b".into(), t(&[7], DType::F32)),
                ("c".into(), t(&[4], DType::BF16)),
            ]
        };
        let (root_vars, other_vars) = (vars(0.0), vars(1.0));
        let mut root = config.build(root_vars.clone(), sae_kernels::Implementation::Fused);
        for step in 0..steps {
            let loss = root_vars
                .iter()
                .map(|(_, v)| {
                    (v.as_tensor().to_dtype(DType::F32).unwrap().sqr().unwrap() * (step + 1) as f64)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                })
                .reduce(|a, b| (a + b).unwrap())
                .unwrap();
            root.step(&loss.backward().unwrap()).unwrap();
        }
        [root, config.build(other_vars, sae_kernels::Implementation::Fused)]
    }

    fn state_values(optimizer: &dyn Optimizer) -> Vec<(String, Vec<f64>)> {
        let tensors = optimizer.state_tensors().unwrap();
        tensors
            .into_iter()
            .map(|(name, t)| (name, t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap()))
            .collect()
    }

    /// Runs [`broadcast_optimizer_state`] on two threads; returns the broadcasts each made.
    fn broadcast_between_threads(optimizers: &mut [Box<dyn Optimizer>; 2]) -> [usize; 2] {
        let slot = Arc::new((std::sync::Mutex::new(Vec::new()), std::sync::Barrier::new(2)));
        std::thread::scope(|s| {
            let handles: Vec<_> = optimizers
                .iter_mut()
                .enumerate()
                .map(|(rank, optimizer)| {
                    let c = Threads { rank, slot: slot.clone(), broadcasts: Default::default() };
                    s.spawn(move || {
                        broadcast_optimizer_state(&c, optimizer.as_mut(), 0).unwrap();
                        c.broadcasts.into_inner()
                    })
                })
                .collect();
            let counts: Vec<usize> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            [counts[0], counts[1]]
        })
    }

    #[test]
    fn the_other_ranks_receive_rank_0s_optimiser_state() {
        let sgd = crate::optim::OptimizerConfig::paper_sgd();
        for config in [crate::optim::OptimizerConfig::keras_adam(), sgd] {
            let mut optimizers = optimisers(&config, 3);
            let want = state_values(optimizers[0].as_ref());
            assert_ne!(state_values(optimizers[1].as_ref()), want, "{config:?}: the test needs states that differ");
            broadcast_between_threads(&mut optimizers);
            assert_eq!(state_values(optimizers[1].as_ref()), want, "{config:?}");
            assert_eq!(state_values(optimizers[0].as_ref()), want, "{config:?}: rank 0 changed");
            assert_eq!(optimizers[1].steps(), 3);
        }
    }

    /// The receiving ranks load each tensor as it arrives, which needs rank 0 to send in the
    /// order `load_state` asks.
    #[test]
    fn optimisers_hand_their_state_over_in_the_order_they_load_it() {
        let sgd = crate::optim::OptimizerConfig::paper_sgd();
        // Adam has two moments per variable, SGD a momentum buffer.
        for (config, moments) in [(crate::optim::OptimizerConfig::keras_adam(), 2), (sgd, 1)] {
            let [mut root, _] = optimisers(&config, 3);
            let mut sent = Vec::new();
            let mut tensors = std::collections::HashMap::new();
            root.for_each_state_tensor(&mut |name, t| {
                sent.push(name.clone());
                tensors.insert(name, t);
                Ok(())
            })
            .unwrap();
            let mut asked = Vec::new();
            let source = &mut |name: &str| {
                asked.push(name.to_string());
                Ok(tensors.get(name).cloned())
            };
            root.load_state(source, std::path::Path::new("test")).unwrap();
            asked.retain(|name| tensors.contains_key(name));
            assert_eq!(sent, asked, "{config:?}");
            assert_eq!(sent.len(), 1 + moments * 3, "{config:?}: the step and each variable's state: {sent:?}");
        }
    }

    /// A state sent in another order is received whole (every broadcast pairs up) and refused,
    /// not loaded as zeroes where a tensor came later than asked for.
    #[test]
    fn a_state_sent_out_of_order_is_an_error() {
        let mut optimizers = optimisers(&crate::optim::OptimizerConfig::keras_adam(), 2);
        let mut tensors = Vec::new();
        optimizers[0]
            .for_each_state_tensor(&mut |name, t| {
                tensors.push((name, t));
                Ok(())
            })
            .unwrap();
        // `step` first still (without it the load fails on that), the moments backwards.
        tensors[1..].reverse();
        let slot = Arc::new((std::sync::Mutex::new(Vec::new()), std::sync::Barrier::new(2)));
        let [_, receiver] = &mut optimizers;
        let err = std::thread::scope(|s| {
            let sender = Threads { rank: 0, slot: slot.clone(), broadcasts: Default::default() };
            let tensors = &tensors;
            s.spawn(move || {
                for (name, t) in tensors {
                    send_state_tensor(&sender, name, t, 0).unwrap();
                }
                sender.broadcast_bytes(&mut Vec::new(), 0).unwrap();
            });
            let c = Threads { rank: 1, slot: slot.clone(), broadcasts: Default::default() };
            receive_optimizer_state(&c, receiver.as_mut(), 0).unwrap_err().to_string()
        });
        assert!(err.contains("out of the order"), "{err}");
    }

    /// Two ranks, each with its own images: the update during the backward pass, with buckets
    /// small enough to make many, leaves the weights bit for bit where averaging all the
    /// gradients after the pass and then stepping leaves them, on both ranks.
    #[test]
    fn the_update_during_a_data_parallel_backward_pass_equals_the_step_after_it() {
        let model = || {
            let mut cfg = sae_models::config("seresnet14b", 10).unwrap();
            cfg.stem = sae_models::Stem::Cifar;
            sae_models::Model::new(cfg, 5, &Device::Cpu).unwrap()
        };
        let weights = |model: &sae_models::Model| -> Vec<f32> {
            let values = |v: &Var| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            model.trainable_vars().iter().flat_map(|(_, v)| values(v)).collect()
        };
        let run = |rank: usize, c: &Threads, during: bool| -> Vec<f32> {
            let model = model();
            let mut optimizer = crate::optim::OptimizerConfig::keras_adam()
                .build(model.trainable_vars(), sae_kernels::Implementation::Fused);
            let vars = optimizer.variable_ids().into_iter().collect();
            let pixels: Vec<f32> = (0..2 * 3 * 8 * 8).map(|i| (i as f32 * 0.37 + rank as f32).sin()).collect();
            let x = Tensor::from_vec(pixels, (2, 3, 8, 8), &Device::Cpu).unwrap();
            let labels = Tensor::new(&[rank as u32, 3 + rank as u32], &Device::Cpu).unwrap();
            for _ in 0..2 {
                let forward = |x: &Tensor| candle_core::ModuleT::forward_t(&model, x, true);
                let loss = crate::forward_loss(forward, &x, &labels, None, 0.0, 1).unwrap().2;
                if during {
                    crate::train::backward_with_averaged_step(loss, optimizer.as_mut(), &vars, c, 64 << 10, None)
                        .unwrap();
                } else {
                    let mut grads = loss.backward_consuming().unwrap();
                    average_gradients(c, &mut grads, &model.trainable_vars(), 64 << 10).unwrap();
                    optimizer.step(&grads).unwrap();
                }
            }
            weights(&model)
        };
        let both_ranks = |during: bool| -> Vec<Vec<f32>> {
            let slot = Arc::new((std::sync::Mutex::new(Vec::new()), std::sync::Barrier::new(2)));
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..2)
                    .map(|rank| {
                        let c = Threads { rank, slot: slot.clone(), broadcasts: Default::default() };
                        s.spawn(move || run(rank, &c, during))
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            })
        };
        let (start, after, during) = (weights(&model()), both_ranks(false), both_ranks(true));
        assert!(after[0] != start, "the steps changed nothing");
        assert!(after[0] == after[1], "the ranks differ after the step after the pass");
        assert!(during[0] == during[1], "the ranks differ with the update during the pass");
        assert!(during[0] == after[0], "the update during the pass differs from the step after it");
    }

    #[test]
    fn gradients_are_averaged_over_the_ranks_bucket_by_bucket() {
        let slot = Arc::new((std::sync::Mutex::new(Vec::new()), std::sync::Barrier::new(2)));
        let ranks: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|rank| {
                    let c = Threads { rank, slot: slot.clone(), broadcasts: Default::default() };
                    s.spawn(move || {
                        let var = |values: &[f32], dtype| {
                            Var::from_tensor(&Tensor::new(values, &Device::Cpu).unwrap().to_dtype(dtype).unwrap())
                                .unwrap()
                        };
                        let vars: Vec<(String, Var)> = vec![
                            ("a".into(), var(&[1.0, 2.0, 3.0], DType::F32)),
                            ("b".into(), var(&[1.0; 4], DType::F32)),
                            ("c".into(), var(&[0.5, 0.25], DType::BF16)),
                        ];
                        // Rank r's loss: (r + 1)·Σ a² + Σ c; only rank 1 has a gradient for b.
                        let r = (rank + 1) as f64;
                        let mut loss = ((vars[0].1.as_tensor().sqr().unwrap() * r).unwrap().sum_all().unwrap()
                            + vars[2].1.as_tensor().to_dtype(DType::F32).unwrap().sum_all().unwrap())
                        .unwrap();
                        if rank == 1 {
                            loss = (loss + (vars[1].1.as_tensor() * 4.0).unwrap().sum_all().unwrap()).unwrap();
                        }
                        let mut grads = loss.backward().unwrap();
                        // 12 bytes per bucket: a, then b, then c (each its own).
                        average_gradients(&c, &mut grads, &vars, 12).unwrap();
                        let get = |i: usize| {
                            let g = grads.get(&vars[i].1).unwrap();
                            (g.dtype(), g.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap())
                        };
                        [get(0), get(1), get(2)]
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for got in ranks {
            // d/da: (2·a + 4·a) / 2 = 3·a; d/db: (0 + 4) / 2; d/dc: (1 + 1) / 2, in bf16.
            assert_eq!(got[0], (DType::F32, vec![3.0, 6.0, 9.0]));
            assert_eq!(got[1], (DType::F32, vec![2.0; 4]));
            assert_eq!(got[2], (DType::BF16, vec![1.0, 1.0]));
        }
    }

    #[test]
    fn at_step_0_only_the_step_count_is_sent() {
        let mut optimizers = optimisers(&crate::optim::OptimizerConfig::keras_adam(), 0);
        assert_eq!(broadcast_between_threads(&mut optimizers), [1, 1]);
        assert_eq!(state_values(optimizers[1].as_ref()), state_values(optimizers[0].as_ref()));
    }
}

#[cfg(feature = "nccl")]
mod nccl_backend {
    //! NCCL through cudarc (Candle's `nccl` feature): gradients are summed on the GPU, in f32
    //! or bf16, on Candle's stream. The NCCL id travels from rank 0 over the host collective
    //! (MPI), which also carries the small host-side exchanges (statistics, state, barriers).

    use super::Collective;
    use crate::{Error, Result};
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, ValidAsZeroBits};
    use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
    use candle_core::cuda_backend::{CudaDType, CudaStorage};
    use candle_core::op::BackpropOp;
    use candle_core::{DType, Device, Storage, Tensor};
    use std::sync::{Arc, Mutex};

    /// An NCCL communicator over one GPU per rank.
    pub struct Nccl {
        comm: Mutex<Comm>,
        device: candle_core::CudaDevice,
        host: Arc<dyn Collective>,
    }

    // SAFETY: the communicator is used only under the mutex, one call at a time, on the
    // stream it was created with.
    unsafe impl Send for Nccl {}
    // SAFETY: as above.
    unsafe impl Sync for Nccl {}

    fn nccl_error(e: impl std::fmt::Debug) -> Error {
        Error::Distributed(format!("NCCL: {e:?}"))
    }

    impl Nccl {
        /// Creates the communicator of `host`'s ranks on `device` (a CUDA device).
        pub fn init(host: Arc<dyn Collective>, device: &Device) -> Result<Self> {
            let Device::Cuda(cuda) = device else {
                return Err(Error::Distributed("NCCL needs a CUDA device".into()));
            };
            let mut id_bytes = match host.rank() {
                0 => Id::new().map_err(nccl_error)?.internal().iter().map(|c| *c as u8).collect(),
                _ => Vec::new(),
            };
            host.broadcast_bytes(&mut id_bytes, 0)?;
            let mut internal = [0 as std::ffi::c_char; 128];
            if id_bytes.len() != internal.len() {
                return Err(Error::Distributed(format!("NCCL id of {} bytes from rank 0", id_bytes.len())));
            }
            for (dst, src) in internal.iter_mut().zip(&id_bytes) {
                *dst = *src as std::ffi::c_char;
            }
            let comm = Comm::from_rank(cuda.cuda_stream(), host.rank(), host.world_size(), Id::uninit(internal))
                .map_err(nccl_error)?;
            Ok(Self { comm: Mutex::new(comm), device: cuda.clone(), host })
        }

        fn sum<T: CudaDType + NcclType + DeviceRepr + ValidAsZeroBits>(
            &self,
            storage: &CudaStorage,
            start: usize,
            len: usize,
        ) -> Result<CudaStorage> {
            let src = storage.as_cuda_slice::<T>()?.slice(start..start + len);
            let mut dst = self.device.alloc_zeros::<T>(len)?;
            let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
            comm.all_reduce(&src, &mut dst, &ReduceOp::Sum).map_err(nccl_error)?;
            Ok(CudaStorage::wrap_cuda_slice(dst, self.device.clone()))
        }
    }

    impl Collective for Nccl {
        fn rank(&self) -> usize {
            self.host.rank()
        }
        fn world_size(&self) -> usize {
            self.host.world_size()
        }
        fn backend(&self) -> &'static str {
            "nccl"
        }
        fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()> {
            self.host.all_reduce_sum(values)
        }
        fn broadcast(&self, values: &mut [f32], root: usize) -> Result<()> {
            self.host.broadcast(values, root)
        }
        fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
            self.host.broadcast_bytes(bytes, root)
        }
        fn barrier(&self) -> Result<()> {
            self.host.barrier()
        }
        fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor> {
            let t = t.contiguous()?;
            let summed = {
                let (storage, layout) = t.storage_and_layout();
                let (Storage::Cuda(cuda), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
                    return super::all_reduce_through_host(self, &t);
                };
                match t.dtype() {
                    DType::F32 => self.sum::<f32>(cuda, start, end - start)?,
                    DType::BF16 => self.sum::<half::bf16>(cuda, start, end - start)?,
                    _ => return super::all_reduce_through_host(self, &t),
                }
            };
            Ok(Tensor::from_storage(Storage::Cuda(summed), t.shape(), BackpropOp::none(), false))
        }
        fn abort(&self, code: i32) -> ! {
            self.host.abort(code)
        }
    }
}
