//! The device copies of active adapters (the active tier in GPU memory): one buffer per
//! adapter version holding every site's A and B in the model's dtype, and a descriptor
//! table (`SiteDesc` in sgmv.cu: A address, B address, rank, scale) per layer and site
//! that the step's slot table points at.
//!
//! Invariants: an entry is keyed by its host weights' `Arc` address and holds a `Weak`
//! to them, so the address cannot be reused while the entry lives; an entry is dropped
//! when the engine evicts that version from its active pool
//! ([`AdapterCache::release`]) or when the host weights are gone; a step holds `Arc`s to
//! the device copies it reads, so a release during a step frees nothing it uses. Every A
//! and B starts 16-byte aligned in the buffer (sgmv.cu's vector loads rely on it).
use super::kernels::device_ptr;
use crate::lora::peft::AdapterWeights;
use anyhow::Result;
use candle_core::cuda::cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use candle_core::cuda::CudaDevice;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

/// Sites per layer (`LoraSite::index` < 7).
const SITES: usize = 7;
/// u64 words per `SiteDesc` (two addresses, then rank and scale packed in one word).
const DESC_WORDS: usize = 3;

/// One adapter version on the device.
pub struct DeviceAdapter {
    /// Every A and B, in the model's dtype; addressed by `descs`.
    _weights: Tensor,
    /// `SiteDesc[num_layers * 7]`.
    descs: CudaSlice<u64>,
    pub rank_max: usize,
    pub bytes: usize,
}

impl DeviceAdapter {
    /// The device address of this adapter's descriptor table.
    pub fn descs_ptr(&self, stream: &CudaStream) -> u64 {
        self.descs.device_ptr(stream).0
    }

    fn upload(
        w: &AdapterWeights,
        dtype: DType,
        device: &Device,
        cuda: &CudaDevice,
    ) -> Result<Self> {
        let align = 16 / dtype.size_in_bytes();
        let mut host: Vec<f32> = Vec::new();
        let mut place = |values: &[f32]| {
            host.resize(host.len().next_multiple_of(align), 0.0);
            let at = host.len();
            host.extend_from_slice(values);
            at
        };
        let mut offsets = Vec::with_capacity(w.layers.len() * SITES);
        for layer in &w.layers {
            for pair in layer {
                offsets.push(
                    pair.as_ref()
                        .map(|p| (place(&p.a), place(&p.b), p.rank, p.scale)),
                );
            }
        }
        let len = host.len().max(1);
        host.resize(len, 0.0);
        let weights = Tensor::from_vec(host, len, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?;
        let stream = cuda.cuda_stream();
        let base = device_ptr(&weights, &stream)?;
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
        let descs = cuda.clone_htod(&table)?;
        Ok(Self {
            bytes: len * dtype.size_in_bytes(),
            _weights: weights,
            descs,
            rank_max: w.rank_max,
        })
    }
}

struct Entry {
    host: Weak<AdapterWeights>,
    device: Arc<DeviceAdapter>,
}

/// The device copies of the adapters steps have used and the engine has not evicted.
#[derive(Default)]
pub struct AdapterCache {
    entries: Mutex<HashMap<usize, Entry>>,
}

fn key(w: &Arc<AdapterWeights>) -> usize {
    Arc::as_ptr(w) as usize
}

impl AdapterCache {
    /// The device copy of `w`, uploaded on first use.
    pub fn get(
        &self,
        w: &Arc<AdapterWeights>,
        dtype: DType,
        device: &Device,
        cuda: &CudaDevice,
    ) -> Result<Arc<DeviceAdapter>> {
        let mut entries = self.lock();
        if let Some(e) = entries.get(&key(w)) {
            return Ok(e.device.clone());
        }
        entries.retain(|_, e| e.host.strong_count() > 0);
        let device = Arc::new(DeviceAdapter::upload(w, dtype, device, cuda)?);
        entries.insert(
            key(w),
            Entry {
                host: Arc::downgrade(w),
                device: device.clone(),
            },
        );
        Ok(device)
    }

    /// Drops the device copy of `w` (freed once no step holds it).
    pub fn release(&self, w: &Arc<AdapterWeights>) {
        self.lock().remove(&key(w));
    }

    /// Adapters and bytes resident on the device.
    pub fn usage(&self) -> (usize, usize) {
        let entries = self.lock();
        (
            entries.len(),
            entries.values().map(|e| e.device.bytes).sum(),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<usize, Entry>> {
        // A panic while holding the lock leaves the map consistent (every mutation is a
        // single insert/remove/retain), so a poisoned lock is still usable.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}
