//! Gives back to the kernel the heap that bursts of work freed. Reading a large cluster (the API
//! server's JSON, a directory's YAML) and sending every node its snapshot allocate far more than
//! control keeps; glibc holds freed pages for reuse, so without this control would keep the peak
//! of its start-up as resident memory for good.
pub fn release_freed() {
    // SAFETY: malloc_trim only walks the allocator's own free lists; any thread may call it.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}
