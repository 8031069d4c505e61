//! Decode steps as CUDA graphs: the whole forward of a decode step (some
//! 10 launches per layer) replayed with one launch.
//!
//! A graph is captured the first time a step of its kind comes: a batch
//! size from [`GRAPH_BATCH_SIZES`] (a step of `n` sequences is padded up to
//! the smallest that holds it; padding rows write nothing to the cache) and
//! a context class (the decode kernels' flash-decoding split is fixed in
//! the graph, so it is planned for the class). The graph reads its tokens
//! and step metadata from device buffers of its own, refreshed before each
//! replay, and writes its logits to a buffer of its own.
//!
//! Capture needs a forward that allocates, copies and launches nothing
//! outside the stream; the step is run once eagerly first (which loads
//! every kernel and fills candle's cache of small parameter uploads). If
//! capture fails for any reason, the model logs it once and decodes
//! without graphs from then on: graphs only ever save time.
//!
//! The module knows nothing of the model: it captures and replays the
//! step's body, a closure from the step's tokens and metadata (device
//! buffers) to its logits.

use super::ops::GpuKernels;
use crate::error::{ModelError, Result};
use candle_core::cuda_backend::cudarc::driver::sys::{
    CUgraphInstantiate_flags, CUstreamCaptureMode,
};
use candle_core::cuda_backend::cudarc::driver::CudaGraph;
use candle_core::{Device, Tensor};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Mutex;
use tokenmill_kernels::cuda::launch::DeviceMeta;
use tokenmill_kernels::geometry::{graph_batch_size, graph_context_class};
use tokenmill_kernels::paged::PagedMeta;
use tokenmill_kernels::reference::attention::AttentionShape;

/// A captured, instantiated graph.
struct GraphExec(CudaGraph);

// SAFETY: a CUDA graph may be launched from any thread as long as calls on
// it are serialised; `DecodeGraphs` keeps every graph behind its mutex and
// launches it on the stream it was captured on.
unsafe impl Send for GraphExec {}

/// One captured decode step and the buffers it reads and writes.
struct DecodeGraph {
    exec: GraphExec,
    tokens: Tensor,
    meta: DeviceMeta,
    logits: Tensor,
}

#[derive(Default)]
struct State {
    graphs: HashMap<(usize, usize), DecodeGraph>,
    /// Set when a capture failed: decode eagerly from then on.
    failed: bool,
    replays: u64,
}

/// A decode step as the graphs see it.
pub(crate) struct DecodeStep<'a> {
    /// One token per sequence.
    pub(crate) tokens: &'a [u32],
    /// The step's metadata (`is_decode_only()`).
    pub(crate) meta: &'a PagedMeta,
    /// The attention's heads and widths.
    pub(crate) shape: &'a AttentionShape,
    /// The positions the model holds: the widest block table a graph needs.
    pub(crate) context_length: usize,
}

/// The forward of a decode step, from its tokens and metadata on the device
/// to the logits of every token, with everything on the stream (no host
/// copies, no synchronisation): what a graph captures.
pub(crate) type DecodeBody<'a> = dyn Fn(&Tensor, &DeviceMeta) -> Result<Tensor> + 'a;

/// The decode graphs of one model.
pub(crate) struct DecodeGraphs {
    state: Mutex<State>,
}

impl DecodeGraphs {
    pub(crate) fn new() -> Self {
        DecodeGraphs {
            state: Mutex::new(State::default()),
        }
    }

    /// Runs a decode step as a graph of `body`: `Some(logits)`
    /// (`[sequences, vocab]`, valid until the next step), or `None` when
    /// the step has no graph (too many sequences, or graphs failed) and
    /// must run eagerly.
    pub(crate) fn run(
        &self,
        gpu: &GpuKernels,
        step: &DecodeStep<'_>,
        body: &DecodeBody<'_>,
    ) -> Result<Option<Tensor>> {
        let DecodeStep {
            tokens,
            meta,
            shape,
            context_length,
        } = *step;
        let mut guard = self
            .state
            .lock()
            .map_err(|_| ModelError::Unsupported("decode graphs poisoned".into()))?;
        let state = &mut *guard;
        if state.failed {
            return Ok(None);
        }
        let Some(batch) = graph_batch_size(meta.num_seqs()) else {
            return Ok(None);
        };
        let class = graph_context_class(meta.max_context, context_length);
        let table_width = context_length.div_ceil(meta.block_size);
        // A step whose tables do not fit the graph's runs eagerly.
        let Ok(padded) = meta.padded_decode(batch, table_width) else {
            return Ok(None);
        };
        let mut padded_tokens = tokens.to_vec();
        padded_tokens.resize(batch, 0);
        let key = (batch, class);
        if let Entry::Vacant(slot) = state.graphs.entry(key) {
            let started = std::time::Instant::now();
            match capture(gpu, &padded_tokens, padded.clone(), shape, class, body) {
                Ok(graph) => {
                    tracing::info!(
                        batch,
                        context_class = class,
                        ms = started.elapsed().as_secs_f64() * 1e3,
                        "captured a decode CUDA graph"
                    );
                    slot.insert(graph);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "CUDA graph capture failed; decoding without graphs");
                    state.failed = true;
                    return Ok(None);
                }
            }
        }
        let Some(graph) = state.graphs.get_mut(&key) else {
            return Ok(None);
        };
        graph
            .meta
            .update(gpu.kernels(), padded)
            .map_err(|e| ModelError::InvalidBatch(e.to_string()))?;
        gpu.upload_u32(&graph.tokens, &padded_tokens)?;
        graph
            .exec
            .0
            .launch()
            .map_err(|e| ModelError::Unsupported(format!("replaying a decode graph: {e}")))?;
        let logits = graph.logits.narrow(0, 0, meta.num_seqs())?;
        state.replays += 1;
        Ok(Some(logits))
    }
}

/// Captures the decode step of `tokens` over `meta` (already padded).
fn capture(
    gpu: &GpuKernels,
    tokens: &[u32],
    meta: PagedMeta,
    shape: &AttentionShape,
    context_class: usize,
    body: &DecodeBody<'_>,
) -> Result<DecodeGraph> {
    let cuda = gpu.device();
    let tokens = Tensor::new(tokens, &Device::Cuda(cuda.clone()))?;
    let meta = gpu
        .upload_meta(meta, shape)?
        .with_context_capacity(context_class);
    // While capturing, candle serves its small parameter uploads from this
    // cache, which the eager run fills.
    let _uploads = cuda.enable_cuda_graph_htod_cache();
    let eager = body(&tokens, &meta)?;
    // The graph's output buffer, allocated outside the graph.
    let logits = eager.copy()?;
    drop(eager);
    let stream = gpu.kernels().stream();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| ModelError::Unsupported(format!("beginning a capture: {e}")))?;
    // Everything allocated in the body is freed in it, so the graph owns no
    // memory between replays but its own allocation nodes.
    let captured = body(&tokens, &meta).and_then(|out| Ok(logits.slice_set(&out, 0, 0)?));
    // End the capture whatever happened, so the stream works again.
    let ended = stream
        .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
    captured?;
    let graph = ended
        .map_err(|e| ModelError::Unsupported(format!("instantiating a graph: {e}")))?
        .ok_or_else(|| ModelError::Unsupported("the capture recorded nothing".into()))?;
    graph
        .upload()
        .map_err(|e| ModelError::Unsupported(format!("uploading a graph: {e}")))?;
    Ok(DecodeGraph {
        exec: GraphExec(graph),
        tokens,
        meta,
        logits,
    })
}
