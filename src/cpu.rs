//! Process-wide settings that decide how fast candle runs on a CPU: its thread pool's
//! spinning and the allocator's reuse of freed memory. Both must be set before the first
//! tensor op (the pool reads its settings once) and before threads start (they change the
//! environment and malloc's parameters), so `main` calls [`configure`] first thing.

/// Spins before one of candle's pool workers parks (candle's default: 25,000).
pub const SPIN_LIMIT: u32 = 2_000;

/// Allocations above this go straight to `mmap` (glibc's ceiling for the threshold).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD_BYTES: i32 = 32 << 20;

/// Everything below.
pub fn configure() {
    configure_thread_pool();
    keep_freed_memory();
}

/// Bounds how long candle's CPU pool busy-waits for its next op, unless the user chose
/// (`CANDLE_BARRIER_POOL_SPIN_LIMIT`). candle 0.11 runs element-wise ops and quantized
/// matmuls on a pool whose workers spin 25,000 times after every op before parking; while
/// a GEMM runs on rayon's threads those spins take the cores it needs, and on a loaded
/// 2-core machine they made a 135M training step 3x slower. Parking after [`SPIN_LIMIT`]
/// spins (tens of microseconds) still catches the next op of a forward pass, and leaves
/// every core to the pool for quantized inference.
pub fn configure_thread_pool() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", SPIN_LIMIT.to_string());
    }
}

/// Makes glibc keep freed memory for reuse instead of returning it to the kernel. A
/// training step allocates and frees hundreds of megabytes of activations; by default
/// blocks above 128 KiB (a threshold that only creeps up) are `mmap`ed and unmapped again,
/// so every step pays the kernel to fault in and zero fresh pages — on this project's VMs
/// about 2.6 s per GB, a quarter of the 0.5B quickstart's training time (35 → 47 tokens/s
/// with this, model load 26 → 17 s). Unless the user tuned malloc (`MALLOC_*_` variables).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user_tuned = std::env::vars_os().any(|(k, _)| k.to_string_lossy().starts_with("MALLOC_"))
            || std::env::var_os("GLIBC_TUNABLES").is_some();
        if !user_tuned {
            // SAFETY: mallopt only changes allocator parameters; called before other threads
            // exist, so no allocation races with it.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
                libc::mallopt(libc::M_TOP_PAD, 256 << 20);
            }
        }
    }
}

/// Returns the memory [`keep_freed_memory`] kept to the kernel: for a long run, after a
/// phase (training) whose peak the rest of the run does not need.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap memory; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}
