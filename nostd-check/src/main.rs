//! A bare-metal style binary that uses `mae` with no std: configuration, masking,
//! initialization and weights serialization all compile against `core` + `alloc` alone.
#![no_std]
#![no_main]

extern crate alloc;

use core::alloc::{GlobalAlloc, Layout};

struct NoAlloc;

// SAFETY: returning null is always a valid (failing) allocation; nothing is ever freed.
unsafe impl GlobalAlloc for NoAlloc {
    unsafe fn alloc(&self, _: Layout) -> *mut u8 {
        core::ptr::null_mut()
    }
    unsafe fn dealloc(&self, _: *mut u8, _: Layout) {}
}

#[global_allocator]
static ALLOC: NoAlloc = NoAlloc;

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Touches the library's main entry points so they are type-checked in a no_std build.
#[no_mangle]
pub extern "C" fn _start() -> ! {
    if let Ok(cfg) = mae::Config::preset("tiny32") {
        let params = mae::init::init_params(&cfg, 0);
        let _ = mae::weights::save_mae(&cfg, &params, &[]);
        let _ = mae::masking::Masking::new(1, cfg.num_patches(), 0.75);
    }
    loop {}
}
