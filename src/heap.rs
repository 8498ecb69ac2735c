//! The process heap: handing memory the allocator holds free back to the operating
//! system. glibc's malloc keeps freed memory in its arenas (one per thread that
//! allocated, up to eight per core), so without this the resident memory of a process
//! stays at the highest it has been: after a model load, or after each new peak of
//! concurrent requests. Elsewhere than glibc Linux this does nothing.

/// Releases the free memory of every allocator arena (`malloc_trim(0)`): whole free
/// pages go back to the operating system. Returns whether any did. Costs a walk over
/// the free chunks (milliseconds for hundreds of MiB), holding each arena's lock in turn,
/// so call it when the process is quiet.
pub fn release_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: glibc's `malloc_trim` takes a byte count, passes no pointer, and only
        // releases free memory of the allocator's own heaps (it takes each arena's lock);
        // it is safe to call at any time from any thread.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// This process's resident memory in bytes (Linux `/proc/self/statm`), if known.
pub fn resident_bytes() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        // SAFETY: `sysconf` reads a constant of the system; no pointer is passed.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        Some(pages * u64::try_from(page).ok()?)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn freed_memory_is_released_and_resident_memory_is_read() {
        // Several MiB in small allocations (below the mmap threshold, so they live in
        // an arena), then freed: the trim has whole free pages to hand back.
        // (Other tests run beside this one, so resident memory itself can't be
        // compared before and after.)
        let chunks: Vec<Vec<u8>> = (0..4096).map(|i| vec![i as u8; 4000]).collect();
        assert!(resident_bytes().unwrap() >= 16 << 20);
        drop(chunks);
        let released = release_freed_memory();
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert!(released, "16 MiB freed in an arena should give pages back");
        }
    }
}
