//! The device: adapter choice, limits, and the errors wgpu reports asynchronously.
//!
//! wgpu reports validation errors, out-of-memory and device loss through callbacks, and by
//! default its uncaptured-error handler panics. This module installs handlers that record the
//! first such error instead; [`Gpu::check`] turns a recorded error into a typed
//! [`BackendError`] at the next `sync` or `download`, as the `Backend` contract allows.

use mae::backend::{BResult, BackendError, BackendErrorKind};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Locks `m`, recovering the data of a poisoned lock: every critical section here leaves its data
/// consistent (a pipeline map, an optional encoder), so a panic elsewhere does not corrupt it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The first asynchronous error the device reported, if any.
#[derive(Default)]
struct Deferred {
    error: Option<BackendError>,
}

/// A wgpu device and queue with the limits this backend works within.
pub(crate) struct Gpu {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) info: wgpu::AdapterInfo,
    /// Largest buffer, in bytes, that can be bound as one storage binding.
    pub(crate) max_binding_bytes: u64,
    /// The device's limits (the adapter's own, requested in full).
    pub(crate) limits: wgpu::Limits,
    deferred: Arc<Mutex<Deferred>>,
}

fn no_device(message: impl Into<String>) -> BackendError {
    BackendError::new(BackendErrorKind::NoDevice, message)
}

/// The typed error for a wgpu error.
pub(crate) fn from_wgpu(e: &wgpu::Error, bytes: usize) -> BackendError {
    match e {
        wgpu::Error::OutOfMemory { .. } => {
            BackendError::new(BackendErrorKind::OutOfMemory { bytes }, e.to_string())
        }
        _ => BackendError::new(BackendErrorKind::Device, e.to_string()),
    }
}

impl Gpu {
    /// The first adapter wgpu picks by default (honouring `WGPU_BACKEND`, `WGPU_ADAPTER_NAME` and
    /// `WGPU_POWER_PREF`), with its own limits.
    pub(crate) fn new() -> BResult<Gpu> {
        Gpu::from_instance(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
    }

    /// The default adapter of an instance built from `desc`.
    pub(crate) fn from_instance(desc: wgpu::InstanceDescriptor) -> BResult<Gpu> {
        let instance = wgpu::Instance::new(desc);
        let options = wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::from_env()
                .unwrap_or(wgpu::PowerPreference::HighPerformance),
            ..Default::default()
        };
        let adapter = pollster::block_on(instance.request_adapter(&options))
            .map_err(|e| no_device(format!("no wgpu adapter: {e}")))?;
        Gpu::with_adapter(adapter)
    }

    /// A device on `adapter`, requesting the adapter's own limits (the defaults cap storage
    /// bindings at 128 MiB even where the hardware allows more).
    pub(crate) fn with_adapter(adapter: wgpu::Adapter) -> BResult<Gpu> {
        let info = adapter.get_info();
        let limits = adapter.limits();
        let desc = wgpu::DeviceDescriptor {
            label: Some("mae"),
            required_limits: limits.clone(),
            ..Default::default()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&desc))
            .map_err(|e| no_device(format!("{}: {e}", info.name)))?;
        let deferred = Arc::new(Mutex::new(Deferred::default()));
        let on_error = Arc::clone(&deferred);
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut d = lock(&on_error);
            if d.error.is_none() {
                d.error = Some(from_wgpu(&e, 0));
            }
        }));
        let on_lost = Arc::clone(&deferred);
        device.set_device_lost_callback(move |reason, message| {
            let mut d = lock(&on_lost);
            if d.error.is_none() {
                d.error = Some(BackendError::new(
                    BackendErrorKind::Device,
                    format!("device lost ({reason:?}): {message}"),
                ));
            }
        });
        let max_binding_bytes = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        Ok(Gpu {
            device,
            queue,
            info,
            max_binding_bytes,
            limits,
            deferred,
        })
    }

    /// Reports (once) the first error the device recorded since the last check.
    pub(crate) fn check(&self) -> BResult<()> {
        match lock(&self.deferred).error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Waits until the queue is idle.
    pub(crate) fn wait(&self) -> BResult<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| BackendError::new(BackendErrorKind::Device, format!("poll: {e}")))?;
        self.check()
    }

    /// Runs `f` inside an error scope catching out-of-memory and validation errors, so that a
    /// failed allocation or pipeline creation becomes the caller's typed error at once.
    pub(crate) fn scoped<T>(&self, bytes: usize, f: impl FnOnce() -> T) -> BResult<T> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let invalid = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = f();
        let invalid = pollster::block_on(invalid.pop());
        let oom = pollster::block_on(oom.pop());
        match oom.or(invalid) {
            Some(e) => Err(from_wgpu(&e, bytes)),
            None => Ok(value),
        }
    }
}
