//! Dropping a file's pages from the page cache, so that the next map of it faults them in
//! afresh: in 2 MiB folios where the map asks for them (the checkpoint loader does, see
//! `header.rs`), instead of the 4 KiB pages a file keeps from being written.

use std::path::Path;

use crate::error::WeightsError;

/// Write `path`'s data to disk and drop its cached pages (Linux `fdatasync` and
/// `posix_fadvise(POSIX_FADV_DONTNEED)`; elsewhere nothing). Pages that another process has
/// mapped stay cached. `synth` calls this on every checkpoint file it writes, so that the first
/// load maps the weights in 2 MiB pages: with the file's written pages still cached it would
/// map 4 KiB ones, and decode reads slower through them (2–6% on `mini`, docs/performance.md).
/// The cost is that the next load reads the file from disk.
pub fn evict_from_page_cache(path: &Path) -> Result<(), WeightsError> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::io::AsRawFd;
        let file = std::fs::File::open(path).map_err(|e| WeightsError::io(path, e))?;
        file.sync_data().map_err(|e| WeightsError::io(path, e))?;
        // SAFETY: a valid open descriptor; the advice reads or writes no memory of ours.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if rc != 0 {
            return Err(WeightsError::io(
                path,
                std::io::Error::from_raw_os_error(rc),
            ));
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_keeps_the_data_and_names_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let data: Vec<u8> = (0..(3 << 20)).map(|i: u32| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        evict_from_page_cache(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        let missing = dir.path().join("absent.safetensors");
        let err = evict_from_page_cache(&missing).unwrap_err().to_string();
        assert!(err.contains("absent.safetensors"), "{err}");
    }
}
