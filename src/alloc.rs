//! The process's memory allocator (mimalloc, SQLite's as well) and the one tuning a bulk job
//! turns on: giving freed memory back to the system at once.

use std::sync::Mutex;

use libmimalloc_sys::{mi_option_get, mi_option_set, mi_option_t};

/// Memory allocator for every program built on this crate (the service, tests, benchmarks):
/// matching and page writes allocate many small, short-lived values, and glibc's allocator
/// spent about a quarter of a resync's CPU time in `malloc` and `free`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay`: its place in the C header's `mi_option_t` (the same in
/// mimalloc 2 and 3); the Rust bindings name no constant for it.
const MI_OPTION_PURGE_DELAY: mi_option_t = 15;

/// How many [`PromptFree`] values live, and the purge delay to put back after the last.
static PROMPT_FREE: Mutex<(usize, std::os::raw::c_long)> = Mutex::new((0, 0));

/// While a value of this type lives, the allocator gives freed memory back to the system at
/// once. By default mimalloc keeps freed pages for a second (whole arenas for ten) to reuse
/// them, so what one phase of a rebuild freed still counted in the next phase's resident memory
/// (50-150 MiB at a million records). The setting is the whole process's, so only a bulk job
/// takes it (a rebuild holds one); the service's steady churn would pay for it in page faults
/// (about three times as many in a resync pass, and a slower median when applying a record).
#[must_use = "prompt freeing ends when the value is dropped"]
pub struct PromptFree(());

impl PromptFree {
    pub fn start() -> Self {
        let mut state = PROMPT_FREE.lock().unwrap_or_else(|e| e.into_inner());
        if state.0 == 0 {
            // SAFETY: reads and sets one of the allocator's tuning options; any value is valid
            // at any time.
            unsafe {
                state.1 = mi_option_get(MI_OPTION_PURGE_DELAY);
                mi_option_set(MI_OPTION_PURGE_DELAY, 0);
            }
        }
        state.0 += 1;
        PromptFree(())
    }
}

impl Drop for PromptFree {
    fn drop(&mut self) {
        let mut state = PROMPT_FREE.lock().unwrap_or_else(|e| e.into_inner());
        state.0 -= 1;
        if state.0 == 0 {
            // SAFETY: as in `start`.
            unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, state.1) };
        }
    }
}

/// Makes SQLite allocate through mimalloc as well (its row values, statements and page caches;
/// by default it calls the C library's `malloc`, which spent more time than SQLite itself in a
/// rebuild's reads, and whose frees from another thread, as sqlx's rows are dropped, contend).
/// SQLite takes the setting only before it first starts, so the first store to connect calls
/// this; `false` when SQLite had already started and keeps the C library's allocator.
pub fn sqlite_uses_mimalloc() -> bool {
    use libsqlite3_sys::{sqlite3_config, sqlite3_mem_methods, SQLITE_CONFIG_MALLOC, SQLITE_OK};
    use std::os::raw::{c_int, c_void};

    unsafe extern "C" fn x_malloc(n: c_int) -> *mut c_void {
        // SAFETY: any size; mimalloc aligns to 16 bytes, SQLite needs 8.
        unsafe { libmimalloc_sys::mi_malloc(n.max(0) as usize) }
    }
    unsafe extern "C" fn x_free(p: *mut c_void) {
        // SAFETY: SQLite frees only what `x_malloc` or `x_realloc` returned (or null).
        unsafe { libmimalloc_sys::mi_free(p) }
    }
    unsafe extern "C" fn x_realloc(p: *mut c_void, n: c_int) -> *mut c_void {
        // SAFETY: as in `x_free`.
        unsafe { libmimalloc_sys::mi_realloc(p, n.max(0) as usize) }
    }
    unsafe extern "C" fn x_size(p: *mut c_void) -> c_int {
        // SAFETY: as in `x_free`.
        let n = unsafe { libmimalloc_sys::mi_usable_size(p) };
        c_int::try_from(n).unwrap_or(c_int::MAX)
    }
    unsafe extern "C" fn x_roundup(n: c_int) -> c_int {
        // SAFETY: a pure function of the size.
        let n = unsafe { libmimalloc_sys::mi_good_size(n.max(0) as usize) };
        c_int::try_from(n).unwrap_or(c_int::MAX)
    }
    unsafe extern "C" fn x_init(_: *mut c_void) -> c_int {
        SQLITE_OK
    }
    unsafe extern "C" fn x_shutdown(_: *mut c_void) {}

    static STARTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *STARTED.get_or_init(|| {
        let methods = sqlite3_mem_methods {
            xMalloc: Some(x_malloc),
            xFree: Some(x_free),
            xRealloc: Some(x_realloc),
            xSize: Some(x_size),
            xRoundup: Some(x_roundup),
            xInit: Some(x_init),
            xShutdown: Some(x_shutdown),
            pAppData: std::ptr::null_mut(),
        };
        // SAFETY: SQLite copies the methods before returning; it refuses (SQLITE_MISUSE) once
        // it has started, and then nothing changes.
        let rc =
            unsafe { sqlite3_config(SQLITE_CONFIG_MALLOC, &methods as *const sqlite3_mem_methods) };
        rc == SQLITE_OK
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn purge_delay() -> std::os::raw::c_long {
        // SAFETY: reads an allocator option.
        unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) }
    }

    #[test]
    fn sqlite_allocates_with_mimalloc() {
        // Nothing in this crate starts SQLite except a store's connect, which sets this first.
        assert!(sqlite_uses_mimalloc());
        // SAFETY: an allocation from SQLite, checked and handed back to it.
        unsafe {
            let p = libsqlite3_sys::sqlite3_malloc(100);
            assert!(!p.is_null());
            assert!(libmimalloc_sys::mi_is_in_heap_region(p));
            assert!(libsqlite3_sys::sqlite3_msize(p) >= 100);
            libsqlite3_sys::sqlite3_free(p);
        }
        assert!(sqlite_uses_mimalloc(), "asked again, the same answer");
    }

    #[test]
    fn prompt_freeing_lasts_while_any_guard_lives_and_then_puts_the_delay_back() {
        {
            // Other tests' rebuilds hold guards too; with none alive, the option holds
            // mimalloc 3's documented purge delay, which shows the constant names that option.
            let state = PROMPT_FREE.lock().unwrap();
            if state.0 == 0 && std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
                assert_eq!(purge_delay(), 1000);
            }
        }
        let first = PromptFree::start();
        let second = PromptFree::start();
        assert_eq!(purge_delay(), 0);
        drop(first);
        assert_eq!(purge_delay(), 0, "the second guard still lives");
        drop(second);
        let state = PROMPT_FREE.lock().unwrap();
        if state.0 == 0 {
            assert_eq!(purge_delay(), state.1);
            if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
                assert_eq!(state.1, 1000);
            }
        }
    }
}
