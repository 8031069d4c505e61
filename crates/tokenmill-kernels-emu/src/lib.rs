//! Runs tokenmill's CUDA kernels (`kernels/*.cu`) on the CPU.
//!
//! The kernels' own source is compiled as host C++ (build.rs) against
//! stand-ins for CUDA's built-ins, and every CUDA thread of a block runs
//! as a fiber: `__syncthreads` and warp shuffles are real barriers, each
//! released only when the whole block (or warp) reaches it, with threads
//! run in a fresh random order between barriers. So CI checks the kernels'
//! indexing, reductions and barriers against the CPU references in
//! `tokenmill-kernels` without a GPU. It says nothing about speed, the
//! memory model beyond barriers, or the device's float rounding of
//! non-`_rn` maths; those need a GPU run (`tokenmill gpu kernels`).
//!
//! Launches follow cuLaunchKernel's convention, so arguments are passed as
//! the launchers in `tokenmill_kernels::cuda::launch` pass them, and each
//! list is checked against the kernel's C++ parameter types.
#![deny(missing_docs)]

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void, CStr, CString};
use std::ptr::NonNull;

use tokenmill_kernels::geometry::Launch;

mod backend;
pub use backend::Emulator;

/// Why a launch did not run.
#[derive(Debug, thiserror::Error)]
pub enum EmuError {
    /// No kernel of that name was compiled from `kernels/*.cu` (or
    /// emu/selftest.cu); a name holding a NUL byte is never one.
    #[error("no kernel named {0} in kernels/")]
    UnknownKernel(String),
    /// The arguments' types do not match the kernel's parameters, which a
    /// GPU would not notice: each side as a string of [`KernelArg::code`]s.
    #[error("{kernel} takes ({expected}), was given ({given}) (p pointer, i int, l long long, u unsigned, f float)")]
    Signature {
        /// The kernel's name.
        kernel: String,
        /// The codes of the kernel's C++ parameters, in order.
        expected: String,
        /// The codes of the arguments given.
        given: String,
    },
    /// The emulator refused the launch geometry (no threads, more than 1024
    /// threads, an empty grid) or caught the kernel misusing the CUDA model
    /// (threads waiting at different barriers, a shuffle with a partial
    /// mask or over a partial warp, a write past the dynamic shared
    /// memory). The message is
    /// the emulator's runtime's own, starting with the kernel's name and
    /// naming the block.
    #[error("{0}")]
    Launch(String),
}

/// A kernel argument: its code in a kernel signature and a pointer to its
/// value, as cuLaunchKernel takes it.
pub trait KernelArg {
    /// `p`, `i`, `l`, `u` or `f` (see [`EmuError::Signature`]).
    fn code(&self) -> u8;
    /// Where the argument's value lies (for a buffer: where its address
    /// lies).
    fn value_ptr(&self) -> *mut c_void;
}

macro_rules! scalar_arg {
    ($($ty:ty => $code:literal),*) => {$(
        impl KernelArg for $ty {
            fn code(&self) -> u8 {
                $code
            }
            fn value_ptr(&self) -> *mut c_void {
                self as *const $ty as *mut c_void
            }
        }
    )*};
}
scalar_arg!(i32 => b'i', i64 => b'l', u32 => b'u', f32 => b'f');

/// Elements of poison on each side of a [`Buffer`]: a kernel reading a
/// little past its data reads NaN (or `u32::MAX`), and a write there is
/// caught by [`Buffer::read`].
const GUARD: usize = 256;
const POISON: u8 = 0xff;

/// "Device" memory: a heap allocation with poisoned guards on both sides.
pub struct Buffer<T: Copy> {
    /// The allocation, guards included, owned through a raw pointer
    /// because kernels write through the addresses handed out.
    storage: NonNull<[T]>,
    len: usize,
}

impl<T: Copy> Buffer<T> {
    /// A buffer holding `data`.
    pub fn from_slice(data: &[T]) -> Self {
        let total = data.len() + 2 * GUARD;
        let mut storage: Vec<T> = Vec::with_capacity(total);
        // SAFETY: the capacity is `total` elements; every byte is set
        // (poison, then the data over the middle) before the length is.
        // T is Copy and the kernels' types (floats, integers) have no
        // invalid bit patterns.
        unsafe {
            std::ptr::write_bytes(storage.as_mut_ptr(), POISON, total);
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                storage.as_mut_ptr().add(GUARD),
                data.len(),
            );
            storage.set_len(total);
        }
        let storage = NonNull::from(Box::leak(storage.into_boxed_slice()));
        Buffer {
            storage,
            len: data.len(),
        }
    }

    /// The address of element `offset` (a view into the buffer, as a
    /// kernel argument).
    pub fn at(&self, offset: usize) -> DevicePtr {
        assert!(offset <= self.len, "offset {offset} past {}", self.len);
        // SAFETY: GUARD + offset is within the allocation.
        let ptr = unsafe { self.storage.cast::<T>().as_ptr().add(GUARD + offset) };
        DevicePtr(Cell::new(ptr.cast()))
    }

    /// The buffer's address, as a kernel argument.
    pub fn ptr(&self) -> DevicePtr {
        self.at(0)
    }

    /// The data, after checking that nothing was written to the guards.
    ///
    /// # Panics
    /// When a kernel wrote outside the buffer.
    pub fn read(&self) -> Vec<T> {
        // SAFETY: no launch runs while `&self` is borrowed here (launches
        // are synchronous), and the allocation holds GUARD + len + GUARD
        // initialised elements.
        let all = unsafe { self.storage.as_ref() };
        let bytes = |s: &[T]| {
            // SAFETY: a slice of Copy plain-data elements viewed as bytes.
            unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
                .iter()
                .all(|b| *b == POISON)
        };
        assert!(
            bytes(&all[..GUARD]) && bytes(&all[GUARD + self.len..]),
            "a kernel wrote outside a buffer of {} elements",
            self.len
        );
        all[GUARD..GUARD + self.len].to_vec()
    }
}

impl<T: Copy> Drop for Buffer<T> {
    fn drop(&mut self) {
        // SAFETY: `storage` came from Box::leak in from_slice and is
        // dropped once, here.
        drop(unsafe { Box::from_raw(self.storage.as_ptr()) });
    }
}

/// An address in a [`Buffer`], passed to a kernel.
pub struct DevicePtr(Cell<*mut c_void>);

impl KernelArg for DevicePtr {
    fn code(&self) -> u8 {
        b'p'
    }
    fn value_ptr(&self) -> *mut c_void {
        self.0.as_ptr().cast()
    }
}

#[repr(C)]
struct RawKernel {
    name: *const c_char,
    signature: *const c_char,
    trampoline: *const c_void,
}

extern "C" {
    fn tm_emu_find(name: *const c_char) -> *const RawKernel;
    #[allow(clippy::too_many_arguments)]
    fn tm_emu_launch(
        kernel: *const RawKernel,
        args: *mut *mut c_void,
        grid_x: c_uint,
        grid_y: c_uint,
        grid_z: c_uint,
        threads: c_uint,
        shared_bytes: c_uint,
        seed: c_ulonglong,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
}

/// The seed of the thread order: `TOKENMILL_EMU_SEED` if set, else fixed.
fn order_seed() -> u64 {
    std::env::var("TOKENMILL_EMU_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_cafe)
}

/// Runs `kernel` over `launch` with `args` (in the kernel's parameter
/// order); returns when every block has finished.
pub fn launch(kernel: &str, launch: Launch, args: &[&dyn KernelArg]) -> Result<(), EmuError> {
    let name = CString::new(kernel).map_err(|_| EmuError::UnknownKernel(kernel.into()))?;
    // SAFETY: `name` is a NUL-terminated string; the registry returns null
    // or a pointer into its static table.
    let found = unsafe { tm_emu_find(name.as_ptr()) };
    // SAFETY: non-null entries of the static table live for the program.
    let Some(entry) = (unsafe { found.as_ref() }) else {
        return Err(EmuError::UnknownKernel(kernel.into()));
    };
    // SAFETY: the table's signatures are NUL-terminated static strings.
    let expected = unsafe { CStr::from_ptr(entry.signature) }
        .to_string_lossy()
        .into_owned();
    let given: String = args.iter().map(|a| a.code() as char).collect();
    if expected != given {
        return Err(EmuError::Signature {
            kernel: kernel.into(),
            expected,
            given,
        });
    }
    let mut pointers: Vec<*mut c_void> = args.iter().map(|a| a.value_ptr()).collect();
    let mut error = [0 as c_char; 512];
    // SAFETY: the argument list matches the kernel's parameter types
    // (checked above), each pointer points at a live value of that type for
    // the whole call, and buffers' addresses point into live Buffers. What
    // the kernel reads and writes through them is the kernel's business: the
    // guards around every Buffer catch a write a little out of bounds.
    let status = unsafe {
        tm_emu_launch(
            entry,
            pointers.as_mut_ptr(),
            launch.grid.0,
            launch.grid.1,
            launch.grid.2,
            launch.block,
            launch.shared_bytes,
            order_seed(),
            error.as_mut_ptr(),
            error.len(),
        )
    };
    if status != 0 {
        // SAFETY: tm_emu_launch wrote a NUL-terminated message (snprintf).
        let message = unsafe { CStr::from_ptr(error.as_ptr()) };
        return Err(EmuError::Launch(message.to_string_lossy().into_owned()));
    }
    Ok(())
}
