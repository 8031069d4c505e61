//! Loading and launching the kernels of `kernels/` on a CUDA device.
//!
//! The fatbins built by build.rs are embedded in the binary; a module is
//! loaded into the device's context the first time one of its functions is
//! asked for (the driver picks the sm_90a SASS on Hopper, or JIT-compiles
//! the PTX elsewhere, which `CUDA_CACHE_PATH` then keeps). Launches go to
//! candle's stream, so they are ordered with candle's own ops on the same
//! tensors without any extra synchronisation.

use crate::{KernelError, Result};
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaModule, CudaStream};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::CudaDevice;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub mod check;
pub mod launch;
pub mod sampling;

/// The embedded fatbins: `ALL` lists `(module name, bytes)`, one per
/// `kernels/*.cu`.
pub mod fatbins {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Our kernels on one device: the loaded modules and candle's stream.
pub struct Kernels {
    device: CudaDevice,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
}

impl Kernels {
    /// Kernels for `device`; nothing is loaded until first used.
    pub fn new(device: &CudaDevice) -> Self {
        Kernels {
            device: device.clone(),
            modules: Mutex::new(HashMap::new()),
        }
    }

    /// The device (candle's handle, with its context and stream).
    pub fn device(&self) -> &CudaDevice {
        &self.device
    }

    /// The stream every launch goes to: candle's.
    pub fn stream(&self) -> Arc<CudaStream> {
        self.device.cuda_stream()
    }

    /// Loads every module now, so that the first request does not pay for it;
    /// returns how many were loaded.
    pub fn preload(&self) -> Result<usize> {
        for (name, _) in fatbins::ALL {
            self.module(name)?;
        }
        Ok(fatbins::ALL.len())
    }

    /// Function `name` of module `module` (a `kernels/*.cu` file's stem).
    pub fn function(&self, module: &str, name: &str) -> Result<CudaFunction> {
        self.module(module)?
            .load_function(name)
            .map_err(|e| KernelError::Cuda(format!("{module}::{name}: {e}")))
    }

    fn module(&self, module: &str) -> Result<Arc<CudaModule>> {
        let mut modules = self
            .modules
            .lock()
            .map_err(|_| KernelError::Cuda("kernel module table poisoned".into()))?;
        let Some(&(key, image)) = fatbins::ALL.iter().find(|(n, _)| *n == module) else {
            return Err(KernelError::Invalid(format!("no kernel module {module}")));
        };
        if let Some(loaded) = modules.get(key) {
            return Ok(loaded.clone());
        }
        let context = self.stream().context().clone();
        let loaded = context
            .load_module(Ptx::from_binary(image.to_vec()))
            .map_err(|e| KernelError::Cuda(format!("loading module {module}: {e}")))?;
        modules.insert(key, loaded.clone());
        Ok(loaded)
    }
}
