//! The device copies of active adapters (the active tier in GPU memory): one buffer per
//! adapter version holding every site's A and B in the model's dtype, and a descriptor
//! table (`SiteDesc` in sgmv.cu: A address, B address, rank, scale) per layer and site
//! that the step's slot table points at.
//!
//! Copies run off the engine thread: [`AdapterCache::prepare`] (called by the engine
//! when a request's adapter is activated) starts one on a background thread, which
//! converts the weights to the model's dtype and copies them on the backend's side
//! stream while steps go on; the request is scheduled once its copy is ready. A step
//! that needs an adapter nobody prepared (tests, benches) copies it synchronously.
//!
//! Invariants: an entry is keyed by its host weights' `Arc` address and holds a `Weak`
//! to them, so the address cannot be reused while the entry lives; an entry is dropped
//! when the engine evicts that version from its active pool ([`AdapterCache::release`])
//! or when the host weights are gone; a ready copy has finished its transfer (its side
//! stream was synchronised) before any step reads it; a step holds `Arc`s to the copies
//! it reads, so a release during a step frees nothing it uses on the host side; on the
//! device side (cudarc's event tracking is off, see `super`), dropping a copy first makes
//! the side stream, on which its memory is freed, wait for the step stream's work enqueued
//! so far, so no kernel still reading it races the free. Every A and B starts 16-byte
//! aligned in the buffer (sgmv.cu's vector loads rely on it).
use crate::lora::peft::AdapterWeights;
use anyhow::{anyhow, bail, Result};
use candle_core::cuda::cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use candle_core::DType;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;

/// u64 words per `SiteDesc` (two addresses, then rank and scale packed in one word).
pub(super) const DESC_WORDS: usize = 3;

/// One adapter version on the device.
pub struct DeviceAdapter {
    /// The stream its memory was allocated on, which frees it (the side stream)...
    copy_stream: Arc<CudaStream>,
    /// ...after the work this stream (the steps') has queued when the copy is dropped.
    step_stream: Arc<CudaStream>,
    /// Every A and B, in the model's dtype; addressed by `descs`.
    _weights: CudaSlice<u8>,
    /// `SiteDesc[num_layers * 7]`.
    descs: CudaSlice<u64>,
    /// Per layer, bit `site.index()` set where this adapter has weights.
    sites: Vec<u8>,
    pub rank_max: usize,
    pub bytes: usize,
}

/// `values` in `dtype`, little-endian bytes.
fn encode(values: &[f32], dtype: DType) -> Result<Vec<u8>> {
    Ok(match dtype {
        DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        DType::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        other => bail!("adapters cannot be kept in {other:?}"),
    })
}

impl DeviceAdapter {
    /// Whether this adapter has weights at `site` (`LoraSite::index`) of `layer`.
    pub fn has_site(&self, layer: usize, site: usize) -> bool {
        self.sites
            .get(layer)
            .is_some_and(|bits| bits & (1 << site) != 0)
    }

    /// The device address of this adapter's descriptor table.
    pub fn descs_ptr(&self, stream: &CudaStream) -> u64 {
        self.descs.device_ptr(stream).0
    }

    /// Converts and copies `w` on the copy stream; returns once the copy has finished.
    fn upload(w: &AdapterWeights, dtype: DType, streams: &Streams) -> Result<Self> {
        let stream = &streams.copy;
        let align = 16 / dtype.size_in_bytes();
        let pairs = w.layers.iter().flatten().flatten();
        if pairs
            .clone()
            .any(|p| p.rank_scale.is_some() || p.out_scale.is_some())
        {
            bail!("rank and output scales (VeRA) are not served on CUDA");
        }
        let values: usize = pairs.map(|p| p.a.len() + p.b.len()).sum();
        let mut host: Vec<f32> = Vec::with_capacity(values + 64);
        let mut place = |values: &[f32]| {
            host.resize(host.len().next_multiple_of(align), 0.0);
            let at = host.len();
            host.extend_from_slice(values);
            at
        };
        let offsets: Vec<_> = w
            .layers
            .iter()
            .flatten()
            .map(|pair| {
                pair.as_ref()
                    .map(|p| (place(&p.a.to_f32()), place(&p.b.to_f32()), p.rank, p.scale))
            })
            .collect();
        host.resize(host.len().max(1), 0.0);
        let bytes = encode(&host, dtype)?;
        let weights = stream.clone_htod(&bytes)?;
        let base = weights.device_ptr(stream).0;
        let elem = dtype.size_in_bytes() as u64;
        let mut table = Vec::with_capacity(offsets.len() * DESC_WORDS);
        for entry in offsets {
            match entry {
                Some((a, b, rank, scale)) => {
                    let packed = rank as u64 | (u64::from(scale.to_bits()) << 32);
                    table.extend([base + a as u64 * elem, base + b as u64 * elem, packed]);
                }
                None => table.extend([0, 0, 0]),
            }
        }
        let descs = stream.clone_htod(&table)?;
        stream.synchronize()?;
        let sites = w
            .layers
            .iter()
            .map(|l| {
                (0..l.len())
                    .filter(|&i| l[i].is_some())
                    .fold(0u8, |b, i| b | 1 << i)
            })
            .collect();
        Ok(Self {
            copy_stream: stream.clone(),
            step_stream: streams.step.clone(),
            sites,
            bytes: bytes.len(),
            _weights: weights,
            descs,
            rank_max: w.rank_max,
        })
    }
}

impl Drop for DeviceAdapter {
    fn drop(&mut self) {
        // The buffers are freed on the copy stream when the fields drop, after this:
        // order that free after every step kernel already queued (the last step holding
        // this copy has queued all of its kernels by the time its `Arc` goes).
        if let Err(e) = self.copy_stream.join(&self.step_stream) {
            tracing::warn!("ordering an adapter's release after the step stream: {e}");
        }
    }
}

/// The two streams an adapter copy involves.
#[derive(Clone)]
struct Streams {
    /// Copies run (and device copies are freed) here.
    copy: Arc<CudaStream>,
    /// Steps run here.
    step: Arc<CudaStream>,
}

enum State {
    Copying(JoinHandle<Result<DeviceAdapter>>),
    Ready(Arc<DeviceAdapter>),
}

struct Entry {
    host: Weak<AdapterWeights>,
    state: State,
}

/// The device copies of the adapters the engine activated and has not evicted.
pub struct AdapterCache {
    entries: Mutex<HashMap<usize, Entry>>,
    streams: Streams,
    dtype: DType,
}

fn key(w: &Arc<AdapterWeights>) -> usize {
    Arc::as_ptr(w) as usize
}

impl AdapterCache {
    /// Copies run on `copy_stream` (not `step_stream`, which steps run on).
    pub fn new(copy_stream: Arc<CudaStream>, step_stream: Arc<CudaStream>, dtype: DType) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            streams: Streams {
                copy: copy_stream,
                step: step_stream,
            },
            dtype,
        }
    }

    /// Whether `w`'s device copy is ready; starts copying it in the background if no
    /// copy exists. A copy that failed is forgotten and reported ready, so that the
    /// step that uses it retries synchronously and reports the error.
    pub fn prepare(&self, w: &Arc<AdapterWeights>) -> bool {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(&key(w)) else {
            entries.retain(|_, e| e.host.strong_count() > 0);
            let (weights, dtype, streams) = (w.clone(), self.dtype, self.streams.clone());
            let copy = std::thread::spawn(move || DeviceAdapter::upload(&weights, dtype, &streams));
            let state = State::Copying(copy);
            entries.insert(
                key(w),
                Entry {
                    host: Arc::downgrade(w),
                    state,
                },
            );
            return false;
        };
        match &entry.state {
            State::Ready(_) => true,
            State::Copying(copy) if !copy.is_finished() => false,
            State::Copying(_) => {
                let Some(Entry {
                    host,
                    state: State::Copying(copy),
                }) = entries.remove(&key(w))
                else {
                    return true;
                };
                match join(copy) {
                    Ok(device) => {
                        let state = State::Ready(Arc::new(device));
                        entries.insert(key(w), Entry { host, state });
                    }
                    Err(e) => tracing::warn!("copying an adapter to the device failed: {e:#}"),
                }
                true
            }
        }
    }

    /// The device copy of `w`: waits for a copy in flight, or copies it now.
    pub fn get(&self, w: &Arc<AdapterWeights>) -> Result<Arc<DeviceAdapter>> {
        let pending = {
            let mut entries = self.lock();
            match entries.remove(&key(w)) {
                Some(Entry {
                    host,
                    state: State::Ready(device),
                }) => {
                    let state = State::Ready(device.clone());
                    entries.insert(key(w), Entry { host, state });
                    return Ok(device);
                }
                Some(Entry {
                    state: State::Copying(copy),
                    ..
                }) => Some(copy),
                None => None,
            }
        };
        let device = match pending {
            Some(copy) => join(copy)?,
            None => DeviceAdapter::upload(w, self.dtype, &self.streams)?,
        };
        let device = Arc::new(device);
        let state = State::Ready(device.clone());
        self.lock().insert(
            key(w),
            Entry {
                host: Arc::downgrade(w),
                state,
            },
        );
        Ok(device)
    }

    /// Drops the device copy of `w` (freed once no step holds it; a copy in flight
    /// finishes on its thread and is freed there).
    pub fn release(&self, w: &Arc<AdapterWeights>) {
        self.lock().remove(&key(w));
    }

    /// Adapters and bytes ready on the device.
    pub fn usage(&self) -> (usize, usize) {
        let entries = self.lock();
        let ready = entries.values().filter_map(|e| match &e.state {
            State::Ready(d) => Some(d.bytes),
            State::Copying(_) => None,
        });
        ready.fold((0, 0), |(n, b), bytes| (n + 1, b + bytes))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<usize, Entry>> {
        // Every mutation is a single insert/remove/retain, so a poisoned map is still
        // consistent.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn join(copy: JoinHandle<Result<DeviceAdapter>>) -> Result<DeviceAdapter> {
    copy.join()
        .map_err(|_| anyhow!("the adapter copy thread panicked"))?
}
