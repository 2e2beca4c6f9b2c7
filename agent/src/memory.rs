//! Gives back to the kernel the heap that start-up work freed. Loading the capture programs
//! parses the kernel's BTF (megabytes, all freed once loaded) and a config snapshot is decoded
//! whole; glibc keeps freed pages for reuse, so without this an idle agent would hold the peak
//! of its start-up as resident memory for good.
pub fn release_freed() {
    // SAFETY: malloc_trim only walks the allocator's own free lists; any thread may call it.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Makes every thread allocate from one glibc arena. By default each tokio worker and blocking
/// thread gets an arena of its own, and each keeps its own freed pages resident; the proxy's
/// allocations are small and short-lived, so sharing one arena costs less than the memory.
pub fn share_one_arena() {
    // SAFETY: called before any other thread exists; mallopt only sets an allocator parameter.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
