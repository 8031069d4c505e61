//! Work sharing for the CPU kernels: the calling thread claims units of work
//! from a shared counter, and the pool's threads join in when they wake.
//!
//! Why not a barrier (candle's pool) or rayon from outside its pool: both
//! make the caller wait until every thread has seen the job. On a machine
//! shared with other processes a helper thread can be descheduled for a
//! whole time slice, and a forward makes a few hundred calls: every call
//! then waits milliseconds for a thread that has nothing left to do. Here
//! the caller waits only for units a helper has actually claimed; a helper
//! that wakes late finds the counter exhausted and leaves without touching
//! the job. Between calls the helpers watch for the next job for a moment,
//! yielding their CPU meanwhile, so back-to-back calls (the layers of one
//! step) find them awake without taking time from busy threads.
//!
//! Which thread computes a unit never changes what it computes: results are
//! the same whatever the number of threads.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// How long a helper looks for a new job before it sleeps: longer than the
/// serial work between two kernels of a decode step, so it is awake for
/// the next one. It yields its CPU while it looks, so on a machine with
/// more busy threads than cores it does not take time from the thread that
/// has work.
const IDLE_WATCH: Duration = Duration::from_micros(200);

/// Runs `task(u)` for every unit `u` in `0..units`, on the calling thread
/// and on the pool's helpers, and returns when all have finished.
///
/// # Panics
/// If `task` panicked for some unit (after all units have finished).
pub fn run(units: usize, task: &(dyn Fn(usize) + Sync)) {
    let pool = pool();
    if units <= 1 || pool.helpers == 0 {
        (0..units).for_each(task);
        return;
    }
    let task: *const (dyn Fn(usize) + Sync + '_) = task;
    // SAFETY: only the lifetime bound of the pointer changes (same layout).
    // The job outlives this call (it is shared with the helpers), but `task`
    // is only called for a unit claimed from `next` while `next < units`,
    // and this function does not return before `done` reaches `units`, that
    // is before every unit has been claimed and has finished; later claims
    // find `next >= units` and never touch `task`. So no use of the pointer
    // outlives the borrow it was made from.
    let task: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(task) };
    let job = Arc::new(Job {
        units,
        next: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        panicked: AtomicBool::new(false),
        task,
    });
    pool.publish(&job);
    job.work();
    let mut spins = 0u32;
    while job.done.load(Ordering::Acquire) < units {
        // A helper holds a unit; if it lost its CPU, let it have ours.
        spins += 1;
        if spins < 1_000 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    if job.panicked.load(Ordering::Relaxed) {
        panic!("a CPU kernel task panicked");
    }
}

/// One call of [`run`], shared with the helpers.
struct Job {
    units: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    panicked: AtomicBool,
    /// Valid while `next < units`; see [`run`].
    task: *const (dyn Fn(usize) + Sync),
}

// SAFETY: the task is `Sync`, so calling it from any thread is sound, and
// the counters are atomics; the pointer's validity is `run`'s business.
unsafe impl Send for Job {}
// SAFETY: as above.
unsafe impl Sync for Job {}

impl Job {
    /// Claims and runs units until none is left.
    fn work(&self) {
        loop {
            let unit = self.next.fetch_add(1, Ordering::Relaxed);
            if unit >= self.units {
                return;
            }
            // A panic is counted as done, so the caller never waits forever,
            // and re-raised by the caller.
            // SAFETY: `unit < units` was claimed, so `run` has not returned
            // and the task behind the pointer is alive (see `run`).
            let task = unsafe { &*self.task };
            if panic::catch_unwind(AssertUnwindSafe(|| task(unit))).is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

struct Pool {
    helpers: usize,
    shared: Arc<Shared>,
}

/// The latest job and its generation, for the helpers.
struct Shared {
    slot: Mutex<Slot>,
    wake: Condvar,
    /// The slot's generation, readable without the lock while spinning.
    generation: AtomicUsize,
}

#[derive(Default)]
struct Slot {
    generation: usize,
    job: Option<Arc<Job>>,
}

impl Pool {
    fn publish(&self, job: &Arc<Job>) {
        let mut slot = self
            .shared
            .slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        slot.generation = slot.generation.wrapping_add(1);
        slot.job = Some(Arc::clone(job));
        self.shared
            .generation
            .store(slot.generation, Ordering::Release);
        drop(slot);
        self.shared.wake.notify_all();
    }
}

impl Shared {
    /// A helper's life: wait for a job newer than the last one seen, help
    /// with it, repeat.
    fn serve(&self) {
        let mut seen = 0usize;
        loop {
            let idle = Instant::now();
            while self.generation.load(Ordering::Acquire) == seen && idle.elapsed() < IDLE_WATCH {
                std::thread::yield_now();
            }
            let job = {
                let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
                while slot.generation == seen {
                    slot = self.wake.wait(slot).unwrap_or_else(PoisonError::into_inner);
                }
                seen = slot.generation;
                slot.job.clone()
            };
            if let Some(job) = job {
                job.work();
            }
        }
    }
}

/// The process-wide pool: one helper per thread candle would use
/// (`RAYON_NUM_THREADS`, else the physical cores), less the calling thread.
fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let shared = Arc::new(Shared {
            slot: Mutex::new(Slot::default()),
            wake: Condvar::new(),
            generation: AtomicUsize::new(0),
        });
        let wanted = candle_core::utils::get_num_threads().saturating_sub(1);
        let mut helpers = 0;
        for i in 0..wanted {
            let shared = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name(format!("tokenmill-cpu-{i}"))
                .spawn(move || shared.serve());
            // Fewer helpers is slower, never wrong.
            if spawned.is_ok() {
                helpers += 1;
            }
        }
        Pool { helpers, shared }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unit_runs_once() {
        for units in [0, 1, 2, 7, 1000] {
            let counts: Vec<AtomicUsize> = (0..units).map(|_| AtomicUsize::new(0)).collect();
            run(units, &|u| {
                counts[u].fetch_add(1, Ordering::Relaxed);
            });
            assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn a_panicking_unit_panics_the_caller_after_all_finish() {
        let done = AtomicUsize::new(0);
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            run(64, &|u| {
                done.fetch_add(1, Ordering::Relaxed);
                assert!(u != 10, "unit 10 fails");
            })
        }));
        assert!(result.is_err());
        assert_eq!(done.load(Ordering::Relaxed), 64);
    }
}
