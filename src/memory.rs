//! Giving memory back: glibc's allocator, tuned for a long-running process whose work comes in
//! bursts (the cold sync of thousands of identities, a sweep over all their secrets).
//!
//! By default glibc keeps what a burst freed, so the process stays at the burst's high-water mark;
//! it raises its mmap threshold after each large free, so later large buffers (a list page, a
//! sweep's batch) come from the heap and fragment it; and each thread that allocates gets an arena
//! of its own, each with its own free memory. A fixed mmap threshold sends large buffers straight
//! back to the kernel when freed, one arena pools the free memory of all threads (the operator
//! waits on the network: it does not contend for the allocator), and a periodic trim returns the
//! free pages in the heap. Measured in BENCHMARKS.md (W4): about 5 MiB at 10,000 identities.
//!
//! Other platforms and allocators: both are no-ops.

use std::time::Duration;

/// How often free heap pages are returned: trimming costs milliseconds, and bursts are minutes apart.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(30);

/// Buffers at least this large get their own mapping, returned to the kernel when freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 256 * 1024;

/// Sets the allocator's thresholds and arenas; call once, first thing in `main`, before any other
/// thread starts.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets glibc malloc parameters; any value is valid input.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Returns the heap's free pages to the kernel.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory glibc holds free; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Trims every [`TRIM_INTERVAL`] until the task is dropped.
pub async fn trim_periodically() {
    let mut ticks = tokio::time::interval(TRIM_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        // Off the async workers: trimming walks the whole heap.
        let _ = tokio::task::spawn_blocking(trim).await;
    }
}
